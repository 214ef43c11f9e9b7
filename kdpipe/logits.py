"""Teacher-logit cache: compute once, store raw logits, refuse it when stale.

The cache records the SHA-256 of the teacher weights and of the dataset file
it was computed from; a student trained from a cache whose inputs changed
would silently learn from the wrong teacher, so :func:`check_cache` refuses it.

With augmentation, the cache also holds ``train_view_logits`` ``[views, N, C]``:
the teacher's logits for each deterministic augmented view (kdpipe.augment),
which the student regenerates bit-exactly. The metadata records how the views
were made; a student expecting other views is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe.augment import augmented_view
from kdpipe.errors import KdpipeError
from kdpipe.inference import predict_logits

SPLITS = ("train", "val")
VIEW_LOGITS = "train_view_logits"
CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def compute_cache(
    teacher: nn.Module,
    images: dict[str, torch.Tensor],
    batch_size: int,
    *,
    views: int = 0,
    policy: str = "none",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """``{"train_logits": [N, C], "val_logits": ...}`` float32 from the teacher in eval mode.

    With ``views > 0`` (and a policy other than ``none``), adds ``train_view_logits``
    ``[views, N, C]``: the logits of view ``v`` of every training image.
    """
    for p in teacher.parameters():
        p.requires_grad_(False)
    cache = {f"{split}_logits": predict_logits(teacher, images[split], batch_size).contiguous() for split in SPLITS}
    if views > 0 and policy != "none":
        cache[VIEW_LOGITS] = torch.stack(
            [predict_logits(teacher, augmented_view(images["train"], seed=seed, view=v, policy=policy), batch_size) for v in range(views)]
        ).contiguous()
    return cache


def soft_target_error(exact: torch.Tensor, stored: torch.Tensor) -> float:
    """Largest absolute difference of any soft-target probability at T = 1 caused by storing ``stored``.

    T = 1 is the sharpest case the cache serves: a higher temperature divides
    every logit error by T before the softmax.
    """
    if exact.numel() == 0:
        return 0.0
    return (exact.softmax(-1) - stored.float().softmax(-1)).abs().max().item()


def store_as(cache: dict[str, torch.Tensor], dtype: str) -> tuple[dict[str, torch.Tensor], float]:
    """The cache in the storage dtype, and the soft-target error that costs (0.0 for float32)."""
    target = CACHE_DTYPES[dtype]
    stored = {k: v.to(target) for k, v in cache.items()}
    error = max(soft_target_error(cache[k], stored[k]) for k in cache) if target != torch.float32 else 0.0
    return stored, error


def views_record(views: int, policy: str, seed: int) -> dict[str, Any]:
    """How the cached views were made, as stored in (and compared against) the cache metadata."""
    if views == 0 or policy == "none":
        return {"count": 0}
    return {"count": views, "policy": policy, "seed": seed}


def check_cache(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    *,
    teacher_sha256: str,
    data_sha256: str,
    rows: dict[str, int],
    views: dict[str, Any] | None = None,
) -> None:
    """Raise unless the cache was made from exactly this teacher, data (and views, when given)."""
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
        if t is None or t.dim() != 2 or t.shape[0] != n or t.dtype not in CACHE_DTYPES.values():
            shape = None if t is None else list(t.shape)
            raise KdpipeError(f"{path}: `{split}_logits` has shape {shape}, expected [{n}, classes] float (one row per {split} image). {fix}")
    if views is None:
        return
    recorded = meta.get("views", {"count": 0})
    if recorded != views:
        raise KdpipeError(
            f"{path}: stale logits cache: it holds the teacher's logits for views {recorded}, but the student "
            f"would train on views {views} (cache.views, cache.seed, distill.augment). {fix}"
        )
    if views["count"]:
        t = tensors.get(VIEW_LOGITS)
        expected = [views["count"], rows["train"]]
        if t is None or t.dim() != 3 or list(t.shape[:2]) != expected or t.dtype not in CACHE_DTYPES.values():
            shape = None if t is None else list(t.shape)
            raise KdpipeError(f"{path}: `{VIEW_LOGITS}` has shape {shape}, expected [{expected[0]}, {expected[1]}, classes]. {fix}")
