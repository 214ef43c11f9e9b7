"""Stage 2, train_teacher: train the teacher on the training split, pick its epoch on validation.

With augmentation, every epoch sees a fresh deterministic view of each image
(a stream of views separate from the ones the cache and the students use).
"""

from __future__ import annotations

from pathlib import Path

import typer

from kdpipe.artifacts import sha256_file
from kdpipe.data import load_split
from kdpipe.augment import ViewSchedule, resolve_policy
from kdpipe.losses import supervised_loss
from kdpipe.models import build_model, make_spec
from kdpipe.params import flatten, load_params
from kdpipe.tracking import StageRun
from kdpipe.train import seed_everything
from stages._common import (
    DATA_FILE, METRICS_DIR, TEACHER_FILE, DebugOption, NoTrackOption, ParamsOption, init_distributed, save_trained,
    stage_command, summary, train_logged,
)


@stage_command
def main(params: Path = ParamsOption, no_track: bool = NoTrackOption, debug: bool = DebugOption) -> None:
    """Train the teacher (teacher.* params) and write artifacts/teacher/model.safetensors."""
    p = load_params(params).teacher
    data = load_split(DATA_FILE)
    m = data.meta
    spec = make_spec(p.model, num_classes=m["num_classes"], image_shape=m["image_shape"], mean=m["mean"], std=m["std"], dropout=p.dropout)
    rank, device = init_distributed(p.device)  # under torchrun: one process per rank, only rank 0 writes and logs
    with StageRun("train_teacher", "teacher", enabled=not no_track and rank == 0) as run:
        run.log_params(flatten("teacher", p))
        seed_everything(p.seed)
        model = build_model(spec)
        data_sha = sha256_file(DATA_FILE)
        policy = resolve_policy(p.augment, m["dataset"])
        views = ViewSchedule(policy, p.seed, stream="teacher") if policy != "none" else None
        result = train_logged(
            "teacher", run, model, data, loss_fn=supervised_loss(p.label_smoothing), views=views, hp=p, inputs={"data": data_sha},
            device=device, is_main=rank == 0,
        )
        if rank != 0:
            return
        metrics = save_trained(
            "teacher", run, model, spec, TEACHER_FILE, result, {"data_sha256": data_sha, "views": views.describe() if views else None}
        )
    summary(
        "train_teacher", [TEACHER_FILE, METRICS_DIR / "teacher.json"],
        f"val acc {metrics['val_accuracy']:.4f} (best epoch {metrics['best_epoch']}/{p.epochs}), {metrics['epoch_seconds_mean']:.1f}s/epoch",
    )


if __name__ == "__main__":
    typer.run(main)
