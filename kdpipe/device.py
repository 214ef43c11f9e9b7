"""Which device a stage computes on: ``auto`` (CUDA when available), ``cpu`` or ``cuda``."""

from __future__ import annotations

import torch

from kdpipe.errors import KdpipeError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, *, cuda_available: bool | None = None) -> torch.device:
    """Map the ``compute.device`` param to a torch device, failing clearly if CUDA is asked for but absent."""
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if name == "auto":
        return torch.device("cuda" if available else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not available:
            raise KdpipeError("params: `compute.device` is cuda but no CUDA device is available. Use auto or cpu.")
        return torch.device("cuda")
    raise KdpipeError(f"params: `compute.device` is {name!r}; valid values: {', '.join(DEVICES)}.")
