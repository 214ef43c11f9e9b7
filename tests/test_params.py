import copy

import pytest
import yaml

from kdpipe.errors import KdpipeError
from kdpipe.params import SECTIONS, distill_keys, load_params, parse_params
from tests.conftest import REPO


def base() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_repo_params_file_is_valid():
    p = load_params(REPO / "params.yaml")
    assert p.data.name == "fashion-mnist" and p.teacher.model == "cnn-vgg3" and p.distill.student == "mlp-800"


def test_dataclass_defaults_match_params_yaml():
    raw = base()
    for section, cls in SECTIONS.items():
        assert raw[section] == {k: v for k, v in vars(cls()).items()}, section


def with_change(section, key, value):
    raw = copy.deepcopy(base())
    if value is KeyError:
        del raw[section][key]
    else:
        raw[section][key] = value
    return raw


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("distill", "temprature", 8, r"unknown key\(s\) `distill.temprature`.*Valid keys: alpha, augment, batch_size"),
        ("distill", "temperature", "hot", "`distill.temperature` must be float, got str"),
        ("teacher", "epochs", 2.5, "`teacher.epochs` must be int"),
        ("teacher", "epochs", True, "`teacher.epochs` must be int"),
        ("distill", "temperature", 0, "`distill.temperature` must be positive"),
        ("distill", "alpha", 1.5, r"`distill.alpha` must be in \[0, 1\]"),
        ("teacher", "epochs", 0, "`teacher.epochs` must be at least 1"),
        ("distill", "batch_size", 0, "`distill.batch_size` must be at least 1"),
        ("data", "name", "cifar", "valid datasets: fashion-mnist, kmnist, local, mnist"),
        ("teacher", "model", "resnet", "valid models: cnn-small, cnn-vgg3, cnn-vgg4, mlp-1200-1200, mlp-800"),
        ("teacher", "augment", "rotate", "`teacher.augment` is 'rotate'; valid values: auto, none, flip, shift, shift-flip"),
        ("distill", "schedule", "step", "`distill.schedule` is 'step'; valid values: constant, cosine"),
        ("teacher", "label_smoothing", 1.0, r"`teacher.label_smoothing` must be in \[0, 1\)"),
        ("distill", "teacher", "live", "`distill.teacher` is 'live'; valid values: cache, online"),
        ("cache", "views", -1, "`cache.views` must be >= 0"),
        ("cache", "dtype", "int8", "`cache.dtype` is 'int8'; valid values: float32, float16"),
        ("evaluate", "seeds", 0, "`evaluate.seeds` must be at least 1"),
        ("distill", "augment", "flip", r"`distill.augment` is 'flip' but `cache.views` is 0.*distill.teacher: online"),
        ("distill", "method", "magic", "valid methods: dkd, kd, kd_ls"),
        ("distill", "seed", KeyError, "lacks key"),
    ],
)
def test_bad_values_are_named(section, key, value, message):
    with pytest.raises(KdpipeError, match=message):
        parse_params(with_change(section, key, value))


def test_augmentation_without_cached_views_is_fine_online_or_with_views():
    raw = with_change("distill", "augment", "flip")
    raw["distill"]["teacher"] = "online"
    assert parse_params(raw).cache.views == 0
    raw = with_change("distill", "augment", "flip")
    raw["cache"]["views"] = 4
    assert parse_params(raw).distill.augment == "flip"


def test_int_is_accepted_for_float():
    assert parse_params(with_change("distill", "temperature", 8)).distill.temperature == 8.0


def test_missing_and_unknown_sections(tmp_path):
    raw = base()
    del raw["cache"]
    with pytest.raises(KdpipeError, match="missing section"):
        parse_params(raw)
    with pytest.raises(KdpipeError, match="unknown section"):
        parse_params({**base(), "trian": {}})


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(KdpipeError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(KdpipeError, match="no such params file"):
        load_params(tmp_path / "nope.yaml")


def test_dvc_yaml_declares_exactly_the_keys_each_stage_reads():
    """A key read but not declared makes stale results silently; one declared but unread reruns needlessly."""
    from dvc.repo import Repo

    declared = {}
    with Repo(str(REPO)) as repo:
        for stage in repo.index.stages:
            keys = set()
            for dep in stage.deps:
                if hasattr(dep, "params"):
                    keys |= {f"{k}" for k in (dep.params or [])}
            declared[stage.addressing] = keys
    assert declared == {
        "check_params": set(),  # an empty key list: DVC tracks every value in the file, typos included
        "download": {"data"},
        "train_teacher": {"teacher"},
        "cache_logits": {"cache", "distill.augment"},
        "distill@kd": set(distill_keys("kd")),
        "distill@baseline": set(distill_keys("baseline")),
        "evaluate": {"evaluate", "distill", "cache.views", "cache.seed"},  # retrains students when evaluate.seeds > 1
    }
    assert not {"distill.temperature", "distill.alpha", "distill.method"} & declared["distill@baseline"]
