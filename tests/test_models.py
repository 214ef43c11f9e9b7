import pytest
import torch

from kdpipe.errors import KdpipeError
from kdpipe.models import MODELS, build_model, load_model, make_spec, param_count, save_model


def spec(name="mlp-800", dropout=0.0):
    return make_spec(name, num_classes=10, image_shape=[28, 28], mean=0.3, std=0.35, dropout=dropout)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_take_uint8_images(name):
    model = build_model(spec(name, 0.1))
    out = model(torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8))
    assert out.shape == (3, 10) and out.dtype == torch.float32


def test_seed_model_sizes():
    assert param_count(build_model(spec("mlp-1200-1200"))) == 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 1200 * 10 + 10
    assert param_count(build_model(spec("mlp-800"))) == 784 * 800 + 800 + 800 * 10 + 10


def test_file_alone_rebuilds_the_model(tmp_path):
    torch.manual_seed(0)
    model = build_model(spec("cnn-small")).eval()
    save_model(tmp_path / "m.safetensors", model, spec("cnn-small"), {"training": {"best_epoch": 1}})
    loaded, meta = load_model(tmp_path / "m.safetensors", made_by="train_teacher")
    x = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    assert torch.equal(loaded(x), model(x)) and meta["training"] == {"best_epoch": 1}


def test_weights_that_do_not_fit_the_spec_are_refused(tmp_path):
    model = build_model(spec("mlp-800"))
    save_model(tmp_path / "m.safetensors", model, spec("mlp-1200-1200"))
    with pytest.raises(KdpipeError, match="do not match the model spec"):
        load_model(tmp_path / "m.safetensors", made_by="train_teacher")


def test_unknown_arch_in_metadata_is_refused():
    with pytest.raises(KdpipeError, match="unknown arch"):
        build_model({**spec(), "arch": "__import__('os')"})


def test_cnn_blocks_follow_the_spec_and_run_channels_last():
    model = build_model(spec("cnn-vgg4"))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    # 3x3 convs without bias + batch norm (2 params per channel) + head from 64x7x7
    expected = sum(9 * c.in_channels * c.out_channels + 2 * c.out_channels for c in convs) + 64 * 7 * 7 * 256 + 256 + 256 * 10 + 10
    assert param_count(model) == expected
