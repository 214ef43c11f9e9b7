"""Stage 5, evaluate: score teacher, distilled student and baseline on the test set.

The only stage that touches the test set. Writes metrics/eval.json (DVC
metrics), a confusion CSV per model (DVC plots) and metrics/report.md, and logs
one nested MLflow run per model so the UI compares them side by side.

With ``evaluate.seeds`` > 1, both students are retrained here with seeds
distill.seed+1, ... (same views, budget and teacher) and the summary reports
kd vs baseline as mean ± std over all seeds: one seed's difference is often
within run-to-run noise.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import typer

from kdpipe.artifacts import atomic_write_text, sha256_file, write_json
from kdpipe.data import SplitData, load_split
from kdpipe.device import resolve_device
from kdpipe.inference import predict_logits
from kdpipe.metrics import accuracy, agreement, error_count, expected_calibration_error, latency_ms, nll
from kdpipe.models import build_model, load_model, param_count
from kdpipe.params import Params, flatten, load_params
from kdpipe.report import comparison, markdown_report, seed_comparison
from kdpipe.student import VARIANTS
from kdpipe.tracking import StageRun
from kdpipe.train import fit_section, seed_everything
from stages._common import (
    CONFUSION_DIR, DATA_FILE, METRICS_DIR, REPORT_FILE, TEACHER_FILE, DebugOption, NoTrackOption,
    ParamsOption, prepare_student, stage_command, student_file, summary,
)


def confusion_csv(labels, predicted, classes: list[str]) -> str:
    """One row per test image (actual, predicted class names): DVC's confusion template counts them."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    for a, b in zip(labels.tolist(), predicted.tolist()):
        writer.writerow([classes[a], classes[b]])
    return out.getvalue()


def retrained_accuracies(params: Params, data: SplitData, spec: dict[str, dict], batch_size: int) -> dict[str, list[float]]:
    """Test accuracy of kd and baseline students retrained with each extra seed (distill.seed+1, ...)."""
    d = params.distill
    device = resolve_device(d.device)
    data_sha = sha256_file(DATA_FILE)
    setups = {v: prepare_student(v, params, data, data_sha)[0] for v in VARIANTS}
    out: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for seed in range(d.seed + 1, d.seed + params.evaluate.seeds):
        for variant, setup in setups.items():
            seed_everything(seed)
            model = build_model(spec[variant])
            result = fit_section(model, data, d, seed=seed, device=device, **setup.fit_kwargs())
            acc = accuracy(predict_logits(model, data.test_images, batch_size), data.test_labels)
            out[variant].append(acc)
            print(f"evaluate: seed {seed} {variant}: val acc {result.best.val_accuracy:.4f}, test acc {acc:.4f}", flush=True)
    return out


@stage_command
def main(params: Path = ParamsOption, no_track: bool = NoTrackOption, debug: bool = DebugOption) -> None:
    """Score every model on the test set; write metrics/eval.json, confusion plots and metrics/report.md."""
    all_params = load_params(params)
    p = all_params.evaluate
    data = load_split(DATA_FILE)
    files = {"teacher": (TEACHER_FILE, "train_teacher"), **{v: (student_file(v), f"distill@{v}") for v in VARIANTS}}
    loaded = {name: load_model(path, made_by=stage) for name, (path, stage) in files.items()}
    models = {name: model for name, (model, _) in loaded.items()}
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
        accuracies = {v: [scores[v]["accuracy"]] for v in VARIANTS}
        if p.seeds > 1:
            extra = retrained_accuracies(all_params, data, {v: loaded[v][1]["spec"] for v in VARIANTS}, p.batch_size)
            for v in VARIANTS:
                accuracies[v] += extra[v]
                for i, acc in enumerate(accuracies[v]):
                    run.log_metrics({f"{v}.seed_accuracy": acc}, step=all_params.distill.seed + i)
        result = {**scores, "summary": comparison(scores) | seed_comparison(scores["teacher"]["accuracy"], accuracies)}
        write_json(eval_file, result)
        atomic_write_text(REPORT_FILE, markdown_report(data.meta["dataset"], scores, result["summary"]))
        for name, row in scores.items():
            run.log_metrics({f"{name}.{k}": float(v) for k, v in row.items()})
            run.log_child(f"evaluate/{name}", {f"test_{k}": float(v) for k, v in row.items()}, {"kdpipe.model": name})
        run.log_metrics({k: float(v) for k, v in result["summary"].items() if v is not None})
        run.log_artifact(REPORT_FILE)
    s = result["summary"]
    headline = (
        f"test acc teacher {scores['teacher']['accuracy']:.4f}, kd {scores['kd']['accuracy']:.4f}, "
        f"baseline {scores['baseline']['accuracy']:.4f} (kd - baseline {s['kd_minus_baseline'] * 100:+.2f} points)"
    )
    if p.seeds > 1:
        headline += (
            f"; over {p.seeds} seeds kd {s['kd_accuracy_mean']:.4f}±{s['kd_accuracy_std']:.4f}, "
            f"baseline {s['baseline_accuracy_mean']:.4f}±{s['baseline_accuracy_std']:.4f} "
            f"({s['kd_minus_baseline_mean'] * 100:+.2f} points)"
        )
    summary("evaluate", [eval_file, REPORT_FILE, CONFUSION_DIR], headline)


if __name__ == "__main__":
    typer.run(main)
