"""Scores of a classifier on a split: accuracy, NLL, calibration, agreement, latency."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).double().mean().item()


def error_count(logits: torch.Tensor, labels: torch.Tensor) -> int:
    return int((logits.argmax(1) != labels).sum())


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood (cross-entropy) in nats."""
    return F.cross_entropy(logits.double(), labels).item()


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE: sum over equal-width confidence bins of |accuracy - confidence| weighted by bin size."""
    probs = logits.double().softmax(1)
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    # Bin b holds confidences in (b/bins, (b+1)/bins]; confidence is > 0 for softmax outputs.
    bin_index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    ece = torch.zeros((), dtype=torch.float64)
    for b in range(bins):
        mask = bin_index == b
        if mask.any():
            ece += mask.double().mean() * (correct[mask].mean() - confidence[mask].mean()).abs()
    return ece.item()


def agreement(logits: torch.Tensor, reference_logits: torch.Tensor) -> float:
    """Share of samples where the top-1 class equals the reference model's."""
    return (logits.argmax(1) == reference_logits.argmax(1)).double().mean().item()


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[true class, predicted class] counts."""
    flat = labels * num_classes + logits.argmax(1)
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def latency_ms(model: nn.Module, example: torch.Tensor, repeats: int, warmup: int = 3) -> float:
    """Median wall time in milliseconds of one forward pass on ``example`` (eval, inference mode)."""
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            started = time.perf_counter()
            model(example)
            if i >= warmup:
                times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000.0
