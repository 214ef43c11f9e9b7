"""Batched inference: the one place models are run without gradients."""

from __future__ import annotations

import torch
from torch import nn


def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Raw float32 logits of ``model`` (switched to eval mode) for every image, in order."""
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            out.append(model(images[start : start + batch_size]).float())
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)
