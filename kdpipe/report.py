"""The evaluation summary: comparison numbers and a short Markdown report."""

from __future__ import annotations

from typing import Any

COLUMNS = (
    ("accuracy", "test acc", "{:.4f}"),
    ("errors", "errors", "{:d}"),
    ("nll", "NLL", "{:.4f}"),
    ("ece", "ECE", "{:.4f}"),
    ("agreement_with_teacher", "agree w/ teacher", "{:.4f}"),
    ("param_count", "params", "{:,}"),
    ("file_bytes", "file bytes", "{:,}"),
    ("latency_ms_b1", "latency b=1 (ms)", "{:.3f}"),
    ("latency_ms_b256", "latency b=256 (ms)", "{:.2f}"),
)


def comparison(scores: dict[str, dict[str, Any]]) -> dict[str, float]:
    """How much the distilled student gains over the baseline, and how much of the teacher gap it closes."""
    teacher, kd, base = (scores[k]["accuracy"] for k in ("teacher", "kd", "baseline"))
    gap = teacher - base
    return {
        "kd_minus_baseline": round(kd - base, 6),
        # Undefined when the teacher is no better than the baseline: nothing to recover.
        "gap_recovered": round((kd - base) / gap, 6) if gap > 0 else None,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return mean, std


def seed_comparison(teacher_accuracy: float, accuracies: dict[str, list[float]]) -> dict[str, float]:
    """kd vs baseline over several student seeds: mean ± std of each, the mean gain, and the
    share of the teacher-baseline gap the mean distilled student recovers."""
    kd, kd_std = mean_std(accuracies["kd"])
    base, base_std = mean_std(accuracies["baseline"])
    gap = teacher_accuracy - base
    return {
        "seeds": len(accuracies["kd"]),
        "kd_accuracy_mean": round(kd, 6),
        "kd_accuracy_std": round(kd_std, 6),
        "baseline_accuracy_mean": round(base, 6),
        "baseline_accuracy_std": round(base_std, 6),
        "kd_minus_baseline_mean": round(kd - base, 6),
        "gap_recovered_mean": round((kd - base) / gap, 6) if gap > 0 else None,
    }


def markdown_report(dataset: str, scores: dict[str, dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = [
        f"# kdpipe evaluation on the {dataset} test set",
        "",
        "| model | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for name, row in scores.items():
        lines.append(f"| {name} | " + " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS) + " |")
    gain = summary["kd_minus_baseline"] * 100
    recovered = summary["gap_recovered"]
    lines += [
        "",
        f"Distilled student minus baseline: {gain:+.2f} points of test accuracy.",
        (
            f"Share of the teacher-baseline gap recovered: {recovered * 100:.1f}%."
            if recovered is not None
            else "The teacher is no better than the baseline on this test set, so there is no gap to recover."
        ),
        "",
    ]
    if summary.get("seeds", 1) > 1:
        mean_recovered = summary["gap_recovered_mean"]
        lines += [
            f"Over {summary['seeds']} student seeds (mean ± sample std of test accuracy): "
            f"kd {summary['kd_accuracy_mean']:.4f} ± {summary['kd_accuracy_std']:.4f}, "
            f"baseline {summary['baseline_accuracy_mean']:.4f} ± {summary['baseline_accuracy_std']:.4f}; "
            f"kd minus baseline {summary['kd_minus_baseline_mean'] * 100:+.2f} points"
            + (f", {mean_recovered * 100:.1f}% of the gap recovered." if mean_recovered is not None else "."),
            "",
        ]
    lines += [
        "Latency is the median CPU wall time of one forward pass in inference mode; it varies from run to run.",
        "",
    ]
    return "\n".join(lines)
