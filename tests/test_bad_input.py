"""Every bad input: one clear paragraph, exit 1, no traceback (unless --debug), and nothing lost.

Stage-level cases run one stage by hand (``--no-track``) on a copy of a tiny but
complete project, break ONE thing, and check that every file in the project
(data/, artifacts/, metrics/, the sources, and any stray temp file) is
byte-identical afterwards. The last cases run ``dvc repro`` on a throwaway
git + DVC repository, where DVC deletes the failing stage's own outputs first.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml

from kdpipe.artifacts import load_tensors, save_tensors
from kdpipe.data import IDX_NAMES, encode_idx, parse_idx
from kdpipe.scaffold import copy_pipeline
from tests.conftest import REPO, write_idx_dir
from tests.test_pipeline_e2e import Project
from tests.test_stages import run_stage

N_TRAIN, N_TEST, VAL_SIZE = 300, 100, 50  # 250 train rows after the split
IDX = Path("sources/idx")  # data.source, inside the project: params paths are confined to it
TEACHER = Path("artifacts/teacher/model.safetensors")
LOGITS = Path("artifacts/teacher/logits.safetensors")
TEACHER_OUTS = {str(TEACHER), "metrics/teacher.json", "metrics/history/teacher.json"}  # train_teacher's outputs in dvc.yaml
OUTPUT_DIRS = ("data", "artifacts", "metrics")
BUILD = (
    ("stages.download",),
    ("stages.train_teacher",),
    ("stages.cache_logits",),
    ("stages.distill", "--variant", "kd"),
    ("stages.distill", "--variant", "baseline"),
    ("stages.evaluate",),
)

Breaker = Callable[[Path], None]


# --------------------------------------------------------------------------------------------- helpers


def tiny_params() -> dict[str, Any]:
    """The committed params.yaml, shrunk so the whole pipeline runs in seconds."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(name="local", source=str(IDX), val_size=VAL_SIZE)
    params["teacher"].update(epochs=1, batch_size=32)
    params["distill"].update(epochs=1, batch_size=32)
    params["cache"].update(min_val_accuracy=0.0)
    params["evaluate"].update(latency_repeats=2)
    return params


