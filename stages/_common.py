"""What every stage command shares: file paths, error reporting, progress, summaries.

Paths are relative to the repository root (DVC runs each stage there; run the
commands by hand from there too).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import typer

from kdpipe.artifacts import load_tensors, sha256_file, write_json
from kdpipe.augment import ViewSchedule
from kdpipe.checkpoint import Checkpoint, fingerprint
from kdpipe.data import SplitData
from kdpipe.device import resolve_device
from kdpipe.errors import KdpipeError
from kdpipe.logits import check_cache
from kdpipe.losses import LossFn
from kdpipe.models import load_model, param_count, save_model
from kdpipe.params import Params
from kdpipe.student import StudentSetup, expected_cache_views, student_setup
from kdpipe.tracking import StageRun
from kdpipe.train import EpochStats, FitResult, fit_section

DATA_FILE = Path("data/dataset.safetensors")
TEACHER_FILE = Path("artifacts/teacher/model.safetensors")
LOGITS_FILE = Path("artifacts/teacher/logits.safetensors")
METRICS_DIR = Path("metrics")
HISTORY_DIR = METRICS_DIR / "history"
CONFUSION_DIR = METRICS_DIR / "confusion"
REPORT_FILE = METRICS_DIR / "report.md"
CHECKPOINT_DIR = Path(".kdpipe/checkpoints")  # outside DVC's outputs: DVC deletes outputs before a stage reruns
CODE_FILES = sorted([*Path(__file__).parent.glob("*.py"), *(Path(__file__).parents[1] / "kdpipe").glob("*.py")])


def student_file(variant: str) -> Path:
    return Path("artifacts/students") / variant / "model.safetensors"


# Options every stage takes.
ParamsOption = typer.Option(Path("params.yaml"), "--params", help="The params file (sections data, teacher, cache, distill, evaluate).")
NoTrackOption = typer.Option(False, "--no-track", help="Do not log to MLflow (e.g. when no tracking server is reachable).")
DebugOption = typer.Option(False, "--debug", help="Show full tracebacks (also KDPIPE_DEBUG=1).")


def stage_command(fn: Callable[..., None]) -> Callable[..., None]:
    """Turn user-actionable errors into one paragraph and exit 1; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        debug = kwargs.get("debug", False) or os.environ.get("KDPIPE_DEBUG") == "1"
        logging.basicConfig(level=logging.INFO if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        try:
            fn(*args, **kwargs)
        except KdpipeError as exc:
            if debug:
                traceback.print_exc()
            typer.echo(f"error: {exc}", err=True)
            if os.environ.get("DVC_STAGE"):
                typer.echo(
                    "note: DVC removed this stage's previous weights/data outputs before running it; they are still in "
                    "DVC's cache: after fixing or reverting the cause, `dvc checkout` restores them (its metrics files "
                    "are kept).",
                    err=True,
                )
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo(
                "interrupted: no output was written. Training stages keep a checkpoint of the last finished epoch in "
                f"{CHECKPOINT_DIR}/; run the stage again (or `dvc repro`) to resume from it.",
                err=True,
            )
            raise typer.Exit(130) from None
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()

    return wrapper


def summary(stage: str, wrote: list[Path | str], headline: str) -> None:
    """The one line each stage ends with."""
    typer.echo(f"{stage}: wrote {', '.join(map(str, wrote))}; {headline}")


class TrainingProgress:
    """A rich progress bar on a terminal; one plain line per epoch otherwise (logs, CI)."""

    def __init__(self, label: str, epochs: int, *, stream=None, quiet: bool = False) -> None:
        self.label, self.epochs, self.quiet = label, epochs, quiet
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() and not quiet
        self._progress: Any = None
        self._task: Any = None
        self._val = "-"

    def __enter__(self) -> "TrainingProgress":
        if self.interactive:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  val acc {task.fields[val]}"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def on_batch(self, epoch: int, step: int, steps: int, loss: float) -> None:
        if self._progress is None:
            return
        description = f"{self.label} epoch {epoch}/{self.epochs}"
        if self._task is None or step == 1:
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(description, total=steps, loss="-", val=self._val)
        if step % 10 == 0 or step == steps:
            self._progress.update(self._task, completed=step, loss=f"{loss:.4f}")

    def on_epoch(self, stats: EpochStats) -> None:
        self._val = f"{stats.val_accuracy:.4f}"
        line = (
            f"{self.label} epoch {stats.epoch}/{self.epochs}: train loss {stats.train_loss:.4f}, "
            f"val loss {stats.val_loss:.4f}, val acc {stats.val_accuracy:.4f}, {stats.seconds:.1f}s"
        )
        if self._progress is not None:
            self._progress.update(self._task, val=self._val)
            self._progress.console.print(line)
        elif not self.quiet:
            print(line, file=self.stream, flush=True)


def training_summary(result: FitResult) -> dict[str, Any]:
    """Deterministic facts about a training run (safe to store inside weights files)."""
    best = result.best
    return {"best_epoch": result.best_epoch, "val_accuracy": round(best.val_accuracy, 6), "val_loss": round(best.val_loss, 6)}


def training_metrics(result: FitResult, param_count: int) -> dict[str, Any]:
    """metrics/<name>.json content (includes timings, so never stored inside weights)."""
    seconds = [h.seconds for h in result.history]
    return {
        **training_summary(result),
        "epochs": len(result.history),
        "epoch_seconds_mean": round(sum(seconds) / len(seconds), 3),
        "train_seconds": round(sum(seconds), 3),
        "param_count": param_count,
    }


def history_rows(result: FitResult) -> list[dict[str, Any]]:
    """Per-epoch curves for DVC plots."""
    return [
        {k: (round(v, 6) if isinstance(v, float) else v) for k, v in h.as_dict().items()}
        for h in result.history
    ]


def init_distributed(device_param: str) -> tuple[int, torch.device]:
    """Join the torchrun job this process was launched in, if any; (rank, device) to train on.

    gloo on CPU, nccl on CUDA (one GPU per local rank). Without torchrun: (0, the resolved device).
    """
    device = resolve_device(device_param)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return rank, device


def train_logged(
    label: str, run: StageRun, model, data: SplitData, *, loss_fn: LossFn, soft_targets=None, teacher=None,
    views: ViewSchedule | None = None, hp: Any, inputs: dict[str, str], device: torch.device, is_main: bool = True,
) -> FitResult:
    """``fit`` with a progress display, per-epoch MLflow metrics and a per-epoch checkpoint.

    ``hp`` is the params section; ``inputs`` names the SHA-256 of every input
    file. The checkpoint resumes only under the same params, views, inputs and
    code, and is removed once training finishes.
    """
    checkpoint = Checkpoint(
        CHECKPOINT_DIR / f"{label.replace('@', '_')}.safetensors",
        fingerprint(label, dataclasses.asdict(hp), inputs, views.describe() if views else None, files=CODE_FILES),
    )
    with TrainingProgress(label, hp.epochs, quiet=not is_main) as progress:

        def on_epoch(stats: EpochStats) -> None:
            progress.on_epoch(stats)
            run.log_metrics(
                {"train_loss": stats.train_loss, "val_loss": stats.val_loss, "val_accuracy": stats.val_accuracy, "epoch_seconds": stats.seconds},
                step=stats.epoch,
            )

        result = fit_section(
            model, data, hp, loss_fn=loss_fn, soft_targets=soft_targets, teacher=teacher, views=views,
            on_batch=progress.on_batch, on_epoch=on_epoch, checkpoint=checkpoint, device=device,
        )
    if is_main:
        checkpoint.remove()
    return result


def prepare_student(variant: str, p: Params, data: SplitData, data_sha256: str) -> tuple[StudentSetup, dict[str, str]]:
    """Load what a student variant learns from (the checked cache, or the online teacher) and the
    SHA-256 of each such input, for the weights' metadata."""
    inputs = {"data_sha256": data_sha256}
    dataset = data.meta["dataset"]
    if variant == "baseline":
        return student_setup(variant, p, dataset), inputs
    inputs["teacher_sha256"] = sha256_file(TEACHER_FILE)
    if p.distill.teacher == "online":
        teacher, _ = load_model(TEACHER_FILE, made_by="train_teacher")
        return student_setup(variant, p, dataset, teacher=teacher), inputs
    cache, cache_meta = load_tensors(LOGITS_FILE, made_by="cache_logits")
    check_cache(
        LOGITS_FILE, cache, cache_meta, teacher_sha256=inputs["teacher_sha256"], data_sha256=data_sha256,
        rows={"train": data.train_labels.shape[0], "val": data.val_labels.shape[0]}, views=expected_cache_views(p, dataset),
    )
    inputs["logits_sha256"] = sha256_file(LOGITS_FILE)
    return student_setup(variant, p, dataset, cache=cache), inputs


def save_trained(name: str, run: StageRun, model, spec: dict, weights_file: Path, result: FitResult, extra_meta: dict) -> dict[str, Any]:
    """Write weights (+spec), metrics/<name>.json and its history; log them to MLflow."""
    save_model(weights_file, model, spec, {"training": training_summary(result), **extra_meta})
    metrics = training_metrics(result, param_count(model))
    write_json(METRICS_DIR / f"{name}.json", metrics)
    write_json(HISTORY_DIR / f"{name}.json", history_rows(result))
    run.log_metrics({f"best_{k}": v for k, v in training_summary(result).items()} | {"param_count": metrics["param_count"]})
    run.set_tags({"kdpipe.weights_sha256": sha256_file(weights_file)})
    run.log_artifact(weights_file)
    return metrics
