import pytest
import torch

from kdpipe.device import resolve_device
from kdpipe.errors import KdpipeError


def test_auto_follows_cuda_availability():
    assert resolve_device("auto", cuda_available=False) == torch.device("cpu")
    assert resolve_device("auto", cuda_available=True) == torch.device("cuda")


def test_explicit_choices():
    assert resolve_device("cpu", cuda_available=True) == torch.device("cpu")
    assert resolve_device("cuda", cuda_available=True) == torch.device("cuda")
    with pytest.raises(KdpipeError, match="no CUDA device is available"):
        resolve_device("cuda", cuda_available=False)
    with pytest.raises(KdpipeError, match="valid values: auto, cpu, cuda"):
        resolve_device("tpu")


def test_this_machine_resolves_auto_to_what_torch_reports():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