def edit_params(root: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    edit(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def snapshot(root: Path, dirs: tuple[str, ...] = ()) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (or only under ``dirs``): a changed, lost or stray file shows up."""
    tops = [root / d for d in dirs] if dirs else [root]
    files = [p for top in tops if top.exists() for p in top.rglob("*") if p.is_file()]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def assert_fails_cleanly(root: Path, stage: tuple[str, ...], expected: str, *, debug: bool = False) -> subprocess.CompletedProcess:
    """Exit 1, one ``error:`` paragraph holding ``expected``, a traceback only with --debug, no file touched."""
    before = snapshot(root)
    assert any(k.startswith(OUTPUT_DIRS) for k in before), "the project has no outputs to protect"
    result = run_stage(root, *stage, *(["--debug"] if debug else []))
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert debug or result.stderr.startswith("error: "), "something was printed before the error"
    assert ("Traceback" in result.stderr) == debug, result.stderr
    assert snapshot(root) == before, "a failing stage changed, removed or left behind a file"
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny project made by hand once (about 16 s on 2 cores); tests break copies of it."""
    root = tmp_path_factory.mktemp("built")
    write_idx_dir(root / IDX, n_train=N_TRAIN, n_test=N_TEST)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    for stage in BUILD:
        result = run_stage(root, *stage)
        assert result.returncode == 0, f"{stage}:\n{result.stderr}"
    return root


@pytest.fixture
def project(built: Path, tmp_path: Path) -> Path:
    """A private copy of the built project for one test to break."""
    return Path(shutil.copytree(built, tmp_path / "project"))


# ----------------------------------------------------------------------------------------- breakers


def set_param(dotted: str, value: Any) -> Breaker:
    section, key = dotted.split(".")
    return lambda root: edit_params(root, lambda p: p[section].__setitem__(key, value))


def both(first: Breaker, second: Breaker) -> Breaker:
    return lambda root: (first(root), second(root))


def drop_section(section: str) -> Breaker:
    return lambda root: edit_params(root, lambda p: p.pop(section))


def malform_yaml(root: Path) -> None:
    with open(root / "params.yaml", "a") as fh:
        fh.write("distill: {temperature: 4\n")  # unclosed flow mapping


def rewrite_idx(role: str, change: Callable[[bytes], bytes], *, update_sums: bool) -> Breaker:
    """Change the decompressed IDX bytes of one source file; optionally make SHA256SUMS agree again."""

    def apply(root: Path) -> None:
        gz = root / IDX / f"{IDX_NAMES[role]}.gz"
        data = change(gzip.decompress(gz.read_bytes()))
        gz.write_bytes(gzip.compress(data, mtime=0))
        if update_sums:
            sums, entry = root / IDX / "SHA256SUMS", f"  {IDX_NAMES[role]}"
            lines = [hashlib.sha256(data).hexdigest() + entry if line.endswith(entry) else line for line in sums.read_text().splitlines()]
            sums.write_text("\n".join(lines) + "\n")

    return apply


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def bad_magic(data: bytes) -> bytes:
    return b"\x01" + data[1:]


def drop_last_label(data: bytes) -> bytes:
    return encode_idx(parse_idx(data)[:-1])


def truncate(rel: Path | str) -> Breaker:
    def apply(root: Path) -> None:
        raw = (root / rel).read_bytes()
        (root / rel).write_bytes(raw[: len(raw) // 2])

    return apply


def delete(rel: Path | str) -> Breaker:
    return lambda root: (root / rel).unlink()


def not_safetensors(root: Path) -> None:
    """A PyTorch pickle where safetensors belongs: the commonest wrong file."""
    torch.save({"net.0.weight": torch.zeros(2, 2)}, root / TEACHER)


def wrong_shape(root: Path) -> None:
    tensors, meta = load_tensors(root / TEACHER)
    key = sorted(tensors)[0]
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    save_tensors(root / TEACHER, tensors, meta)


def cache_one_row_short(root: Path) -> None:
    tensors, meta = load_tensors(root / LOGITS)
    tensors["train_logits"] = tensors["train_logits"][:-1]
    save_tensors(root / LOGITS, tensors, meta)


KD, BASELINE = ("stages.distill", "--variant", "kd"), ("stages.distill", "--variant", "baseline")
DOWNLOAD, TEACH, CACHE = ("stages.download",), ("stages.train_teacher",), ("stages.cache_logits",)
N_TRAIN_ROWS = N_TRAIN - VAL_SIZE


# ------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "stage, breaker, expected",
    [
        pytest.param(KD, set_param("distill.temprature", 8), "unknown key(s) `distill.temprature` in section `distill`. Valid keys:", id="misspelt-key"),
        pytest.param(TEACH, set_param("teacher.epochs", "ten"), "`teacher.epochs` must be int, got str 'ten'", id="wrong-type"),
        pytest.param(KD, set_param("distill.temperature", 0), "`distill.temperature` must be positive, got 0.0", id="temperature-0"),
        pytest.param(KD, set_param("distill.alpha", 1.5), "`distill.alpha` must be in [0, 1], got 1.5", id="alpha-1.5"),
        pytest.param(TEACH, set_param("teacher.epochs", 0), "`teacher.epochs` must be at least 1, got 0", id="epochs-0"),
        pytest.param(BASELINE, set_param("distill.batch_size", 0), "`distill.batch_size` must be at least 1, got 0", id="batch-size-0"),
        pytest.param(DOWNLOAD, set_param("data.val_size", N_TRAIN), f"`data.val_size` is {N_TRAIN} but the training set has only {N_TRAIN} images", id="val-size-too-big"),
        pytest.param(DOWNLOAD, set_param("data.name", "cifar10"), "is 'cifar10'; valid datasets: fashion-mnist, kmnist, local, mnist", id="unknown-dataset"),
        pytest.param(TEACH, set_param("teacher.model", "resnet18"), "is 'resnet18'; valid models: cnn-small, cnn-vgg3, cnn-vgg4, mlp-1200-1200, mlp-800", id="unknown-model"),
        pytest.param(KD, set_param("distill.augment", "shift"), "`distill.augment` is 'shift' but `cache.views` is 0", id="augment-without-views"),
        pytest.param(KD, both(set_param("distill.augment", "shift"), set_param("cache.views", 3)), "stale logits cache: it holds the teacher's logits for views {'count': 0}", id="cache-of-other-views"),
        pytest.param(KD, set_param("distill.method", "fitnets"), "is 'fitnets'; valid methods: dkd, kd, kd_ls", id="unknown-method"),
        pytest.param(CACHE, drop_section("cache"), "params.yaml: missing section(s) 'cache'", id="missing-section"),
        pytest.param(("stages.evaluate",), malform_yaml, "params.yaml: not valid YAML", id="malformed-yaml"),
    ],
)
def test_bad_params(project: Path, stage: tuple[str, ...], breaker: Breaker, expected: str) -> None:
    """Params are validated before any work: the message names the key and the fix."""
    breaker(project)
    assert_fails_cleanly(project, stage, expected)


@pytest.mark.parametrize(
    "breaker, expected",
    [
        pytest.param(truncate(IDX / "train-images-idx3-ubyte.gz"), "cannot decompress", id="truncated-gz"),
        pytest.param(rewrite_idx("train_labels", flip_last_byte, update_sums=False), "checksum mismatch", id="flipped-byte"),
        pytest.param(rewrite_idx("train_images", bad_magic, update_sums=True), "not an IDX file (bad magic number 01000803)", id="bad-magic"),
        pytest.param(rewrite_idx("train_labels", drop_last_label, update_sums=True), f"inconsistent train files: images [{N_TRAIN}, 28, 28] and labels [{N_TRAIN - 1}]", id="count-mismatch"),
        pytest.param(delete(IDX / "t10k-labels-idx1-ubyte.gz"), "data source lacks t10k-labels-idx1-ubyte", id="missing-file"),
    ],
)
def test_bad_data_source(project: Path, breaker: Breaker, expected: str) -> None:
    """Every source file is verified and parsed before data/dataset.safetensors is replaced."""
    breaker(project)
    assert_fails_cleanly(project, DOWNLOAD, expected)


@pytest.mark.parametrize(
    "stage, breaker, expected",
    [
        pytest.param(CACHE, delete(TEACHER), f"{TEACHER}: file not found. Run `dvc repro train_teacher`", id="missing-upstream"),
        pytest.param(CACHE, truncate(TEACHER), "not a valid safetensors file", id="truncated-safetensors"),
        pytest.param(CACHE, not_safetensors, "not a valid safetensors file", id="pickle-not-safetensors"),
        pytest.param(CACHE, wrong_shape, "weights do not match the model spec in its metadata", id="wrong-shape"),
        pytest.param(KD, cache_one_row_short, f"`train_logits` has shape [{N_TRAIN_ROWS - 1}, 10], expected [{N_TRAIN_ROWS}, classes]", id="cache-rows"),
    ],
)
def test_bad_artifact(project: Path, stage: tuple[str, ...], breaker: Breaker, expected: str) -> None:
    """A missing or damaged upstream file names itself and the stage that rewrites it."""
    breaker(project)
    assert_fails_cleanly(project, stage, expected)


def test_stale_logits_cache_is_refused(built: Path, tmp_path: Path) -> None:
    """A cache made from other teacher weights would teach the wrong teacher: distill refuses it."""
    other = Path(shutil.copytree(built, tmp_path / "other"))
    set_param("teacher.seed", 1)(other)
    assert run_stage(other, *TEACH).returncode == 0
    project = Path(shutil.copytree(built, tmp_path / "project"))
    assert (other / TEACHER).read_bytes() != (project / TEACHER).read_bytes()
    shutil.copy2(other / TEACHER, project / TEACHER)
    result = assert_fails_cleanly(project, KD, "stale logits cache: it was computed from teacher weights")
    assert "Run `dvc repro cache_logits`" in result.stderr


def test_non_finite_loss_stops_training(project: Path) -> None:
    """T = 1e-45 turns the tempered logits into inf, the loss into nan at the first step."""
    set_param("distill.temperature", 1.0e-45)(project)
    assert_fails_cleanly(project, KD, "training diverged: the loss is nan at epoch 1, step 1 of")


def test_debug_shows_the_traceback(project: Path) -> None:
    """--debug adds the traceback to the same message; still exit 1 and nothing touched."""
    truncate(TEACHER)(project)
    result = assert_fails_cleanly(project, CACHE, "not a valid safetensors file", debug=True)
    assert "KdpipeError" in result.stderr


# ------------------------------------------------------------------------------------------ dvc repro


@dataclass
class DivergedRepro:
    project: Project
    outputs: dict[str, str]  # every output after a good pipeline run
    failed: subprocess.CompletedProcess  # `dvc repro` after a diverging teacher param
    after_failure: dict[str, str]
    after_dvc_checkout: dict[str, str]  # params.yaml restored, then only `dvc checkout`


@pytest.fixture(scope="module")
def diverged_repro(built: Path, tmp_path_factory: pytest.TempPathFactory) -> DivergedRepro:
    """A git + DVC copy of the repository; its pipeline outputs are the hand-made ones, recorded with
    `dvc commit` (README: running by hand, then `dvc commit`) to save a 40 s `dvc repro` with MLflow."""
    root = copy_pipeline(REPO, tmp_path_factory.mktemp("dvc"))
    shutil.copy2(built / "params.yaml", root / "params.yaml")  # tiny params, their data and the outputs
    for name in ("sources", *OUTPUT_DIRS):
        shutil.copytree(built / name, root / name)
    p = Project(root)
    p.run("git", "init", "-q")
    p.run("dvc", "init", "-q")
    p.run("dvc", "commit", "-f", "-q")
    p.run("git", "add", "-A")
    p.run("git", "commit", "-qm", "tiny project, pipeline run")
    assert p.repro() == set()
    outputs = snapshot(root, OUTPUT_DIRS)
    good_params = (root / "params.yaml").read_text()

    p.set_param("teacher", "lr", 1.0e30)  # the first AdamW step sends the weights to ~1e30: nan at step 2
    failed = p.run("dvc", "repro", check=False)
    after_failure = snapshot(root, OUTPUT_DIRS)

    (root / "params.yaml").write_text(good_params)
    p.run("dvc", "checkout")
    return DivergedRepro(p, outputs, failed, after_failure, snapshot(root, OUTPUT_DIRS))


def test_dvc_repro_failure_keeps_other_outputs_and_git_plus_dvc_checkout_restores_all(diverged_repro: DivergedRepro) -> None:
    """Under `dvc repro` the failing stage's own outputs are gone; the message says how to get them back."""
    r = diverged_repro
    output = r.failed.stdout + r.failed.stderr
    assert r.failed.returncode != 0
    assert "training diverged: the loss is nan at epoch 1, step 2" in output and "`dvc checkout`" in output
    assert "failed to reproduce 'train_teacher'" in output and "Running stage 'cache_logits'" not in output
    assert "Traceback" not in output
    # No other stage's output changed; upstream data is byte-identical; train_teacher's were removed, not altered.
    assert {k: v for k, v in r.after_failure.items() if k not in TEACHER_OUTS} == {k: v for k, v in r.outputs.items() if k not in TEACHER_OUTS}
    assert r.after_failure["data/dataset.safetensors"] == r.outputs["data/dataset.safetensors"]
    assert all(r.after_failure.get(k, v) == v for k, v in r.outputs.items() if k in TEACHER_OUTS)
    # `dvc checkout` brings back the cached weights.
    assert r.after_dvc_checkout[str(TEACHER)] == r.outputs[str(TEACHER)]
    # Undo everything git tracks, then `dvc checkout`: all back, clean. git restores the uncached metrics DVC
    # deleted, and dvc.lock, where check_params (which passed: lr=1e30 is a valid value) recorded the bad params.
    r.project.run("git", "checkout", "--", ".")
    r.project.run("dvc", "checkout")
    assert snapshot(r.project.root, OUTPUT_DIRS) == r.outputs
    assert "Data and pipelines are up to date." in r.project.run("dvc", "status").stdout


def test_dvc_checkout_alone_restores_every_output_after_a_failed_repro(diverged_repro: DivergedRepro) -> None:
    """What the stage's note promises: restore params.yaml, run `dvc checkout`, and every output is back."""
    r = diverged_repro
    assert sorted(set(r.outputs) - set(r.after_dvc_checkout)) == []
    assert r.after_dvc_checkout == r.outputs
