import pytest
import torch

from kdpipe.artifacts import save_tensors, sha256_file
from kdpipe.errors import KdpipeError
from kdpipe.losses import cross_entropy, make_loss
from kdpipe.models import build_model, make_spec
from kdpipe.train import fit, seed_everything
from tests.conftest import make_images


def tiny():
    x, y = make_images(400, 3)
    return x[:300], y[:300].long(), x[300:], y[300:].long()


def run(seed=0, loss_fn=cross_entropy, soft=None, lr=1e-3, epochs=3):
    x, y, vx, vy = tiny()
    seed_everything(seed)
    model = build_model(make_spec("mlp-800", num_classes=10, image_shape=[28, 28], mean=0.2, std=0.3, dropout=0.1))
    result = fit(model, x, y, val_images=vx, val_labels=vy, loss_fn=loss_fn, soft_targets=soft,
                 epochs=epochs, batch_size=32, lr=lr, weight_decay=0.0, seed=seed)
    return model, result


def test_loss_decreases_and_model_learns():
    _, result = run(epochs=4)
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.best.val_accuracy > 0.5


def test_same_seed_gives_byte_identical_weights(tmp_path):
    for i in range(2):
        model, _ = run(seed=5)
        save_tensors(tmp_path / f"{i}.st", model.state_dict(), {"x": 1})
    assert sha256_file(tmp_path / "0.st") == sha256_file(tmp_path / "1.st")
    model, _ = run(seed=6)
    save_tensors(tmp_path / "2.st", model.state_dict(), {"x": 1})
    assert sha256_file(tmp_path / "2.st") != sha256_file(tmp_path / "0.st")


def test_best_validation_epoch_is_kept():
    model, result = run(epochs=4)
    from kdpipe.train import evaluate_split

    _, _, vx, vy = tiny()
    assert evaluate_split(model, vx, vy)[1] == pytest.approx(result.best.val_accuracy)


def test_soft_targets_are_indexed_with_the_batch():
    x, y, _, _ = tiny()
    teacher_logits = torch.nn.functional.one_hot(y, 10).float() * 8  # a perfect teacher
    _, result = run(loss_fn=make_loss("kd", temperature=2.0, alpha=1.0), soft=teacher_logits, epochs=4)
    assert result.best.val_accuracy > 0.5  # learns the labels from soft targets alone


def test_non_finite_loss_names_epoch_and_step():
    with pytest.raises(KdpipeError, match=r"loss is nan at epoch 1, step 1 of 10.*learning rate"):
        run(loss_fn=lambda s, y, t: s.sum() * float("nan"))


def test_interrupted_training_resumes_to_identical_weights(tmp_path):
    from kdpipe.checkpoint import Checkpoint

    x, y, vx, vy = tiny()

    def train(checkpoint=None, stop_at=None):
        seed_everything(0)
        model = build_model(make_spec("mlp-800", num_classes=10, image_shape=[28, 28], mean=0.2, std=0.3, dropout=0.3))

        def on_batch(epoch, step, steps, loss):
            if (epoch, step) == stop_at:
                raise KeyboardInterrupt

        fit(model, x, y, val_images=vx, val_labels=vy, loss_fn=cross_entropy, epochs=3, batch_size=32, lr=1e-3,
            weight_decay=0.01, seed=0, checkpoint=checkpoint, on_batch=on_batch)
        save_tensors(tmp_path / "w.st", model.state_dict(), {})
        return sha256_file(tmp_path / "w.st")

    uninterrupted = train()
    ckpt = Checkpoint(tmp_path / "ckpt.safetensors", "fp-1")
    with pytest.raises(KeyboardInterrupt):
        train(ckpt, stop_at=(2, 5))
    assert ckpt.load().epoch == 1
    assert train(ckpt) == uninterrupted
    # A checkpoint from other params/code is never resumed from.
    assert Checkpoint(tmp_path / "ckpt.safetensors", "fp-2").load() is None


