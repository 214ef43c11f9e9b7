"""Augmented views: pure functions of (stream, seed, view, index), exact shifts and flips."""

import pytest
import torch

from kdpipe.augment import MAX_SHIFT, ViewSchedule, apply_transforms, augmented_view, resolve_policy, view_transforms
from kdpipe.errors import KdpipeError


def test_shift_moves_content_and_fills_with_zeros():
    x = torch.arange(1, 17, dtype=torch.uint8).reshape(1, 4, 4)
    right = apply_transforms(x, torch.tensor([1]), torch.tensor([0]), torch.tensor([False]))
    assert right[0].tolist() == [[0, 1, 2, 3], [0, 5, 6, 7], [0, 9, 10, 11], [0, 13, 14, 15]]
    up = apply_transforms(x, torch.tensor([0]), torch.tensor([-2]), torch.tensor([False]))
    assert up[0].tolist() == [[9, 10, 11, 12], [13, 14, 15, 16], [0, 0, 0, 0], [0, 0, 0, 0]]
    flipped = apply_transforms(x, torch.tensor([0]), torch.tensor([0]), torch.tensor([True]))
    assert flipped[0].tolist() == [[4, 3, 2, 1], [8, 7, 6, 5], [12, 11, 10, 9], [16, 15, 14, 13]]


def test_each_image_gets_its_own_transform():
    x = torch.arange(1, 17, dtype=torch.uint8).reshape(1, 4, 4).repeat(3, 1, 1)
    out = apply_transforms(x, torch.tensor([0, 1, 0]), torch.tensor([0, 0, 1]), torch.tensor([False, False, False]))
    assert out[0].equal(x[0])
    assert out[1].equal(apply_transforms(x[:1], torch.tensor([1]), torch.tensor([0]), torch.tensor([False]))[0])
    assert out[2].equal(apply_transforms(x[:1], torch.tensor([0]), torch.tensor([1]), torch.tensor([False]))[0])


def test_view_is_a_pure_function_of_seed_view_and_index():
    a = view_transforms(3, 5, 100, "shift-flip")
    b = view_transforms(3, 5, 1000, "shift-flip")  # more images: the first 100 are unchanged
    assert all(x.equal(y[:100]) for x, y in zip(a, b))
    assert all(x.equal(y) for x, y in zip(a, view_transforms(3, 5, 100, "shift-flip")))
    other_view, other_seed = view_transforms(3, 6, 100, "shift-flip"), view_transforms(4, 5, 100, "shift-flip")
    assert not a[0].equal(other_view[0]) and not a[0].equal(other_seed[0])
    teacher_stream = view_transforms(3, 5, 100, "shift-flip", stream="teacher")
    assert not a[0].equal(teacher_stream[0])


def test_transforms_cover_every_shift_and_flip_only_when_asked():
    dx, dy, flip = view_transforms(0, 0, 20000, "shift-flip")
    assert set(zip(dx.tolist(), dy.tolist())) == {(i, j) for i in range(-MAX_SHIFT, MAX_SHIFT + 1) for j in range(-MAX_SHIFT, MAX_SHIFT + 1)}
    assert 0.45 < flip.float().mean().item() < 0.55
    assert not view_transforms(0, 0, 20000, "shift")[2].any()
    dx, dy, flip = view_transforms(0, 0, 20000, "flip")
    assert not dx.any() and not dy.any() and 0.45 < flip.float().mean().item() < 0.55
    dx, dy, flip = view_transforms(0, 0, 10, "none")
    assert not dx.any() and not dy.any() and not flip.any()


def test_augmented_view_regenerates_bit_exactly_and_none_is_identity():
    x = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    v = augmented_view(x, seed=1, view=2, policy="shift-flip")
    assert v.dtype == torch.uint8 and v.shape == x.shape and not v.equal(x)
    assert v.equal(augmented_view(x, seed=1, view=2, policy="shift-flip"))
    assert v[10:20].equal(augmented_view(x, seed=1, view=2, policy="shift-flip")[10:20])
    assert augmented_view(x, seed=1, view=2, policy="none") is x


def test_policy_defaults_per_dataset():
    assert resolve_policy("auto", "fashion-mnist") == "shift-flip"
    assert resolve_policy("auto", "mnist") == "shift"  # a flipped digit is another glyph
    assert resolve_policy("auto", "kmnist") == "shift"
    assert resolve_policy("none", "fashion-mnist") == "none"
    with pytest.raises(KdpipeError, match="unknown augmentation 'rotate'"):
        resolve_policy("rotate", "mnist")


def test_view_schedule_cycles_through_cached_views_or_takes_a_fresh_one():
    cached = ViewSchedule("shift", seed=0, cycle=3)
    assert [cached.view(e) for e in range(1, 8)] == [0, 1, 2, 0, 1, 2, 0]
    fresh = ViewSchedule("shift", seed=0)
    assert [fresh.view(e) for e in range(1, 5)] == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        ViewSchedule("none", seed=0)
