"""Teacher-logit cache: compute once, store raw float32, refuse it when stale.

The cache records the SHA-256 of the teacher weights and of the dataset file
it was computed from; a student trained from a cache whose inputs changed
would silently learn from the wrong teacher, so :func:`check_cache` refuses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe.errors import KdpipeError
from kdpipe.inference import predict_logits

SPLITS = ("train", "val")


def compute_cache(teacher: nn.Module, images: dict[str, torch.Tensor], batch_size: int) -> dict[str, torch.Tensor]:
    """``{"train_logits": [N, C] float32, "val_logits": ...}`` from the teacher in eval mode."""
    for p in teacher.parameters():
        p.requires_grad_(False)
    return {f"{split}_logits": predict_logits(teacher, images[split], batch_size).contiguous() for split in SPLITS}


def check_cache(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    *,
    teacher_sha256: str,
    data_sha256: str,
    rows: dict[str, int],
) -> None:
    """Raise unless the cache was made from exactly this teacher and data."""
    fix = "Run `dvc repro cache_logits` to recompute it."
    for name, expected in (("teacher_sha256", teacher_sha256), ("data_sha256", data_sha256)):
        if meta.get(name) != expected:
            what = "teacher weights" if name == "teacher_sha256" else "dataset"
            raise KdpipeError(
                f"{path}: stale logits cache: it was computed from {what} with SHA-256 {meta.get(name)}, "
                f"but the current {what} have {expected}. {fix}"
            )
    for split, n in rows.items():
        t = tensors.get(f"{split}_logits")
        if t is None or t.dim() != 2 or t.shape[0] != n or t.dtype != torch.float32:
            shape = None if t is None else list(t.shape)
            raise KdpipeError(f"{path}: `{split}_logits` has shape {shape}, expected [{n}, classes] float32 (one row per {split} image). {fix}")
