"""Deterministic augmented views: a view is a pure function of (seed, view, image index).

A cached teacher logit is exact only for the image the teacher saw, so the
student must see *the same* augmented image when it reads that logit (Beyer et
al. 2022, "patient and consistent"; FKD, Shen & Xing 2022, stores crop
coordinates for the same reason). Here the transform of image ``i`` in view
``v`` is derived from a counter-based hash of ``(seed, v, i)``: nothing is
stored, any stage can regenerate the view bit-exactly, and the result does not
depend on batch order, batch size or how many images there are.

Transforms: a random shift of up to ``MAX_SHIFT`` pixels in each direction
(zero fill, as in Hinton et al. 2015) and, where the dataset allows it, a
horizontal flip (valid for clothes, not for digits or characters).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe.errors import KdpipeError

MAX_SHIFT = 2  # pixels, each direction
VIEW_POLICIES = ("flip", "shift", "shift-flip")  # the policies that change images
POLICIES = ("auto", "none", *VIEW_POLICIES)
# What `auto` means per dataset: flips change the meaning of digits and characters.
DATASET_POLICY = {"fashion-mnist": "shift-flip", "mnist": "shift", "kmnist": "shift", "local": "shift"}

# Independent streams of views: the teacher trains on other views than those the cache and the
# students use, so the cached logits are never those of images the teacher was fitted on.
STREAMS = {"student": 0, "teacher": 1}


def resolve_policy(policy: str, dataset: str) -> str:
    """``auto`` -> the dataset's default policy; anything else is returned as given (validated)."""
    if policy not in POLICIES:
        raise KdpipeError(f"unknown augmentation {policy!r}; valid values: {', '.join(POLICIES)}.")
    if policy == "auto":
        return DATASET_POLICY.get(dataset, "shift")
    return policy


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective 64-bit mix, so neighbouring counters give unrelated bits."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def view_transforms(seed: int, view: int, n: int, policy: str, stream: str = "student") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dy, flip)`` for images ``0..n-1`` of one view: int64, int64, bool tensors of length n.

    Image ``i`` gets the same transform whatever ``n`` is: the hash input is the
    counter ``(stream, seed, view, i)`` itself.
    """
    if policy not in ("none", *VIEW_POLICIES):
        raise ValueError(f"resolve the augmentation policy first (got {policy!r})")
    if seed < 0 or view < 0:
        raise ValueError("seed and view must be non-negative")
    zero = torch.zeros(n, dtype=torch.int64)
    if policy == "none":
        return zero, zero.clone(), torch.zeros(n, dtype=torch.bool)
    key = np.uint64(STREAMS[stream])
    for part in (seed, view):
        key = _splitmix64(np.array([key ^ np.uint64(part)], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        h = _splitmix64(np.arange(n, dtype=np.uint64) + key)
    span = np.uint64(2 * MAX_SHIFT + 1)
    dx = torch.from_numpy((h % span).astype(np.int64) - MAX_SHIFT)
    dy = torch.from_numpy(((h >> np.uint64(8)) % span).astype(np.int64) - MAX_SHIFT)
    flip = torch.from_numpy(((h >> np.uint64(16)) & np.uint64(1)).astype(bool))
    if policy == "shift":
        flip = torch.zeros(n, dtype=torch.bool)
    if policy == "flip":
        dx, dy = zero, zero.clone()
    return dx, dy, flip


def apply_transforms(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Shift each ``[H, W]`` image by (dx, dy) pixels with zero fill, then flip it left-right where asked.

    One gather over a zero-padded copy; works on any dtype and device.
    """
    n, h, w = images.shape
    m = MAX_SHIFT
    device = images.device
    dx, dy, flip = dx.to(device), dy.to(device), flip.to(device)
    padded = F.pad(images.reshape(n, 1, h, w), (m, m, m, m)).reshape(n, h + 2 * m, w + 2 * m)
    cols = torch.arange(w, device=device)
    cols = torch.where(flip[:, None], cols.flip(0)[None, :], cols[None, :])  # output col j reads input col w-1-j
    rows = torch.arange(h, device=device)[None, :] + m - dy[:, None]  # content moves down by dy
    cols = cols + m - dx[:, None]  # and right by dx
    return padded[torch.arange(n, device=device)[:, None, None], rows[:, :, None], cols[:, None, :]]


def augmented_view(images: torch.Tensor, *, seed: int, view: int, policy: str, stream: str = "student") -> torch.Tensor:
    """View ``view`` of every image (``[N, H, W]``, any dtype); ``none`` returns the images unchanged."""
    if policy == "none":
        return images
    dx, dy, flip = view_transforms(seed, view, images.shape[0], policy, stream)
    return apply_transforms(images, dx, dy, flip)


class ViewSchedule:
    """Which view each epoch trains on: a fresh one per epoch, or a cycle through ``cycle`` cached views.

    Epoch ``e`` (1-based) uses view ``(e - 1) % cycle``, or ``e - 1`` without a cycle.
    """

    def __init__(self, policy: str, seed: int, cycle: int | None = None, stream: str = "student") -> None:
        if policy not in VIEW_POLICIES:
            raise ValueError(f"a view schedule needs an augmentation policy, got {policy!r}")
        if cycle is not None and cycle < 1:
            raise ValueError("cycle must be at least 1")
        self.policy, self.seed, self.cycle, self.stream = policy, seed, cycle, stream

    def view(self, epoch: int) -> int:
        return (epoch - 1) % self.cycle if self.cycle else epoch - 1

    def images(self, images: torch.Tensor, epoch: int) -> torch.Tensor:
        return augmented_view(images, seed=self.seed, view=self.view(epoch), policy=self.policy, stream=self.stream)

    def describe(self) -> dict[str, object]:
        """JSON-able record for metadata and logs."""
        return {"policy": self.policy, "seed": self.seed, "cycle": self.cycle, "stream": self.stream, "max_shift": MAX_SHIFT}
