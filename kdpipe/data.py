"""Datasets: registry, sources, verification, IDX parsing, split, in-memory tensors.

Verification is on the *decompressed* IDX bytes (SHA-256 kept here), because
Debian re-compressed the archives: their ``.gz`` MD5s differ from the official
ones while the IDX content is identical. A download is also accepted by the
official ``.gz`` MD5 that torchvision lists. Nothing is written until every
file has been verified.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdpipe.errors import KdpipeError

log = logging.getLogger(__name__)

ROLES = ("train_images", "train_labels", "test_images", "test_labels")
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SYSTEM_DATA_ROOT = Path("/usr/share/datasets")
CHECKSUM_FILE = "SHA256SUMS"  # for `local` datasets: "<sha256>  <idx file name>" per line


@dataclass(frozen=True)
class FileSpec:
    md5_gz: str | None  # MD5 of the official .gz archive (torchvision's resources)
    sha256_idx: str | None  # SHA-256 of the decompressed IDX bytes; None where not yet measured


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    mirrors: tuple[str, ...]
    files: dict[str, FileSpec]
    classes: tuple[str, ...] = ()
    notes: str = ""


# SHA-256 of the decompressed IDX files of Fashion-MNIST were computed from
# Debian's dataset-fashion-mnist; the label files' IDX bytes were checked equal
# to the official archives'. MNIST and KMNIST IDX hashes could not be measured
# here (no internet): their files are accepted by the official .gz MD5 only.
DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        files={
            "train_images": FileSpec("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
            "train_labels": FileSpec("25c81989df183df01b3e8a0aad5dffbe", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
            "test_images": FileSpec("bef4ecab320f06d8554ea6380940ec79", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
            "test_labels": FileSpec("bb300cfdad3c16e7a12a480ee83cd310", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
        },
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
    "mnist": DatasetSpec(
        name="mnist",
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        files={
            "train_images": FileSpec("f68b3c2dcbeaaa9fbdd348bbdeb94873", None),
            "train_labels": FileSpec("d53e105ee54ea40749a09fcbcd1e9432", None),
            "test_images": FileSpec("9fb629c4189551a2d022fa330f9573f3", None),
            "test_labels": FileSpec("ec29112dd5afa0611ce80d1b7f02629c", None),
        },
        classes=tuple(str(i) for i in range(10)),
    ),
    "kmnist": DatasetSpec(
        name="kmnist",
        mirrors=("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        files={
            "train_images": FileSpec("bdb82020997e1d708af4cf47b453dcf7", None),
            "train_labels": FileSpec("e144d726b3acfaa3e44228e80efcd344", None),
            "test_images": FileSpec("5c965bf0a639b31b8f53240b1b52f4d7", None),
            "test_labels": FileSpec("7320c461ea6c1c855c0b718fb2a4b134", None),
        },
        classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    ),
    # Your own IDX files: `data.source` must hold them and a SHA256SUMS file
    # listing the SHA-256 of each decompressed IDX file.
    "local": DatasetSpec(name="local", mirrors=(), files={}, notes="IDX files + SHA256SUMS in data.source"),
}


@dataclass
class SplitData:
    """The whole dataset in memory: uint8 images [N, H, W], int64 labels [N]."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    meta: dict = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in TENSOR_NAMES}


TENSOR_NAMES = ("train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels")


# ---------------------------------------------------------------- IDX parsing

_IDX_DTYPES = {0x08: torch.uint8}


