"""End to end: a real `dvc repro` in a temporary git + DVC repository on tiny generated data."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdpipe.artifacts import load_tensors, sha256_file
from kdpipe.models import load_model
from kdpipe.scaffold import copy_pipeline
from tests.conftest import REPO, write_idx_dir

pytestmark = pytest.mark.e2e

ALL_STAGES = {"check_params", "download", "train_teacher", "cache_logits", "distill@kd", "distill@baseline", "evaluate"}


def sh(cwd: Path, *args: str, env=None, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


class Project:
    """A throwaway copy of the repository with tiny params."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "KDPIPE_"))}
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["GIT_AUTHOR_NAME"] = self.env["GIT_COMMITTER_NAME"] = "test"
        self.env["GIT_AUTHOR_EMAIL"] = self.env["GIT_COMMITTER_EMAIL"] = "test@example.com"

    def run(self, *args: str, check=True) -> subprocess.CompletedProcess:
        return sh(self.root, *args, env=self.env, check=check)

    def repro(self, *args: str) -> set[str]:
        out = self.run("dvc", "repro", *args).stdout
        return set(re.findall(r"Running stage '([^']+)'", out))

    def set_param(self, section: str, key: str, value) -> None:
        path = self.root / "params.yaml"
        params = yaml.safe_load(path.read_text())
        params[section][key] = value
        path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    root = tmp_path_factory.mktemp("repo")
    copy_pipeline(REPO, root)
    idx = root / "sources" / "idx"  # inside the repo: paths in params.yaml are confined to it
    write_idx_dir(idx, n_train=360, n_test=120)
    p = Project(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(name="local", source=str(idx), val_size=60)
    params["teacher"].update(epochs=2, batch_size=32)
    params["distill"].update(epochs=2, batch_size=32)
    params["cache"].update(min_val_accuracy=0.0, views=8)
    params["distill"].update(augment="auto")  # exercise the augmented views end to end
    params["evaluate"].update(latency_repeats=2, seeds=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    p.run("git", "init", "-q")
    p.run("dvc", "init", "-q")
    p.run("git", "add", "-A")
    p.run("git", "commit", "-qm", "tiny project")
    return p


def mlflow_runs(root: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("kdpipe")
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


def test_full_repro_writes_everything_and_logs_one_run_per_stage(project: Project):
    assert project.repro() == ALL_STAGES
    root = project.root
    data, meta = load_tensors(root / "data/dataset.safetensors")
    assert data["train_images"].shape == (300, 28, 28) and meta["dataset"] == "local"
    teacher, _ = load_model(root / "artifacts/teacher/model.safetensors", made_by="train_teacher")
    for variant in ("kd", "baseline"):
        load_model(root / f"artifacts/students/{variant}/model.safetensors", made_by="distill")
    cache, cache_meta = load_tensors(root / "artifacts/teacher/logits.safetensors")
    assert cache["train_logits"].shape == (300, 10) and cache_meta["teacher_sha256"] == sha256_file(root / "artifacts/teacher/model.safetensors")
    # Default augmentation of a `local` dataset is shifts only (flips are wrong for digits); 8 cached views.
    assert cache["train_view_logits"].shape == (8, 300, 10) and cache_meta["views"] == {"count": 8, "policy": "shift", "seed": 0}
    for variant in ("kd", "baseline"):  # both students trained on the same cycle of those views
        _, student_meta = load_model(root / f"artifacts/students/{variant}/model.safetensors", made_by="distill")
        assert student_meta["student"]["views"] == {"policy": "shift", "seed": 0, "cycle": 8, "stream": "student", "max_shift": 2}
    scores = json.loads((root / "metrics/eval.json").read_text())
    for model in ("teacher", "kd", "baseline"):
        assert {"accuracy", "errors", "nll", "ece", "agreement_with_teacher", "param_count", "file_bytes", "latency_ms_b1", "latency_ms_b256"} <= set(scores[model])
    assert scores["teacher"]["agreement_with_teacher"] == 1.0
    assert "kd_minus_baseline" in scores["summary"]
    assert (root / "metrics/report.md").read_text().startswith("# kdpipe evaluation")
    assert len((root / "metrics/confusion/kd.csv").read_text().splitlines()) == 121
    history = json.loads((root / "metrics/history/distill_kd.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]

    client, runs = mlflow_runs(root)
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    names = sorted(r.info.run_name for r in top)
    assert names == sorted(["download", "teacher", "cache_logits", "distill@kd", "distill@baseline", "evaluate"])
    for run in top:
        assert run.info.status == "FINISHED" and run.data.metrics, run.info.run_name
        assert run.data.tags["dvc.stage"] and run.data.tags["git.commit"] != "unknown"
    by_name = {r.info.run_name: r for r in top}
    kd = by_name["distill@kd"]
    assert kd.data.params["distill.temperature"] == "1.0" and "distill.temperature" not in by_name["distill@baseline"].data.params
    assert kd.data.tags["kdpipe.weights_sha256"] == sha256_file(root / "artifacts/students/kd/model.safetensors")
    assert len(client.get_metric_history(kd.info.run_id, "val_accuracy")) == 2
    artifacts = [a.path for a in client.list_artifacts(kd.info.run_id)]
    assert artifacts == ["model.safetensors"]
    children = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == by_name["evaluate"].info.run_id)
    assert children == ["evaluate/baseline", "evaluate/kd", "evaluate/teacher"]


def test_second_repro_runs_nothing(project: Project):
    assert project.repro() == set()


def test_temperature_reruns_only_kd_student_and_evaluate(project: Project):
    project.set_param("distill", "temperature", 2.0)
    diff = project.run("dvc", "params", "diff").stdout
    assert "distill.temperature" in diff
    assert project.repro() == {"check_params", "distill@kd", "evaluate"}
    assert "kd.accuracy" in project.run("dvc", "metrics", "diff", "--all").stdout


def test_evaluate_param_reruns_only_evaluate(project: Project):
    project.set_param("evaluate", "ece_bins", 10)
    assert project.repro() == {"check_params", "evaluate"}


def test_view_params_rerun_the_cache_and_both_students(project: Project):
    project.set_param("cache", "views", 3)
    assert project.repro() == {"check_params", "cache_logits", "distill@kd", "distill@baseline", "evaluate"}
    cache, meta = load_tensors(project.root / "artifacts/teacher/logits.safetensors")
    assert cache["train_view_logits"].shape == (3, 300, 10) and meta["views"]["count"] == 3


def test_several_seeds_report_mean_and_std(project: Project):
    project.set_param("evaluate", "seeds", 2)
    assert project.repro() == {"check_params", "evaluate"}
    summary = json.loads((project.root / "metrics/eval.json").read_text())["summary"]
    assert summary["seeds"] == 2 and summary["kd_accuracy_std"] >= 0
    assert "Over 2 student seeds" in (project.root / "metrics/report.md").read_text()
    project.set_param("evaluate", "seeds", 1)
    assert project.repro() == {"check_params", "evaluate"}


def test_teacher_param_reruns_teacher_cache_kd_student_and_evaluate(project: Project):
    project.set_param("teacher", "lr", 0.003)
    assert project.repro() == {"check_params", "train_teacher", "cache_logits", "distill@kd", "evaluate"}
    assert project.repro() == set()


def test_misspelt_param_key_fails_the_pipeline_with_its_name(project: Project):
    """`dvc exp run -S distill.temprature=8` adds a key no stage reads; check_params sees it."""
    original = (project.root / "params.yaml").read_text()
    project.set_param("distill", "temprature", 8)
    result = project.run("dvc", "repro", check=False)
    assert result.returncode != 0
    assert "unknown key(s) `distill.temprature`" in result.stdout + result.stderr
    (project.root / "params.yaml").write_text(original)
    assert project.repro() == set()  # the failed run recorded nothing: the lock still matches


def test_rerun_produces_byte_identical_weights(project: Project):
    paths = ["artifacts/teacher/model.safetensors", "artifacts/teacher/logits.safetensors", "artifacts/students/kd/model.safetensors"]
    before = {p: sha256_file(project.root / p) for p in paths}
    project.run("dvc", "repro", "-f", "train_teacher", "cache_logits", "distill@kd")
    assert {p: sha256_file(project.root / p) for p in paths} == before


def test_stage_by_hand_has_help_and_clear_errors(project: Project):
    out = project.run("python", "-m", "stages.distill", "--help").stdout
    assert "--variant" in out and "baseline" in out
    bad = project.run("python", "-m", "stages.distill", "--variant", "kd", "--params", "nope.yaml", "--no-track", check=False)
    assert bad.returncode == 1 and "no such params file" in bad.stderr and "Traceback" not in bad.stderr
