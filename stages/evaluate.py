"""Stage 5, evaluate: score teacher, distilled student and baseline on the test set.

The only stage that touches the test set. Writes metrics/eval.json (DVC
metrics), a confusion CSV per model (DVC plots) and metrics/report.md, and logs
one nested MLflow run per model so the UI compares them side by side.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import typer

from kdpipe.artifacts import atomic_write_text, write_json
from kdpipe.data import load_split
from kdpipe.inference import predict_logits
from kdpipe.metrics import accuracy, agreement, error_count, expected_calibration_error, latency_ms, nll
from kdpipe.models import load_model, param_count
from kdpipe.params import flatten, load_params
from kdpipe.report import comparison, markdown_report
from kdpipe.tracking import StageRun
from stages._common import (
    CONFUSION_DIR, DATA_FILE, METRICS_DIR, REPORT_FILE, TEACHER_FILE, VARIANTS, DebugOption, NoTrackOption,
    ParamsOption, stage_command, student_file, summary,
)


def confusion_csv(labels, predicted, classes: list[str]) -> str:
    """One row per test image (actual, predicted class names): DVC's confusion template counts them."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    for a, b in zip(labels.tolist(), predicted.tolist()):
        writer.writerow([classes[a], classes[b]])
    return out.getvalue()


@stage_command
def main(params: Path = ParamsOption, no_track: bool = NoTrackOption, debug: bool = DebugOption) -> None:
    """Score every model on the test set; write metrics/eval.json, confusion plots and metrics/report.md."""
    p = load_params(params).evaluate
    data = load_split(DATA_FILE)
    files = {"teacher": (TEACHER_FILE, "train_teacher"), **{v: (student_file(v), f"distill@{v}") for v in VARIANTS}}
    models = {name: load_model(path, made_by=stage)[0] for name, (path, stage) in files.items()}
    images, labels = data.test_images, data.test_labels
    classes = data.meta["classes"]
    eval_file = METRICS_DIR / "eval.json"
    with StageRun("evaluate", "evaluate", enabled=not no_track) as run:
        run.log_params(flatten("evaluate", p))
        logits = {name: predict_logits(model, images, p.batch_size) for name, model in models.items()}
        scores = {}
        for name, model in models.items():
            out = logits[name]
            scores[name] = {
                "accuracy": round(accuracy(out, labels), 6),
                "errors": error_count(out, labels),
                "nll": round(nll(out, labels), 6),
                "ece": round(expected_calibration_error(out, labels, p.ece_bins), 6),
                "agreement_with_teacher": round(agreement(out, logits["teacher"]), 6),
                "param_count": param_count(model),
                "file_bytes": files[name][0].stat().st_size,
                "latency_ms_b1": round(latency_ms(model, images[:1], p.latency_repeats), 4),
                "latency_ms_b256": round(latency_ms(model, images[:256], p.latency_repeats), 4),
            }
            atomic_write_text(CONFUSION_DIR / f"{name}.csv", confusion_csv(labels, out.argmax(1), classes))
        result = {**scores, "summary": comparison(scores)}
        write_json(eval_file, result)
        atomic_write_text(REPORT_FILE, markdown_report(data.meta["dataset"], scores, result["summary"]))
        for name, row in scores.items():
            run.log_metrics({f"{name}.{k}": float(v) for k, v in row.items()})
            run.log_child(f"evaluate/{name}", {f"test_{k}": float(v) for k, v in row.items()}, {"kdpipe.model": name})
        run.log_metrics({k: float(v) for k, v in result["summary"].items() if v is not None})
        run.log_artifact(REPORT_FILE)
    s = result["summary"]
    summary(
        "evaluate", [eval_file, REPORT_FILE, CONFUSION_DIR],
        f"test acc teacher {scores['teacher']['accuracy']:.4f}, kd {scores['kd']['accuracy']:.4f}, "
        f"baseline {scores['baseline']['accuracy']:.4f} (kd - baseline {s['kd_minus_baseline'] * 100:+.2f} points)",
    )


if __name__ == "__main__":
    typer.run(main)