def parse_idx(data: bytes, where: str = "IDX data") -> torch.Tensor:
    """Parse IDX bytes (magic 0x0000 08 NDIM, big-endian dims, uint8 payload)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise KdpipeError(f"{where}: not an IDX file (bad magic number {data[:4].hex() or 'empty'}). The file is corrupt or of another format; replace it.")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_DTYPES:
        raise KdpipeError(f"{where}: IDX element type 0x{dtype_code:02x} is not supported (only unsigned bytes, 0x08).")
    if ndim < 1 or len(data) < 4 + 4 * ndim:
        raise KdpipeError(f"{where}: IDX header is truncated or declares {ndim} dimensions.")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim
    count = 1
    for d in dims:
        count *= d
    if len(data) != expected + count:
        raise KdpipeError(
            f"{where}: IDX header declares shape {dims} ({count} values) but the file holds {len(data) - expected}. "
            f"The file is truncated or corrupt; replace it."
        )
    return torch.frombuffer(bytearray(data[expected:]), dtype=torch.uint8).reshape(dims)


def encode_idx(array: torch.Tensor) -> bytes:
    """IDX bytes of a uint8 tensor (used by tests and for `local` datasets)."""
    if array.dtype != torch.uint8:
        raise ValueError("encode_idx supports uint8 tensors only")
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.contiguous().numpy().tobytes()


# ------------------------------------------------------- sources and checking


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_local_checksums(directory: Path) -> dict[str, FileSpec]:
    """FileSpecs of a `local` dataset from ``SHA256SUMS`` in its directory."""
    sums = directory / CHECKSUM_FILE
    if not sums.is_file():
        raise KdpipeError(
            f"{sums}: not found. A `local` dataset needs a {CHECKSUM_FILE} file beside its IDX files, "
            f"one '<sha256>  <name>' line per decompressed IDX file (sha256sum's format)."
        )
    by_name: dict[str, str] = {}
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            by_name[parts[1].lstrip("*")] = parts[0].lower()
    files = {}
    for role, idx_name in IDX_NAMES.items():
        if idx_name not in by_name:
            raise KdpipeError(f"{sums}: has no line for {idx_name}. Add '<sha256>  {idx_name}'.")
        files[role] = FileSpec(md5_gz=None, sha256_idx=by_name[idx_name])
    return files


def decode_verified(raw: bytes, filename: str, spec: FileSpec, where: str) -> bytes:
    """Return the IDX bytes of ``raw`` (a .gz archive or IDX) if they match ``spec``.

    A .gz is accepted when its MD5 is the official one, or when its decompressed
    content has the registered SHA-256; a plain IDX by its SHA-256 only.
    """
    official_gz = filename.endswith(".gz") and spec.md5_gz is not None and _md5(raw) == spec.md5_gz
    if filename.endswith(".gz"):
        try:
            idx = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise KdpipeError(f"{where}: cannot decompress ({exc}); the archive is truncated or corrupt. Delete it and retry, or point data.source elsewhere.") from None
    else:
        idx = raw
    if spec.sha256_idx is not None:
        got = _sha256(idx)
        if got != spec.sha256_idx:
            raise KdpipeError(
                f"{where}: checksum mismatch: SHA-256 of the IDX content is {got}, expected {spec.sha256_idx}. "
                f"The file is corrupt or belongs to another dataset; replace it. Nothing was written."
            )
    elif not official_gz:
        raise KdpipeError(
            f"{where}: cannot be verified: for this dataset only the official .gz archives (MD5 {spec.md5_gz}) are known, "
            f"and this file's MD5 is {_md5(raw)}. Use the official archive or let the stage download it. Nothing was written."
        )
    return idx


def candidate_dirs(name: str, source: str) -> list[tuple[Path, bool]]:
    """Where to look, in order: data.source, $KDPIPE_DATA_SOURCE, /usr/share/datasets/<name>.

    Each entry says whether the user named it explicitly: an explicit
    directory that lacks files is an error, not silently skipped.
    """
    dirs: list[tuple[Path, bool]] = []
    if source:
        dirs.append((Path(source), True))
    env = os.environ.get("KDPIPE_DATA_SOURCE")
    if env:
        dirs.append((Path(env), True))
    dirs.append((SYSTEM_DATA_ROOT / name, False))
    return dirs


def _find_in_dir(directory: Path, role: str) -> Path | None:
    for candidate in (IDX_NAMES[role] + ".gz", IDX_NAMES[role]):
        if (directory / candidate).is_file():
            return directory / candidate
    return None


def download_file(url: str, timeout: float = 60.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - fixed https/http mirrors
        return response.read()


def fetch_from_mirrors(spec: DatasetSpec, role: str) -> tuple[bytes, str]:
    """Download one archive, trying each mirror in turn."""
    filename = IDX_NAMES[role] + ".gz"
    errors = []
    for mirror in spec.mirrors:
        url = mirror + filename
        try:
            log.info("downloading %s", url)
            return download_file(url), url
        except OSError as exc:
            errors.append(f"{url}: {exc}")
    raise KdpipeError(
        f"{spec.name}: could not download {filename} from any mirror ({'; '.join(errors)}). "
        f"Without internet, put the four IDX(.gz) files in a directory and set data.source or KDPIPE_DATA_SOURCE to it."
    )


def read_dataset_files(spec: DatasetSpec, source: str) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Locate, verify and parse the four IDX files of a dataset.

    Returns the arrays by role, the IDX SHA-256 by role, and where they came from.
    The first directory that holds all four files is used; a directory given
    explicitly (``source``) that lacks a file is an error, not skipped.
    """
    files = spec.files
    dirs = candidate_dirs(spec.name, source)
    if spec.name == "local":
        local = source or os.environ.get("KDPIPE_DATA_SOURCE", "")
        if not local:
            raise KdpipeError(
                "data.name is `local` but no directory is given. Set data.source (or KDPIPE_DATA_SOURCE) to the "
                "directory holding your IDX files and SHA256SUMS."
            )
        dirs = [(Path(local), True)]
        files = read_local_checksums(Path(local))

    for directory, explicit in dirs:
        if not directory.is_dir():
            if explicit:
                raise KdpipeError(f"{directory}: data source directory does not exist. Fix data.source / KDPIPE_DATA_SOURCE.")
            continue
        found = {role: _find_in_dir(directory, role) for role in ROLES}
        lacking = [IDX_NAMES[r] for r, p in found.items() if p is None]
        if lacking:
            if explicit:
                raise KdpipeError(
                    f"{directory}: data source lacks {', '.join(lacking)} (.gz or uncompressed). "
                    f"Add the files, or unset data.source / KDPIPE_DATA_SOURCE to use the other sources."
                )
            continue
        arrays, hashes = {}, {}
        for role, path in found.items():
            idx = decode_verified(path.read_bytes(), path.name, files[role], str(path))
            arrays[role] = parse_idx(idx, str(path))
            hashes[role] = _sha256(idx)
        return arrays, hashes, str(directory)

    if not spec.mirrors:
        raise KdpipeError(f"{spec.name}: files not found in {', '.join(str(d) for d, _ in dirs)} and no mirror is known.")
    arrays, hashes = {}, {}
    for role in ROLES:
        raw, url = fetch_from_mirrors(spec, role)
        idx = decode_verified(raw, url, files[role], url)
        arrays[role] = parse_idx(idx, url)
        hashes[role] = _sha256(idx)
    return arrays, hashes, "download"


