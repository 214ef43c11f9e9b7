"""Stage 4, distill: train a student from the cached teacher logits, or the no-KD baseline.

Variant ``kd`` uses the loss named by distill.method with distill.temperature
and distill.alpha; variant ``baseline`` is the same student, seed and budget
with alpha = 0 and no teacher at all, so the gain from distillation is visible.
The teacher never runs here: its logits come from the cache, checked against
the current teacher weights and dataset.
"""

from __future__ import annotations

from pathlib import Path

import typer

from kdpipe.artifacts import load_tensors, sha256_file
from kdpipe.data import load_split
from kdpipe.errors import KdpipeError
from kdpipe.logits import check_cache
from kdpipe.losses import cross_entropy, make_loss
from kdpipe.models import build_model, make_spec
from kdpipe.params import distill_keys, load_params
from kdpipe.tracking import StageRun
from kdpipe.train import seed_everything
from stages._common import (
    DATA_FILE, LOGITS_FILE, METRICS_DIR, TEACHER_FILE, VARIANTS, DebugOption, NoTrackOption, ParamsOption,
    init_distributed, save_trained, stage_command, student_file, summary, train_logged,
)


@stage_command
def main(
    variant: str = typer.Option("kd", "--variant", help="kd: distil from the cached teacher logits; baseline: same student without a teacher (alpha=0)."),
    params: Path = ParamsOption,
    no_track: bool = NoTrackOption,
    debug: bool = DebugOption,
) -> None:
    """Train a student (distill.* params) and write artifacts/students/<variant>/model.safetensors."""
    if variant not in VARIANTS:
        raise KdpipeError(f"--variant is {variant!r}; valid variants: {', '.join(VARIANTS)}.")
    p = load_params(params).distill
    data = load_split(DATA_FILE)
    m = data.meta
    soft_targets, extra = None, {"data_sha256": sha256_file(DATA_FILE)}
    if variant == "kd":
        cache, cache_meta = load_tensors(LOGITS_FILE, made_by="cache_logits")
        check_cache(
            LOGITS_FILE, cache, cache_meta, teacher_sha256=sha256_file(TEACHER_FILE), data_sha256=extra["data_sha256"],
            rows={"train": data.train_labels.shape[0], "val": data.val_labels.shape[0]},
        )
        soft_targets = cache["train_logits"]
        loss_fn = make_loss(p.method, temperature=p.temperature, alpha=p.alpha, beta=p.beta)
        extra["teacher_sha256"] = cache_meta["teacher_sha256"]
        extra["logits_sha256"] = sha256_file(LOGITS_FILE)
    else:
        loss_fn = cross_entropy
    spec = make_spec(p.student, num_classes=m["num_classes"], image_shape=m["image_shape"], mean=m["mean"], std=m["std"], dropout=p.dropout)
    weights = student_file(variant)
    rank, device = init_distributed(p.device)  # under torchrun: one process per rank, only rank 0 writes and logs
    with StageRun("distill", f"distill@{variant}", enabled=not no_track and rank == 0) as run:
        # Log exactly the keys this variant depends on (dvc.yaml declares the same).
        run.log_params({key: getattr(p, key.split(".", 1)[1]) for key in distill_keys(variant)})
        run.set_tags({"kdpipe.variant": variant})
        seed_everything(p.seed)
        model = build_model(spec)
        result = train_logged(
            f"distill@{variant}", run, model, data, loss_fn=loss_fn, soft_targets=soft_targets, hp=p, inputs=extra,
            device=device, is_main=rank == 0,
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
