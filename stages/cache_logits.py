"""Stage 3, cache_logits: run the teacher once over train and validation, store raw logits.

With augmentation (distill.augment), also the logits of ``cache.views``
deterministic augmented views of every training image: exactly the images the
students will see. The teacher runs in eval mode under inference mode with
frozen parameters. The cache records the SHA-256 of the teacher weights and of
the dataset and how its views were made, so distill can refuse a stale cache.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from kdpipe.artifacts import save_tensors, sha256_file
from kdpipe.data import load_split
from kdpipe.device import resolve_device
from kdpipe.errors import KdpipeError
from kdpipe.augment import resolve_policy
from kdpipe.logits import compute_cache, store_as, views_record
from kdpipe.metrics import accuracy
from kdpipe.models import load_model
from kdpipe.params import flatten, load_params
from kdpipe.tracking import StageRun
from stages._common import DATA_FILE, LOGITS_FILE, TEACHER_FILE, DebugOption, NoTrackOption, ParamsOption, stage_command, summary


@stage_command
def main(params: Path = ParamsOption, no_track: bool = NoTrackOption, debug: bool = DebugOption) -> None:
    """Cache the teacher's raw logits for the train and validation splits and the students' augmented views."""
    all_params = load_params(params)
    p = all_params.cache
    data = load_split(DATA_FILE)
    teacher, _ = load_model(TEACHER_FILE, made_by="train_teacher")
    policy = resolve_policy(all_params.distill.augment, data.meta["dataset"])
    views = views_record(p.views, policy, p.seed)
    with StageRun("cache_logits", "cache_logits", enabled=not no_track) as run:
        run.log_params(flatten("cache", p) | {"distill.augment": all_params.distill.augment})
        started = time.perf_counter()
        device = resolve_device(p.device)
        cache = compute_cache(
            teacher.to(device), {"train": data.train_images.to(device), "val": data.val_images.to(device)}, p.batch_size,
            views=views["count"], policy=policy, seed=p.seed,
        )
        cache, soft_error = store_as({k: v.cpu() for k, v in cache.items()}, p.dtype)
        seconds = time.perf_counter() - started
        val_acc = accuracy(cache["val_logits"].float(), data.val_labels)
        if val_acc < p.min_val_accuracy:
            raise KdpipeError(
                f"{TEACHER_FILE}: the teacher's validation accuracy is {val_acc:.4f}, below cache.min_val_accuracy "
                f"({p.min_val_accuracy}); a student would learn from a bad teacher. Train it longer (teacher.epochs) "
                f"or lower the threshold. Nothing was written."
            )
        meta = {
            "teacher_sha256": sha256_file(TEACHER_FILE),
            "data_sha256": sha256_file(DATA_FILE),
            "teacher_val_accuracy": round(val_acc, 6),
            "dtype": p.dtype,
            "soft_target_max_abs_error": soft_error,  # storage fidelity: max |softmax(exact) - softmax(stored)| at T=1
            "tempered": False,
            "views": views,
        }
        save_tensors(LOGITS_FILE, cache, meta)
        run.log_metrics({
            "teacher_val_accuracy": val_acc, "cache_seconds": seconds, "train_rows": cache["train_logits"].shape[0],
            "views": views["count"], "soft_target_max_abs_error": soft_error,
        })
        run.set_tags({"kdpipe.cache_sha256": sha256_file(LOGITS_FILE), "kdpipe.teacher_sha256": meta["teacher_sha256"]})
    rows = cache["train_logits"].shape[0] * (1 + views["count"]) + cache["val_logits"].shape[0]
    fidelity = f", {p.dtype} (max soft-target error {soft_error:.2e})" if p.dtype != "float32" else ""
    summary(
        "cache_logits", [LOGITS_FILE],
        f"{rows} rows ({views['count']} augmented views) in {seconds:.1f}s, teacher val acc {val_acc:.4f}{fidelity}",
    )


if __name__ == "__main__":
    typer.run(main)
