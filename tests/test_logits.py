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


def tiny_teacher():
    torch.manual_seed(0)
    return build_model(make_spec("mlp-800", num_classes=10, image_shape=[28, 28], mean=0.2, std=0.3, dropout=0.0))


def test_view_logits_are_the_teachers_logits_of_exactly_those_views():
    from kdpipe.augment import augmented_view
    from kdpipe.logits import VIEW_LOGITS

    teacher = tiny_teacher()
    x = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8)
    cache = compute_cache(teacher, {"train": x, "val": x[:5]}, batch_size=40, views=3, policy="shift-flip", seed=7)
    assert cache[VIEW_LOGITS].shape == (3, 40, 10)
    with torch.no_grad():
        for v in range(3):
            expected = teacher(augmented_view(x, seed=7, view=v, policy="shift-flip"))
            assert torch.equal(cache[VIEW_LOGITS][v], expected)
        assert not torch.allclose(cache[VIEW_LOGITS][0], teacher(x))
    assert VIEW_LOGITS not in compute_cache(teacher, {"train": x, "val": x[:5]}, batch_size=40, views=3, policy="none")


def test_float16_storage_reports_its_soft_target_error():
    from kdpipe.logits import soft_target_error, store_as

    logits = {"train_logits": torch.randn(100, 10) * 5, "val_logits": torch.randn(10, 10)}
    exact, err32 = store_as(logits, "float32")
    assert err32 == 0.0 and exact["train_logits"].dtype == torch.float32
    half, err16 = store_as(logits, "float16")
    assert half["train_logits"].dtype == torch.float16
    assert 0 < err16 < 1e-2
    assert err16 == max(soft_target_error(logits[k], half[k]) for k in logits)
    # By hand: a 2-class logit pair whose fp16 rounding is known exactly.
    z = torch.tensor([[0.0, 2049.0 / 1024]])  # 2049/1024 is not representable in fp16 and rounds to 2.0
    p_exact = torch.softmax(z, 1)[0, 1].item()
    p_half = torch.softmax(torch.tensor([[0.0, 2.0]]), 1)[0, 1].item()
    assert soft_target_error(z, z.half()) == pytest.approx(abs(p_exact - p_half), rel=1e-4)


def test_cache_made_for_other_views_is_refused():
    from kdpipe.logits import views_record

    tensors = {"train_logits": torch.zeros(5, 10), "val_logits": torch.zeros(2, 10), "train_view_logits": torch.zeros(4, 5, 10)}
    meta = {"teacher_sha256": "t", "data_sha256": "d", "views": views_record(4, "shift-flip", 0)}
    common = dict(teacher_sha256="t", data_sha256="d", rows={"train": 5, "val": 2})
    check_cache("c", tensors, meta, views=views_record(4, "shift-flip", 0), **common)
    for other in (views_record(8, "shift-flip", 0), views_record(4, "shift", 0), views_record(4, "shift-flip", 1), views_record(0, "none", 0)):
        with pytest.raises(KdpipeError, match=r"stale logits cache: it holds the teacher's logits for views .*cache.views"):
            check_cache("c", tensors, meta, views=other, **common)
    broken = {**tensors, "train_view_logits": torch.zeros(3, 5, 10)}
    with pytest.raises(KdpipeError, match=r"`train_view_logits` has shape \[3, 5, 10\], expected \[4, 5, classes\]"):
        check_cache("c", broken, meta, views=views_record(4, "shift-flip", 0), **common)
