"""Stage 4, distill: train a student from the cached teacher logits, or the no-KD baseline.

Variant ``kd`` uses the loss named by distill.method with distill.temperature
and distill.alpha; variant ``baseline`` is the same student, seed, budget and
augmented views with alpha = 0 and no teacher at all, so the gain from
distillation is visible. By default the teacher never runs here: its logits
(for exactly the augmented views the student sees) come from the cache,
checked against the current teacher weights, dataset and views.
"""

from __future__ import annotations

from pathlib import Path

import typer

from kdpipe.artifacts import sha256_file
from kdpipe.data import load_split
from kdpipe.errors import KdpipeError
from kdpipe.models import build_model, make_spec
from kdpipe.params import distill_keys, load_params, value_of
from kdpipe.student import VARIANTS
from kdpipe.tracking import StageRun
from kdpipe.train import seed_everything
from stages._common import (
    DATA_FILE, METRICS_DIR, DebugOption, NoTrackOption, ParamsOption, init_distributed, prepare_student,
    save_trained, stage_command, student_file, summary, train_logged,
)


@stage_command
def main(
    variant: str = typer.Option("kd", "--variant", help="kd: distil from the teacher's cached logits; baseline: same student and views without a teacher (alpha=0)."),
    params: Path = ParamsOption,
    no_track: bool = NoTrackOption,
    debug: bool = DebugOption,
) -> None:
    """Train a student (distill.* params) and write artifacts/students/<variant>/model.safetensors."""
    if variant not in VARIANTS:
        raise KdpipeError(f"--variant is {variant!r}; valid variants: {', '.join(VARIANTS)}.")
    all_params = load_params(params)
    p = all_params.distill
    data = load_split(DATA_FILE)
    m = data.meta
    setup, inputs = prepare_student(variant, all_params, data, sha256_file(DATA_FILE))
    extra = {**inputs, "student": setup.describe()}
    spec = make_spec(p.student, num_classes=m["num_classes"], image_shape=m["image_shape"], mean=m["mean"], std=m["std"], dropout=p.dropout)
    weights = student_file(variant)
    rank, device = init_distributed(p.device)  # under torchrun: one process per rank, only rank 0 writes and logs
    with StageRun("distill", f"distill@{variant}", enabled=not no_track and rank == 0) as run:
        # Log exactly the keys this variant depends on (dvc.yaml declares the same).
        run.log_params({key: value_of(all_params, key) for key in distill_keys(variant)})
        run.set_tags({"kdpipe.variant": variant})
        seed_everything(p.seed)
        model = build_model(spec)
        result = train_logged(
            f"distill@{variant}", run, model, data, **setup.fit_kwargs(), hp=p, inputs=inputs, device=device, is_main=rank == 0,
        )
        if rank != 0:
            return
        metrics = save_trained(f"distill_{variant}", run, model, spec, weights, result, extra)
    summary(
        f"distill@{variant}", [weights, METRICS_DIR / f"distill_{variant}.json"],
        f"val acc {metrics['val_accuracy']:.4f} (best epoch {metrics['best_epoch']}/{p.epochs}), {metrics['epoch_seconds_mean']:.1f}s/epoch",
    )


if __name__ == "__main__":
    typer.run(main)