# -------------------------------------------------------------- build & load


def check_arrays(arrays: dict[str, torch.Tensor], where: str) -> None:
    """The four arrays must agree: images [N, H, W], labels [N]."""
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise KdpipeError(
                f"{where}: inconsistent {split} files: images {list(images.shape)} and labels {list(labels.shape)}; "
                f"expected images [N, H, W] and labels [N] with the same N. Use image and label files of the same dataset."
            )
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise KdpipeError(f"{where}: train and test images differ in size.")


def split_train_val(arrays: dict[str, torch.Tensor], val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded permutation of the training set: (train indices, validation indices), each sorted."""
    n = arrays["train_images"].shape[0]
    if val_size >= n:
        raise KdpipeError(f"params: `data.val_size` is {val_size} but the training set has only {n} images; use fewer than {n}.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def pixel_mean_std(images: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
    """Mean and (sample) standard deviation of pixel values in [0, 1], exact, in chunks.

    Integer sums in chunks keep the peak memory of the download stage low
    (a float64 copy of 55,000 images alone would be 345 MB).
    """
    total = squares = 0
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].to(torch.int64)
        total += int(block.sum())
        squares += int((block * block).sum())
    n = images.numel()
    mean = total / n
    variance = (squares - total * total / n) / (n - 1)
    return mean / 255.0, variance**0.5 / 255.0


def build_split(
    name: str, arrays: dict[str, torch.Tensor], hashes: dict[str, str], val_size: int, seed: int, classes: tuple[str, ...],
    origin: str = "",
) -> tuple[SplitData, dict[str, torch.Tensor]]:
    """In-memory split and the extra index tensors to store beside it; ``origin`` (where the files came from) is for errors."""
    check_arrays(arrays, f"{name} ({origin})" if origin else name)
    train_idx, val_idx = split_train_val(arrays, val_size, seed)
    train_labels = arrays["train_labels"].long()
    num_classes = int(max(train_labels.max(), arrays["test_labels"].long().max())) + 1
    train_images = arrays["train_images"][train_idx]
    mean, std = pixel_mean_std(train_images)
    meta = {
        "dataset": name,
        "idx_sha256": hashes,
        "val_size": val_size,
        "split_seed": seed,
        "num_classes": num_classes,
        "classes": list(classes) if classes else [str(i) for i in range(num_classes)],
        "image_shape": list(arrays["train_images"].shape[1:]),
        # Normalisation constants of the training split, rounded so JSON bytes are stable.
        "mean": round(mean, 6),
        "std": round(std, 6),
    }
    data = SplitData(
        train_images=train_images.contiguous(),
        train_labels=train_labels[train_idx].contiguous(),
        val_images=arrays["train_images"][val_idx].contiguous(),
        val_labels=train_labels[val_idx].contiguous(),
        test_images=arrays["test_images"].contiguous(),
        test_labels=arrays["test_labels"].long().contiguous(),
        meta=meta,
    )
    return data, {"train_index": train_idx, "val_index": val_idx}


def load_split(path: str | Path, *, made_by: str = "download") -> SplitData:
    """Load the compact dataset file written by the download stage."""
    from kdpipe.artifacts import load_tensors

    tensors, meta = load_tensors(path, made_by=made_by)
    missing = [k for k in TENSOR_NAMES if k not in tensors]
    if missing:
        raise KdpipeError(f"{path}: lacks tensors {', '.join(missing)}; it was not written by the download stage. Run `dvc repro {made_by}`.")
    return SplitData(**{k: tensors[k] for k in TENSOR_NAMES}, meta=meta)
