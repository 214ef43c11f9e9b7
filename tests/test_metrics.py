import pytest
import torch

from kdpipe.metrics import accuracy, agreement, confusion_matrix, error_count, expected_calibration_error, nll


def test_scores_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 0.5]])
    labels = torch.tensor([0, 1, 1, 0])
    assert accuracy(logits, labels) == 0.5 and error_count(logits, labels) == 2
    assert agreement(logits, torch.tensor([[1.0, 0.0]] * 4)) == 0.5
    assert confusion_matrix(logits, labels, 2).tolist() == [[1, 1], [1, 1]]
    p = torch.softmax(logits.double(), 1)[torch.arange(4), labels]
    assert nll(logits, labels) == pytest.approx(-p.log().mean().item())


def test_ece_by_hand():
    # Two samples at confidence 0.9 (one right) and two at 0.6 (both right), 10 bins:
    # |0.5 - 0.9| * 2/4 + |1.0 - 0.6| * 2/4 = 0.4
    l9, l6 = torch.log(torch.tensor(9.0)).item(), torch.log(torch.tensor(1.5)).item()
    logits = torch.tensor([[l9, 0.0], [l9, 0.0], [l6, 0.0], [l6, 0.0]])
    labels = torch.tensor([0, 1, 0, 0])
    assert expected_calibration_error(logits, labels, bins=10) == pytest.approx(0.4, abs=1e-9)