def test_cached_view_logits_teach_exactly_what_an_online_teacher_would():
    """Soft targets for [views, N, C] must be those of the images the student sees in that epoch."""
    from kdpipe.augment import ViewSchedule
    from kdpipe.logits import VIEW_LOGITS, compute_cache

    x, y, vx, vy = tiny()
    torch.manual_seed(1)
    teacher = build_model(make_spec("mlp-800", num_classes=10, image_shape=[28, 28], mean=0.2, std=0.3, dropout=0.0)).eval()
    views = ViewSchedule("shift-flip", seed=3, cycle=2)
    cache = compute_cache(teacher, {"train": x, "val": vx}, batch_size=300, views=2, policy="shift-flip", seed=3)
    loss = make_loss("kd", temperature=2.0, alpha=1.0)
    students = []
    for source in ({"soft_targets": cache[VIEW_LOGITS]}, {"teacher": teacher}):
        seed_everything(0)
        student = build_model(make_spec("mlp-800", num_classes=10, image_shape=[28, 28], mean=0.2, std=0.3, dropout=0.0))
        fit(student, x, y, val_images=vx, val_labels=vy, loss_fn=loss, epochs=3, batch_size=32, lr=1e-3,
            weight_decay=0.0, seed=0, views=views, **source)
        students.append(student.state_dict())
    # Batch composition changes GEMM rounding in the last bits only; a wrong view would differ by orders more.
    assert all(torch.allclose(students[0][k], students[1][k], atol=1e-5) for k in students[0])
    seed_everything(0)
    wrong = build_model(make_spec("mlp-800", num_classes=10, image_shape=[28, 28], mean=0.2, std=0.3, dropout=0.0))
    fit(wrong, x, y, val_images=vx, val_labels=vy, loss_fn=loss, epochs=3, batch_size=32, lr=1e-3, weight_decay=0.0, seed=0,
        views=views, soft_targets=cache[VIEW_LOGITS].flip(0))  # views swapped
    assert not torch.allclose(wrong.state_dict()["net.0.weight"], students[0]["net.0.weight"], atol=1e-4)


def test_view_logits_and_views_must_match():
    from kdpipe.augment import ViewSchedule

    x, y, vx, vy = tiny()
    model = build_model(make_spec("mlp-800", num_classes=10, image_shape=[28, 28], mean=0.2, std=0.3, dropout=0.0))
    common = dict(val_images=vx, val_labels=vy, loss_fn=make_loss("kd", temperature=2.0, alpha=0.5), epochs=1, batch_size=32,
                  lr=1e-3, weight_decay=0.0, seed=0)
    with pytest.raises(ValueError, match="un-augmented images cannot teach"):
        fit(model, x, y, soft_targets=torch.zeros(300, 10), views=ViewSchedule("shift", 0, cycle=2), **common)
    with pytest.raises(ValueError, match="view schedule cycling through exactly those views"):
        fit(model, x, y, soft_targets=torch.zeros(3, 300, 10), views=ViewSchedule("shift", 0, cycle=2), **common)
    with pytest.raises(ValueError, match="view schedule cycling through exactly those views"):
        fit(model, x, y, soft_targets=torch.zeros(3, 300, 10), **common)


def test_cosine_schedule_decays_to_zero_and_changes_training():
    from kdpipe.train import cosine_lr

    assert cosine_lr(0.1, 0, 100) == pytest.approx(0.1)
    assert cosine_lr(0.1, 50, 100) == pytest.approx(0.05)
    assert cosine_lr(0.1, 100, 100) == pytest.approx(0.0, abs=1e-12)
    x, y, vx, vy = tiny()
    weights = []
    for schedule in ("constant", "cosine"):
        seed_everything(0)
        model = build_model(make_spec("mlp-800", num_classes=10, image_shape=[28, 28], mean=0.2, std=0.3, dropout=0.0))
        fit(model, x, y, val_images=vx, val_labels=vy, loss_fn=cross_entropy, epochs=2, batch_size=32, lr=1e-3,
            weight_decay=0.0, seed=0, schedule=schedule)
        weights.append(model.state_dict()["net.0.weight"])
    assert not torch.equal(weights[0], weights[1])
