"""The evaluation summary: gains, gap recovered and the seed comparison, by hand."""

import pytest

from kdpipe.report import comparison, markdown_report, mean_std, seed_comparison


def test_mean_and_sample_std_by_hand():
    assert mean_std([0.5]) == (0.5, 0.0)
    mean, std = mean_std([0.88, 0.90, 0.92])
    assert mean == pytest.approx(0.90) and std == pytest.approx(0.02)  # sqrt((0.02^2 + 0 + 0.02^2) / 2)


def test_seed_comparison_by_hand():
    s = seed_comparison(0.93, {"kd": [0.905, 0.907, 0.903], "baseline": [0.895, 0.897, 0.899]})
    assert s["seeds"] == 3
    assert s["kd_accuracy_mean"] == pytest.approx(0.905) and s["kd_accuracy_std"] == pytest.approx(0.002)
    assert s["baseline_accuracy_mean"] == pytest.approx(0.897) and s["baseline_accuracy_std"] == pytest.approx(0.002)
    assert s["kd_minus_baseline_mean"] == pytest.approx(0.008)
    assert s["gap_recovered_mean"] == pytest.approx(0.008 / 0.033, abs=1e-6)
    assert seed_comparison(0.89, {"kd": [0.9], "baseline": [0.9]})["gap_recovered_mean"] is None  # no gap


def test_report_states_the_seed_comparison_only_with_several_seeds():
    row = {"accuracy": 0.9, "errors": 1000, "nll": 0.3, "ece": 0.02, "agreement_with_teacher": 0.95, "param_count": 10,
           "file_bytes": 100, "latency_ms_b1": 0.1, "latency_ms_b256": 1.0}
    scores = {"teacher": {**row, "accuracy": 0.93}, "kd": {**row, "accuracy": 0.91}, "baseline": row}
    one = comparison(scores) | seed_comparison(0.93, {"kd": [0.91], "baseline": [0.9]})
    assert "student seeds" not in markdown_report("x", scores, one)
    three = comparison(scores) | seed_comparison(0.93, {"kd": [0.91, 0.912, 0.908], "baseline": [0.9, 0.901, 0.899]})
    text = markdown_report("x", scores, three)
    assert "Over 3 student seeds" in text and "kd 0.9100 ± 0.0020" in text and "+1.00 points" in text and "33.3% of the gap" in text
