"""safetensors files with one JSON metadata entry, and atomic writes.

safetensors (0.8) writes metadata keys in a random order (safetensors#584), so
two saves of the same tensors could differ in bytes and make DVC rerun
everything downstream. We store a single key, ``kdpipe``, holding JSON with
sorted keys. Every file is written to a temp file in the same directory,
fsynced and renamed, so a crash or an error never leaves half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kdpipe.errors import KdpipeError

META_KEY = "kdpipe"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise KdpipeError(
            f"{path}: cannot write it ({exc.strerror or exc}). Check free disk space and write permission on "
            f"{path.parent}; the previous version of the file, if any, is untouched."
        ) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    """JSON with sorted keys and a trailing newline: stable bytes for DVC."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Save tensors plus metadata (any JSON-able dict) deterministically and atomically."""
    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    blob = st_save(contiguous, metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    atomic_write_bytes(path, blob)


def load_tensors(path: str | Path, *, made_by: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a file written by :func:`save_tensors`; never unpickles.

    ``made_by`` names the stage that writes the file, for the error a user sees
    when it is missing.
    """
    path = Path(path)
    hint = f" Run `dvc repro {made_by}` to make it." if made_by else ""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KdpipeError(f"{path}: file not found.{hint}") from None
    try:
        tensors = st_load(data)
        # The metadata lives in the JSON header: 8-byte little-endian length, then JSON.
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise KdpipeError(
            f"{path}: not a valid safetensors file ({exc}); it may be truncated or of another format.{hint}"
        ) from None
    raw_meta = (header.get("__metadata__") or {}).get(META_KEY)
    if raw_meta is None:
        raise KdpipeError(f"{path}: has no kdpipe metadata, so it was not written by kdpipe.{hint}")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as exc:
        raise KdpipeError(f"{path}: its kdpipe metadata is not valid JSON ({exc}).{hint}") from None
    if not isinstance(meta, dict):
        raise KdpipeError(f"{path}: its kdpipe metadata must be a JSON object.{hint}")
    return tensors, meta
