"""What a student trains on: loss, soft targets or online teacher, and augmented views.

Both distill variants and evaluate's extra seeds build their students here, so
the distilled student and its no-KD baseline always see the same images in the
same order, and differ only in the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdpipe.augment import ViewSchedule, resolve_policy
from kdpipe.losses import LossFn, cross_entropy, make_loss
from kdpipe.logits import VIEW_LOGITS, views_record
from kdpipe.params import Params

VARIANTS = ("kd", "baseline")  # distilled student, and the same student without a teacher


@dataclass
class StudentSetup:
    loss_fn: LossFn
    soft_targets: torch.Tensor | None  # cached logits: [N, C], or [views, N, C] with augmentation
    teacher: nn.Module | None  # online teacher (distill.teacher: online)
    views: ViewSchedule | None  # the augmented views each epoch trains on; None = un-augmented images

    def fit_kwargs(self) -> dict[str, Any]:
        """The ``fit`` arguments this setup decides."""
        return {"loss_fn": self.loss_fn, "soft_targets": self.soft_targets, "teacher": self.teacher, "views": self.views}

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for metadata, checkpoint fingerprints and logs."""
        return {"views": self.views.describe() if self.views else None, "online_teacher": self.teacher is not None}


def student_views(p: Params, dataset: str) -> ViewSchedule | None:
    """The views a student trains on, identical for kd and baseline.

    With the cached teacher, epochs cycle through the cache's ``cache.views``
    views; with an online teacher, every epoch gets a fresh view. Both use
    ``cache.seed``. (params validation refuses augmentation with ``views: 0``
    and a cached teacher.)
    """
    policy = resolve_policy(p.distill.augment, dataset)
    if policy == "none":
        return None
    cycle = None if p.distill.teacher == "online" else p.cache.views
    return ViewSchedule(policy, p.cache.seed, cycle)


def expected_cache_views(p: Params, dataset: str) -> dict[str, Any]:
    """The ``views`` record a cache must carry to teach a student under these params."""
    policy = resolve_policy(p.distill.augment, dataset)
    return views_record(p.cache.views, policy, p.cache.seed)


def student_setup(
    variant: str,
    p: Params,
    dataset: str,
    *,
    cache: dict[str, torch.Tensor] | None = None,
    teacher: nn.Module | None = None,
) -> StudentSetup:
    """Everything but the model: ``cache`` (checked by the caller) for kd from the cache,
    ``teacher`` for kd with ``distill.teacher: online``; the baseline needs neither."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    views = student_views(p, dataset)
    if variant == "baseline":
        return StudentSetup(cross_entropy, None, None, views)
    d = p.distill
    loss_fn = make_loss(d.method, temperature=d.temperature, alpha=d.alpha, beta=d.beta)
    if d.teacher == "online":
        if teacher is None:
            raise ValueError("distill.teacher is online: pass the teacher model")
        return StudentSetup(loss_fn, None, teacher, views)
    if cache is None:
        raise ValueError("distill.teacher is cache: pass the checked logits cache")
    soft = cache[VIEW_LOGITS] if views is not None else cache["train_logits"]
    return StudentSetup(loss_fn, soft.float(), None, views)
