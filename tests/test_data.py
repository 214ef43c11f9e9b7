import functools
import gzip
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch

from kdpipe import data as kdata
from kdpipe.data import (
    DATASETS, IDX_NAMES, DatasetSpec, FileSpec, build_split, decode_verified, encode_idx, parse_idx,
    read_dataset_files, split_train_val,
)
from kdpipe.errors import KdpipeError
from tests.conftest import write_idx_dir


def test_idx_round_trip():
    x = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 3, 4)
    assert torch.equal(parse_idx(encode_idx(x)), x)
    y = torch.tensor([3, 1, 4], dtype=torch.uint8)
    assert torch.equal(parse_idx(encode_idx(y)), y)


def test_idx_header_layout_is_big_endian():
    blob = encode_idx(torch.zeros(2, 3, 4, dtype=torch.uint8))
    assert blob[:4] == bytes([0, 0, 8, 3])
    assert blob[4:16] == (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (4).to_bytes(4, "big")


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc", "bad magic"),
        (b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc", "not supported"),
        (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc", r"declares shape \[5\]"),
        (b"\x00\x00\x08\x03" + (5).to_bytes(4, "big"), "truncated"),
        (b"", "bad magic"),
    ],
)
def test_idx_rejects_bad_files(blob, message):
    with pytest.raises(KdpipeError, match=message):
        parse_idx(blob, "f.idx")


def test_gz_accepted_by_idx_sha256_even_if_recompressed():
    idx = encode_idx(torch.ones(4, dtype=torch.uint8))
    spec = FileSpec(md5_gz="0" * 32, sha256_idx=hashlib.sha256(idx).hexdigest())
    assert decode_verified(gzip.compress(idx, compresslevel=1), "x.gz", spec, "x.gz") == idx


def test_gz_accepted_by_official_md5_when_idx_hash_unknown():
    idx = encode_idx(torch.ones(4, dtype=torch.uint8))
    gz = gzip.compress(idx, mtime=0)
    spec = FileSpec(md5_gz=hashlib.md5(gz).hexdigest(), sha256_idx=None)
    assert decode_verified(gz, "x.gz", spec, "x.gz") == idx


def test_md5_mismatch_rejected_when_idx_hash_unknown():
    gz = gzip.compress(encode_idx(torch.ones(4, dtype=torch.uint8)), mtime=0)
    with pytest.raises(KdpipeError, match="cannot be verified"):
        decode_verified(gz, "x.gz", FileSpec(md5_gz="f" * 32, sha256_idx=None), "x.gz")


def test_checksum_mismatch_and_corrupt_archive_rejected():
    idx = encode_idx(torch.ones(4, dtype=torch.uint8))
    with pytest.raises(KdpipeError, match="checksum mismatch"):
        decode_verified(idx, "x", FileSpec(None, "0" * 64), "x")
    gz = gzip.compress(idx)
    with pytest.raises(KdpipeError, match="truncated or corrupt"):
        decode_verified(gz[: len(gz) // 2], "x.gz", FileSpec(None, hashlib.sha256(idx).hexdigest()), "x.gz")


def test_local_dataset_reads_and_verifies(idx_dir):
    arrays, hashes, origin = read_dataset_files(DATASETS["local"], str(idx_dir))
    assert arrays["train_images"].shape == (300, 28, 28) and arrays["test_labels"].shape == (100,)
    assert origin == str(idx_dir) and set(hashes) == set(IDX_NAMES)


def test_explicit_source_lacking_files_is_an_error(tmp_path, idx_dir):
    (idx_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(KdpipeError, match="lacks t10k-labels-idx1-ubyte"):
        read_dataset_files(DATASETS["local"], str(idx_dir))
    with pytest.raises(KdpipeError, match="does not exist"):
        read_dataset_files(DATASETS["fashion-mnist"], str(tmp_path / "nowhere"))


def test_env_source_is_searched(monkeypatch, tmp_path):
    content = write_idx_dir(tmp_path / "env")
    files = {role: FileSpec(None, hashlib.sha256(b).hexdigest()) for role, b in content.items()}
    spec = DatasetSpec(name="tiny", mirrors=(), files=files)
    monkeypatch.setenv("KDPIPE_DATA_SOURCE", str(tmp_path / "env"))
    _, _, origin = read_dataset_files(spec, "")
    assert origin == str(tmp_path / "env")


def test_download_from_mirror_verifies_official_md5(tmp_path, monkeypatch):
    """The real download code against a local HTTP mirror serving tiny archives."""
    served = tmp_path / "mirror"
    write_idx_dir(served, checksums=False)
    md5 = {role: hashlib.md5((served / f"{IDX_NAMES[role]}.gz").read_bytes()).hexdigest() for role in IDX_NAMES}
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(kdata, "SYSTEM_DATA_ROOT", tmp_path / "no-system-data")
    monkeypatch.delenv("KDPIPE_DATA_SOURCE", raising=False)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        dead = "http://127.0.0.1:9/"  # first mirror refuses: the next one is tried
        good = DatasetSpec("tiny", (dead, url), {r: FileSpec(m, None) for r, m in md5.items()})
        arrays, _, origin = read_dataset_files(good, "")
        assert origin == "download" and arrays["train_images"].shape == (300, 28, 28)
        bad = DatasetSpec("tiny", (url,), {**good.files, "test_images": FileSpec("0" * 32, None)})
        with pytest.raises(KdpipeError, match="cannot be verified"):
            read_dataset_files(bad, "")
    finally:
        server.shutdown()


def test_split_is_deterministic_and_disjoint(idx_dir):
    arrays, hashes, _ = read_dataset_files(DATASETS["local"], str(idx_dir))
    a_train, a_val = split_train_val(arrays, 50, 7)
    b_train, b_val = split_train_val(arrays, 50, 7)
    assert torch.equal(a_train, b_train) and torch.equal(a_val, b_val)
    assert len(set(a_train.tolist()) & set(a_val.tolist())) == 0 and len(a_train) + len(a_val) == 300
    with pytest.raises(KdpipeError, match="val_size"):
        split_train_val(arrays, 300, 0)
    data, index = build_split("local", arrays, hashes, 50, 7, ())
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    assert torch.equal(data.val_images, arrays["train_images"][index["val_index"]])


def test_registry_md5s_match_torchvision():
    from torchvision import datasets as tv

    for name, cls in (("mnist", tv.MNIST), ("fashion-mnist", tv.FashionMNIST), ("kmnist", tv.KMNIST)):
        ours = {IDX_NAMES[r] + ".gz": f.md5_gz for r, f in DATASETS[name].files.items()}
        assert ours == dict(cls.resources)
        assert tuple(DATASETS[name].mirrors) == tuple(cls.mirrors)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Debian's dataset-fashion-mnist not installed")
def test_debian_fashion_mnist_labels_verify():
    spec = DATASETS["fashion-mnist"]
    path = Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
    idx = decode_verified(path.read_bytes(), path.name, spec.files["test_labels"], str(path))
    assert parse_idx(idx).shape == (10000,)


def test_pixel_mean_std_matches_float64():
    from kdpipe.data import pixel_mean_std

    x = torch.randint(0, 256, (1000, 7, 7), dtype=torch.uint8)
    mean, std = pixel_mean_std(x, chunk=64)
    ref = x.double() / 255
    assert mean == pytest.approx(ref.mean().item(), abs=1e-12) and std == pytest.approx(ref.std().item(), abs=1e-9)
