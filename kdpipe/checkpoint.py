"""Per-epoch training checkpoints that make an interrupted stage resume bit-exactly.

A checkpoint holds everything the next epoch depends on: model and best-epoch
weights, optimizer moments, the shuffling generator and the global RNG (dropout),
and the history so far. It is a safetensors file (never a pickle) with a
fingerprint of the stage's params, inputs and code; a checkpoint written under
another fingerprint is ignored and replaced, never resumed from.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from kdpipe.artifacts import load_tensors, save_tensors
from kdpipe.errors import KdpipeError

log = logging.getLogger(__name__)


def fingerprint(*parts: Any, files: Iterable[Path] = ()) -> str:
    """SHA-256 over JSON-able parts and the bytes of ``files`` (e.g. the code)."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for path in sorted(files):
        h.update(str(path).encode())
        h.update(Path(path).read_bytes())
    return h.hexdigest()


@dataclass
class TrainState:
    epoch: int  # last finished epoch
    model: dict[str, torch.Tensor]
    best_model: dict[str, torch.Tensor]
    best_epoch: int
    best_accuracy: float
    optimizer: dict[int, dict[str, torch.Tensor]]
    shuffle_rng: torch.Tensor
    torch_rng: torch.Tensor
    history: list[dict[str, Any]]


class Checkpoint:
    """One stage's checkpoint file, written atomically after every epoch."""

    def __init__(self, path: str | Path, fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint

    def save(self, state: TrainState) -> None:
        tensors = {f"model.{k}": v for k, v in state.model.items()}
        tensors |= {f"best.{k}": v for k, v in state.best_model.items()}
        for index, slots in state.optimizer.items():
            tensors |= {f"optim.{index}.{k}": v for k, v in slots.items()}
        tensors["rng.shuffle"] = state.shuffle_rng
        tensors["rng.torch"] = state.torch_rng
        meta = {
            "fingerprint": self.fingerprint,
            "epoch": state.epoch,
            "best_epoch": state.best_epoch,
            "best_accuracy": state.best_accuracy,
            "history": state.history,
        }
        save_tensors(self.path, {k: v.detach().cpu() for k, v in tensors.items()}, meta)

    def load(self) -> TrainState | None:
        """The saved state, or None when there is none or it belongs to other params/code/inputs."""
        if not self.path.exists():
            return None
        try:
            tensors, meta = load_tensors(self.path)
        except KdpipeError as exc:
            log.warning("ignoring unreadable checkpoint %s (%s)", self.path, exc)
            return None
        if meta.get("fingerprint") != self.fingerprint:
            log.warning("ignoring checkpoint %s: written under other params, inputs or code", self.path)
            return None
        optimizer: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, slot = key.split(".", 2)
                optimizer.setdefault(int(index), {})[slot] = value
        return TrainState(
            epoch=int(meta["epoch"]),
            model={k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
            best_model={k[5:]: v for k, v in tensors.items() if k.startswith("best.")},
            best_epoch=int(meta["best_epoch"]),
            best_accuracy=float(meta["best_accuracy"]),
            optimizer=optimizer,
            shuffle_rng=tensors["rng.shuffle"],
            torch_rng=tensors["rng.torch"],
            history=list(meta["history"]),
        )

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
