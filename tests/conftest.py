"""Shared fixtures: tiny, learnable IDX datasets the tests generate (no network)."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest
import torch

from kdpipe.data import IDX_NAMES, encode_idx

REPO = Path(__file__).resolve().parents[1]


def make_images(n: int, seed: int, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise plus a bright class-specific horizontal band: easy but not trivial to learn."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    images = torch.randint(0, 90, (n, 28, 28), generator=g, dtype=torch.int64)
    for i, c in enumerate(labels.tolist()):
        row = 2 + 2 * c
        images[i, row : row + 2, 4:24] += 160
    return images.clamp(0, 255).to(torch.uint8), labels.to(torch.uint8)


def write_idx_dir(directory: Path, n_train: int = 300, n_test: int = 100, *, gz: bool = True, checksums: bool = True) -> dict[str, bytes]:
    """Write the four IDX files (gzipped by default) and a SHA256SUMS; return the IDX bytes by role."""
    directory.mkdir(parents=True, exist_ok=True)
    train_x, train_y = make_images(n_train, 1)
    test_x, test_y = make_images(n_test, 2)
    content = {
        "train_images": encode_idx(train_x),
        "train_labels": encode_idx(train_y),
        "test_images": encode_idx(test_x),
        "test_labels": encode_idx(test_y),
    }
    lines = []
    for role, data in content.items():
        name = IDX_NAMES[role]
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
        else:
            (directory / name).write_bytes(data)
        lines.append(f"{hashlib.sha256(data).hexdigest()}  {name}")
    if checksums:
        (directory / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return content


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    d = tmp_path / "idx"
    write_idx_dir(d)
    return d
