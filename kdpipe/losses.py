"""Distillation losses, one function each, and a registry by name.

Every loss has the signature ``loss(student_logits, labels, teacher_logits)``
once its hyper-parameters are bound by :func:`make_loss`; teacher logits are
raw (the cache stores them untempered) and may be ``None`` when alpha is 0.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) averaged over the batch, times T².

    ``batchmean`` is the true KL per sample (PyTorch's ``mean`` would also
    divide by the number of classes). The T² keeps the soft term's gradient
    magnitude independent of T (Hinton et al. 2015, section 2).
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Plain supervised loss (teachers, and the no-KD baseline); ignores the teacher."""
    return F.cross_entropy(student_logits, labels)


def hinton_kd(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """``(1 - alpha)·CE(s, y) + alpha·T²·KL(softmax(t/T) || softmax(s/T))``; alpha=0 is plain CE."""
    ce = cross_entropy(student_logits, labels)
    if alpha == 0:
        return ce
    if teacher_logits is None:
        raise ValueError("hinton_kd with alpha > 0 needs teacher logits")
    return (1.0 - alpha) * ce + alpha * soft_kl(student_logits, teacher_logits, temperature)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "kd": hinton_kd,
}


def make_loss(method: str, *, temperature: float, alpha: float) -> LossFn:
    """Bind a registered loss to its hyper-parameters."""
    return partial(LOSSES[method], temperature=temperature, alpha=alpha)
