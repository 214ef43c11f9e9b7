import pytest
import torch

from kdpipe.errors import KdpipeError
from kdpipe.logits import check_cache, compute_cache
from kdpipe.models import build_model, make_spec


def test_cache_is_raw_eval_mode_logits_and_teacher_is_frozen():
    torch.manual_seed(0)
    teacher = build_model(make_spec("mlp-800", num_classes=10, image_shape=[28, 28], mean=0.2, std=0.3, dropout=0.5))
    teacher.train()
    x = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)
    cache = compute_cache(teacher, {"train": x, "val": x[:10]}, batch_size=16)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        expected = teacher(x)
    # Batch composition changes GEMM rounding in the last bits only.
    assert torch.allclose(cache["train_logits"], expected, atol=1e-5) and cache["val_logits"].shape == (10, 10)


def test_stale_or_wrong_sized_cache_is_refused():
    tensors = {"train_logits": torch.zeros(5, 10), "val_logits": torch.zeros(2, 10)}
    meta = {"teacher_sha256": "t1", "data_sha256": "d1"}
    check_cache("c", tensors, meta, teacher_sha256="t1", data_sha256="d1", rows={"train": 5, "val": 2})
    with pytest.raises(KdpipeError, match="stale logits cache.*teacher weights"):
        check_cache("c", tensors, meta, teacher_sha256="t2", data_sha256="d1", rows={"train": 5, "val": 2})
    with pytest.raises(KdpipeError, match="stale logits cache.*dataset"):
        check_cache("c", tensors, meta, teacher_sha256="t1", data_sha256="d2", rows={"train": 5, "val": 2})
    with pytest.raises(KdpipeError, match="one row per train image"):
        check_cache("c", tensors, meta, teacher_sha256="t1", data_sha256="d1", rows={"train": 6, "val": 2})
