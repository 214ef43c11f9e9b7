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


def smoothed_cross_entropy(
    student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None, *, label_smoothing: float
) -> torch.Tensor:
    """Cross-entropy against labels mixed with the uniform distribution (Szegedy et al. 2016); for teachers."""
    return F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)


def supervised_loss(label_smoothing: float) -> LossFn:
    """The teacher's loss: plain cross-entropy, or with label smoothing when asked."""
    return partial(smoothed_cross_entropy, label_smoothing=label_smoothing) if label_smoothing > 0 else cross_entropy


def blend(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    alpha: float,
    soft_term: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``(1 - alpha)·CE + alpha·soft_term(teacher_logits)``, the shape every KD loss here shares.

    With alpha = 0 it is plain cross-entropy and needs no teacher (the baseline).
    """
    ce = cross_entropy(student_logits, labels)
    if alpha == 0:
        return ce
    if teacher_logits is None:
        raise ValueError("a distillation loss with alpha > 0 needs teacher logits")
    return (1.0 - alpha) * ce + alpha * soft_term(teacher_logits)


def hinton_kd(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """``(1 - alpha)·CE(s, y) + alpha·T²·KL(softmax(t/T) || softmax(s/T))``; alpha=0 is plain CE."""
    return blend(student_logits, labels, teacher_logits, alpha, lambda t: soft_kl(student_logits, t, temperature))


def decoupled_kd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's (TCKD, NCKD), batch means, without T² (Zhao et al., CVPR 2022, eq. 2-4).

    TCKD is the KL between the binary (target, all others) distributions of
    teacher and student; NCKD the KL between their distributions over the
    non-target classes only. Per sample, KD = TCKD + (1 - p_t[target])·NCKD.
    """
    t = temperature
    target = F.one_hot(labels, student_logits.shape[1]).bool()
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    # Binary distributions: log p(target) and log(1 - p(target)) = logsumexp over the others.
    others_s = log_p_s.masked_fill(target, float("-inf")).logsumexp(1)
    others_t = log_p_t.masked_fill(target, float("-inf")).logsumexp(1)
    binary_s = torch.stack([log_p_s[target], others_s], dim=1)
    binary_t = torch.stack([log_p_t[target], others_t], dim=1)
    tckd = F.kl_div(binary_s, binary_t, reduction="batchmean", log_target=True)
    # Non-target distributions: renormalised over the other classes (the target masked out).
    log_q_s = F.log_softmax((student_logits / t).masked_fill(target, float("-inf")), dim=1).masked_fill(target, 0.0)
    log_q_t = F.log_softmax((teacher_logits / t).masked_fill(target, float("-inf")), dim=1).masked_fill(target, 0.0)
    nckd = (log_q_t.exp() * (log_q_t - log_q_s)).sum(1).mean()
    return tckd, nckd


def decoupled_kd(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """``(1 - alpha)·CE + alpha·T²·(TCKD + beta·NCKD)``.

    The paper's ``CE + a·TCKD + b·NCKD`` with a = 1, b = 8 is alpha = 0.5, beta = 8
    here, up to a global factor of 2 that Adam's update is invariant to.
    """

    def soft(teacher: torch.Tensor) -> torch.Tensor:
        tckd, nckd = decoupled_kd_terms(student_logits, teacher, labels, temperature)
        return temperature**2 * (tckd + beta * nckd)

    return blend(student_logits, labels, teacher_logits, alpha, soft)


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score each logit vector over its classes (mean 0, standard deviation 1)."""
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (std + eps)


def kd_logit_standardization(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """KD on z-scored logits (Sun et al., CVPR 2024): the student matches the teacher's
    logit *relations*, not their scale; cross-entropy stays on the raw student logits."""
    return blend(
        student_logits, labels, teacher_logits, alpha, lambda t: soft_kl(standardize(student_logits), standardize(t), temperature)
    )


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "kd": hinton_kd,
    "dkd": decoupled_kd,
    "kd_ls": kd_logit_standardization,
}


def make_loss(method: str, *, temperature: float, alpha: float, beta: float = 8.0) -> LossFn:
    """Bind a registered loss to its hyper-parameters (``beta`` is read by dkd only)."""
    extra = {"beta": beta} if method == "dkd" else {}
    return partial(LOSSES[method], temperature=temperature, alpha=alpha, **extra)
