"""Typed, validated parameters, one dataclass per ``params.yaml`` section.

Every stage loads the whole file through :func:`load_params`, so a typo or a
bad value anywhere is reported before any work starts. Each field's comment is
the documentation of that knob; ``params.yaml`` mirrors it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from kdpipe.errors import KdpipeError


@dataclass(frozen=True)
class DataParams:
    name: str = "fashion-mnist"  # dataset: fashion-mnist, mnist, kmnist, or local (IDX files + SHA256SUMS in `source`)
    source: str = ""  # directory holding the IDX(.gz) files; "" = $KDPIPE_DATA_SOURCE, /usr/share/datasets/<name>, then download
    val_size: int = 5000  # training images held out for validation (model selection); the test set is used only by evaluate
    split_seed: int = 0  # seed of the train/validation split


@dataclass(frozen=True)
class TeacherParams:
    model: str = "cnn-vgg3"  # architecture (see kdpipe.models.MODELS); the seed's teacher is mlp-1200-1200
    dropout: float = 0.3  # dropout in the classifier head (MLPs: after each hidden layer)
    epochs: int = 20  # passes over the training split
    batch_size: int = 128  # images per optimizer step
    lr: float = 0.002  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    seed: int = 0  # seeds initialisation, shuffling, dropout and the augmented views
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda
    augment: str = "auto"  # none | shift (up to 2 px) | shift-flip | auto: the dataset's default (flips for fashion-mnist only)
    label_smoothing: float = 0.0  # cross-entropy label smoothing (0 = hard labels)
    schedule: str = "cosine"  # learning-rate schedule: constant | cosine (decays to 0 over all steps)


@dataclass(frozen=True)
class CacheParams:
    batch_size: int = 128  # images per teacher forward pass while caching
    min_val_accuracy: float = 0.5  # refuse to cache logits of a teacher below this validation accuracy
    device: str = "auto"  # auto | cpu | cuda
    views: int = 0  # augmented views per training image whose logits are cached (distill.augment's policy); 0 = un-augmented only
    seed: int = 0  # seed of the augmented views: a view is a pure function of (seed, view, image index)
    dtype: str = "float32"  # float32 (exact) | float16 (half the size; fidelity recorded in the cache's metadata)


@dataclass(frozen=True)
class DistillParams:
    student: str = "mlp-800"  # student architecture (see kdpipe.models.MODELS)
    dropout: float = 0.0  # student dropout
    epochs: int = 20  # passes over the training split
    batch_size: int = 128  # images per optimizer step
    lr: float = 0.001  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    seed: int = 0  # seeds initialisation, shuffling and dropout (same for kd and baseline)
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda
    augment: str = "none"  # augmentation of the student's images (kd and baseline see the same views): none | flip | shift | shift-flip | auto
    teacher: str = "cache"  # cache: cycle through the cache's views | online: run the teacher on every batch (fresh views each epoch)
    schedule: str = "cosine"  # learning-rate schedule: constant | cosine
    method: str = "kd"  # distillation loss (see kdpipe.losses.LOSSES)
    temperature: float = 1.0  # softening temperature T of teacher and student logits
    alpha: float = 0.9  # weight of the soft (teacher) term; 1 - alpha weighs cross-entropy
    beta: float = 8.0  # dkd only: weight of the non-target-class term (NCKD) relative to the target term


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 1000  # images per forward pass when scoring the test set
    ece_bins: int = 15  # equal-width confidence bins of the expected calibration error
    latency_repeats: int = 50  # timed forward passes per latency measurement (median reported)
    seeds: int = 3  # seeds of the kd-vs-baseline comparison; each seed beyond the first retrains both students here


@dataclass(frozen=True)
class Params:
    data: DataParams
    teacher: TeacherParams
    cache: CacheParams
    distill: DistillParams
    evaluate: EvaluateParams


SECTIONS: dict[str, type] = {
    "data": DataParams,
    "teacher": TeacherParams,
    "cache": CacheParams,
    "distill": DistillParams,
    "evaluate": EvaluateParams,
}

# Keys of `distill` that only the distilled variant reads; the baseline (alpha=0,
# no teacher) must not depend on them, or a temperature change would retrain it.
KD_ONLY_KEYS = ("method", "temperature", "alpha", "beta")
TEACHER_SOURCES = ("cache", "online")  # where distill@kd gets its soft targets


def distill_keys(variant: str) -> list[str]:
    """The dotted ``distill.*`` keys a distill variant reads (and dvc.yaml must declare)."""
    names = [f.name for f in fields(DistillParams)]
    if variant == "baseline":
        names = [n for n in names if n not in KD_ONLY_KEYS]
    return [f"distill.{n}" for n in names] + list(VIEW_KEYS)


# Keys outside `distill` that both distill variants read: the views kd and baseline train on.
VIEW_KEYS = ("cache.views", "cache.seed")


def _check_type(section: str, key: str, value: Any, expected: type) -> Any:
    where = f"{section}.{key}"
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (expected is int and isinstance(value, bool)) or not isinstance(value, expected):
        raise KdpipeError(
            f"params: `{where}` must be {expected.__name__}, got {type(value).__name__} {value!r}. "
            f"Fix the value in params.yaml (or the -S override)."
        )
    return value


def _section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise KdpipeError(f"params: section `{name}` must be a mapping of keys to values, got {type(raw).__name__}.")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise KdpipeError(
            f"params: unknown key(s) {', '.join(f'`{name}.{k}`' for k in unknown)} in section `{name}`. "
            f"Valid keys: {', '.join(sorted(known))}. A misspelt key is otherwise silently ignored; fix or remove it."
        )
    missing = sorted(known - set(raw))
    if missing:
        raise KdpipeError(
            f"params: section `{name}` lacks key(s) {', '.join(f'`{name}.{k}`' for k in missing)}. "
            f"Add them to params.yaml: DVC tracks only keys written in the file, so defaults are not filled in."
        )
    values = {k: _check_type(name, k, raw[k], hints[k]) for k in sorted(known)}
    return cls(**values)


def _require(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise KdpipeError(f"params: `{where}` {message}. Fix it in params.yaml (or the -S override).")


def validate(p: Params) -> None:
    """Range checks that types alone cannot express."""
    # Imported here: the registries live beside the code they name.
    from kdpipe.data import DATASETS
    from kdpipe.losses import LOSSES
    from kdpipe.models import MODELS

    _require(p.data.name in DATASETS, "data.name", f"is {p.data.name!r}; valid datasets: {', '.join(sorted(DATASETS))}")
    _require(p.data.val_size >= 1, "data.val_size", f"must be at least 1, got {p.data.val_size}")
    for section in ("teacher", "distill"):
        s = getattr(p, section)
        _require(s.epochs >= 1, f"{section}.epochs", f"must be at least 1, got {s.epochs}")
        _require(s.batch_size >= 1, f"{section}.batch_size", f"must be at least 1, got {s.batch_size}")
        _require(s.lr > 0, f"{section}.lr", f"must be positive, got {s.lr}")
        _require(s.weight_decay >= 0, f"{section}.weight_decay", f"must be >= 0, got {s.weight_decay}")
        _require(0 <= s.dropout < 1, f"{section}.dropout", f"must be in [0, 1), got {s.dropout}")
    _require(p.teacher.model in MODELS, "teacher.model", f"is {p.teacher.model!r}; valid models: {', '.join(sorted(MODELS))}")
    _require(p.distill.student in MODELS, "distill.student", f"is {p.distill.student!r}; valid models: {', '.join(sorted(MODELS))}")
    _require(p.distill.method in LOSSES, "distill.method", f"is {p.distill.method!r}; valid methods: {', '.join(sorted(LOSSES))}")
    _require(p.distill.temperature > 0, "distill.temperature", f"must be positive, got {p.distill.temperature}")
    _require(0 <= p.distill.alpha <= 1, "distill.alpha", f"must be in [0, 1], got {p.distill.alpha}")
    _require(p.distill.beta >= 0, "distill.beta", f"must be >= 0, got {p.distill.beta}")
    from kdpipe.augment import POLICIES
    from kdpipe.device import DEVICES
    from kdpipe.logits import CACHE_DTYPES
    from kdpipe.train import SCHEDULES

    for section in ("teacher", "distill"):
        s = getattr(p, section)
        _require(s.augment in POLICIES, f"{section}.augment", f"is {s.augment!r}; valid values: {', '.join(POLICIES)}")
        _require(s.schedule in SCHEDULES, f"{section}.schedule", f"is {s.schedule!r}; valid values: {', '.join(SCHEDULES)}")
    _require(0 <= p.teacher.label_smoothing < 1, "teacher.label_smoothing", f"must be in [0, 1), got {p.teacher.label_smoothing}")
    _require(p.distill.teacher in TEACHER_SOURCES, "distill.teacher", f"is {p.distill.teacher!r}; valid values: {', '.join(TEACHER_SOURCES)}")
    _require(p.cache.views >= 0, "cache.views", f"must be >= 0, got {p.cache.views}")
    _require(p.cache.seed >= 0, "cache.seed", f"must be >= 0, got {p.cache.seed}")
    _require(p.cache.dtype in CACHE_DTYPES, "cache.dtype", f"is {p.cache.dtype!r}; valid values: {', '.join(CACHE_DTYPES)}")
    _require(p.evaluate.seeds >= 1, "evaluate.seeds", f"must be at least 1, got {p.evaluate.seeds}")
    if p.distill.augment != "none" and p.distill.teacher == "cache" and p.cache.views == 0:
        raise KdpipeError(
            f"params: `distill.augment` is {p.distill.augment!r} but `cache.views` is 0: the cache holds the teacher's "
            f"logits for un-augmented images only, so a student seeing augmented images would learn from logits of "
            f"other images. Set cache.views > 0 (the cache then holds logits of exactly the views the student sees), "
            f"or distill.teacher: online (the teacher runs on every augmented batch; slower), or distill.augment: none."
        )

    for section in ("teacher", "cache", "distill"):
        device = getattr(p, section).device
        _require(device in DEVICES, f"{section}.device", f"is {device!r}; valid values: {', '.join(DEVICES)}")
    _require(p.cache.batch_size >= 1, "cache.batch_size", f"must be at least 1, got {p.cache.batch_size}")
    _require(0 <= p.cache.min_val_accuracy <= 1, "cache.min_val_accuracy", f"must be in [0, 1], got {p.cache.min_val_accuracy}")
    _require(p.evaluate.batch_size >= 1, "evaluate.batch_size", f"must be at least 1, got {p.evaluate.batch_size}")
    _require(p.evaluate.ece_bins >= 1, "evaluate.ece_bins", f"must be at least 1, got {p.evaluate.ece_bins}")
    _require(p.evaluate.latency_repeats >= 1, "evaluate.latency_repeats", f"must be at least 1, got {p.evaluate.latency_repeats}")


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Build validated :class:`Params` from the mapping read from ``params.yaml``."""
    if not isinstance(raw, dict):
        raise KdpipeError(f"{source}: expected a mapping of sections (data, teacher, ...), got {type(raw).__name__}.")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise KdpipeError(
            f"{source}: unknown section(s) {', '.join(map(repr, unknown))}. Valid sections: {', '.join(SECTIONS)}."
        )
    missing = [s for s in SECTIONS if s not in raw]
    if missing:
        raise KdpipeError(f"{source}: missing section(s) {', '.join(map(repr, missing))}. Add them; the repository's params.yaml lists every section and key with a comment.")
    params = Params(**{name: _section(name, cls, raw[name]) for name, cls in SECTIONS.items()})
    validate(params)
    return params


def load_params(path: str | Path) -> Params:
    """Read and validate ``params.yaml``; every failure names the file and the key."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise KdpipeError(f"{path}: no such params file. Run from the repository root or pass --params PATH.") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise KdpipeError(f"{path}: not valid YAML{where}: {problem}. Fix the syntax there.") from None
    return parse_params(raw, str(path))


def value_of(params: Params, dotted: str) -> Any:
    """``value_of(p, "distill.temperature")``: a value by the dotted name DVC uses."""
    section, key = dotted.split(".", 1)
    return getattr(getattr(params, section), key)


def flatten(section: str, obj: Any) -> dict[str, Any]:
    """``{"distill.temperature": 4.0, ...}``: the dotted names DVC shows, for MLflow params."""
    return {f"{section}.{k}": v for k, v in sorted(dataclasses.asdict(obj).items())}
