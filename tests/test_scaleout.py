"""Scale-out, exercised for real: a shared MLflow tracking server and a DVC remote.

Both are what the README tells a team to use, so both are tested against the
real engines (an ``mlflow server`` process, ``dvc push``/``dvc pull``), offline
and on tiny generated data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdpipe.scaffold import copy_pipeline
from tests.conftest import REPO, write_idx_dir

pytestmark = pytest.mark.e2e

ALL_STAGES = {"check_params", "download", "train_teacher", "cache_logits", "distill@kd", "distill@baseline", "evaluate"}
# Outputs DVC caches (and so pushes and pulls); metrics/* are `cache: false` and live in git.
CACHED_OUTPUTS = [
    "data/dataset.safetensors",
    "artifacts/teacher/model.safetensors",
    "artifacts/teacher/logits.safetensors",
    "artifacts/students/kd/model.safetensors",
    "artifacts/students/baseline/model.safetensors",
]
SERVER_START_TIMEOUT_S = 90.0
# Talk to 127.0.0.1 directly even where the user's environment sets an HTTP proxy.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- helpers ---------------------------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without DVC_/KDPIPE_/MLFLOW_ variables, so only what a test sets applies."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "KDPIPE_", "MLFLOW_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_params(source: Path) -> dict[str, Any]:
    """The repository's params.yaml with every knob shrunk so a full pipeline runs in seconds."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(name="local", source=str(source), val_size=50)
    params["teacher"].update(epochs=1, batch_size=32)
    params["cache"].update(min_val_accuracy=0.0)
    params["distill"].update(epochs=1, batch_size=32)
    params["evaluate"].update(latency_repeats=2)
    return params


def run_stage(cwd: Path, module: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """A stage run by hand, as tests/test_stages.py does, but with tracking left on."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=120,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but not listening: connecting is refused, and nothing else can take it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


# --- MLflow tracking server ------------------------------------------------------------------------------------


@dataclass
class TrackingServer:
    url: str
    artifacts_dir: Path
    log: Path

    def get(self, endpoint: str, **query: str) -> dict[str, Any]:
        url = f"{self.url}/api/2.0/{endpoint}?{urllib.parse.urlencode(query)}"
        with DIRECT.open(url, timeout=30) as response:
            return json.load(response)

    def post(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.url}/api/2.0/{endpoint}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with DIRECT.open(request, timeout=30) as response:
            return json.load(response)

    def download(self, artifact_uri: str, name: str) -> bytes:
        """An artifact's bytes through the server's proxy (``mlflow-artifacts:/<path>``), as a teammate would get them."""
        path = artifact_uri.removeprefix("mlflow-artifacts:").lstrip("/")
        with DIRECT.open(f"{self.url}/api/2.0/mlflow-artifacts/artifacts/{path}/{name}", timeout=30) as response:
            return response.read()


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's whole process group, then SIGKILL what is left.

    Terminating only ``mlflow server`` leaves its uvicorn worker (and, with job
    execution on, its huey consumers) running as orphans.
    """
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=15)


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[TrackingServer]:
    """A real ``mlflow server`` (SQLite backend, proxied artifacts in tmp), stopped even when the test fails.

    ``--artifacts-destination`` (with artifact serving, on by default in MLflow 3)
    gives new experiments an ``mlflow-artifacts:/`` location, so clients upload
    through the server and need no access to its disk. ``--default-artifact-root
    <dir>`` would instead hand clients a path to write to directly.
    """
    home = tmp_path / "mlflow-server"
    home.mkdir()
    port = free_port()
    server = TrackingServer(url=f"http://127.0.0.1:{port}", artifacts_dir=home / "artifacts", log=home / "server.log")
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination", str(server.artifacts_dir),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    # Background jobs (huey consumers) are not needed for tracking and cost seconds on 2 cores.
    env = clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with server.log.open("wb") as log:
        proc = subprocess.Popen(command, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{server.log.read_text()}")
            try:
                with DIRECT.open(f"{server.url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health in {SERVER_START_TIMEOUT_S:.0f}s:\n{server.log.read_text()}")
            time.sleep(0.5)
        yield server
    finally:
        stop_process_group(proc)


def by_key(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """MLflow's REST lists of ``{"key": ..., "value": ...}`` as a dict."""
    return {e["key"]: e["value"] for e in entries}


def test_stages_log_params_metrics_tags_and_weights_to_a_tracking_server(tmp_path: Path, mlflow_server: TrackingServer):
    work = tmp_path / "work"
    write_idx_dir(work / "idx", n_train=200, n_test=50)  # inside: params paths are confined to the project
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params(work / "idx"), sort_keys=False))
    env = clean_env(MLFLOW_TRACKING_URI=mlflow_server.url)
    for module in ("stages.download", "stages.train_teacher"):
        result = run_stage(work, module, env=env)
        assert result.returncode == 0, f"{module}:\n{result.stdout}\n{result.stderr}"
        assert "MLflow: could not" not in result.stderr, result.stderr  # tracking failures after training only warn
    assert not (work / "mlflow.db").exists() and not (work / "mlartifacts").exists(), "logged locally, not to the server"

    experiment = mlflow_server.get("mlflow/experiments/get-by-name", experiment_name="kdpipe")["experiment"]
    assert experiment["artifact_location"].startswith("mlflow-artifacts:"), experiment
    runs = mlflow_server.post("mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
    by_name = {r["info"]["run_name"]: r for r in runs}
    assert sorted(by_name) == ["download", "teacher"]

    download = by_name["download"]
    assert download["info"]["status"] == "FINISHED"
    params, metrics, tags = (by_key(download["data"].get(k, [])) for k in ("params", "metrics", "tags"))
    assert params["data.name"] == "local" and params["data.val_size"] == "50"
    assert {"train_size": 150.0, "val_size": 50.0, "test_size": 50.0}.items() <= metrics.items()
    assert tags["dvc.stage"] == "download" and tags["kdpipe.stage"] == "download"
    assert tags["kdpipe.data_sha256"] == sha256(work / "data/dataset.safetensors")

    teacher = by_name["teacher"]
    run_id = teacher["info"]["run_id"]
    assert teacher["info"]["status"] == "FINISHED"
    params, metrics, tags = (by_key(teacher["data"].get(k, [])) for k in ("params", "metrics", "tags"))
    assert params["teacher.epochs"] == "1" and params["teacher.model"] == "cnn-vgg3"
    assert {"train_loss", "val_loss", "val_accuracy", "epoch_seconds", "best_val_accuracy", "param_count"} <= set(metrics)
    assert tags["dvc.stage"] == "train_teacher" and tags["kdpipe.stage"] == "train_teacher"
    history = mlflow_server.get("mlflow/metrics/get-history", run_id=run_id, metric_key="val_accuracy")["metrics"]
    assert [m["step"] for m in history] == [1]

    weights = work / "artifacts/teacher/model.safetensors"
    assert tags["kdpipe.weights_sha256"] == sha256(weights)
    listed = mlflow_server.get("mlflow/artifacts/list", run_id=run_id)["files"]
    assert [(f["path"], int(f["file_size"])) for f in listed] == [("model.safetensors", weights.stat().st_size)]
    downloaded = mlflow_server.download(teacher["info"]["artifact_uri"], "model.safetensors")
    assert hashlib.sha256(downloaded).hexdigest() == sha256(weights)
    # The bytes went through the server into --artifacts-destination, not onto a path the client chose.
    stored = list(mlflow_server.artifacts_dir.rglob("model.safetensors"))
    assert len(stored) == 1 and run_id in stored[0].parts


def test_unreachable_tracking_server_fails_fast_and_writes_nothing(tmp_path: Path, closed_port: int):
    work = tmp_path / "work"
    write_idx_dir(work / "idx", n_train=200, n_test=50)  # inside: params paths are confined to the project
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params(work / "idx"), sort_keys=False))
    uri = f"http://127.0.0.1:{closed_port}"
    env = clean_env(MLFLOW_TRACKING_URI=uri)

    def assert_fails_clearly(module: str, output: Path) -> None:
        started = time.monotonic()
        result = run_stage(work, module, env=env)
        seconds = time.monotonic() - started
        assert result.returncode == 1, f"{module}:\n{result.stdout}\n{result.stderr}"
        assert uri in result.stderr and "--no-track" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert not output.exists(), f"{module} wrote {output} although it could not track"
        assert seconds < 30, f"{module} took {seconds:.1f}s to notice an unreachable server"

    assert_fails_clearly("stages.download", work / "data/dataset.safetensors")
    assert not (work / "data").exists() or not any((work / "data").iterdir())
    # The way out the message names works, and gives the next stage its input.
    assert run_stage(work, "stages.download", "--no-track", env=env).returncode == 0
    assert_fails_clearly("stages.train_teacher", work / "artifacts/teacher/model.safetensors")
    assert not (work / "metrics").exists()


# --- DVC remote ------------------------------------------------------------------------------------------------


class Project:
    """A throwaway git + DVC copy of the repository (its .dvc/config included) with tiny params."""

    def __init__(self, root: Path, idx: Path) -> None:
        self.root = root
        self.env = clean_env(
            GIT_AUTHOR_NAME="test", GIT_COMMITTER_NAME="test",
            GIT_AUTHOR_EMAIL="test@example.com", GIT_COMMITTER_EMAIL="test@example.com",
        )
        copy_pipeline(REPO, root)
        (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(idx), sort_keys=False))
        self.run("git", "init", "-q")
        self.run("dvc", "init", "-q")
        shutil.copy2(REPO / ".dvc/config", root / ".dvc/config")  # the committed remote setup, as a clone gets it

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(args, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=300)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def commit(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-qm", message)

    def repro(self) -> set[str]:
        return set(re.findall(r"Running stage '([^']+)'", self.run("dvc", "repro").stdout))

    def hashes(self) -> dict[str, str]:
        return {p: sha256(self.root / p) for p in CACHED_OUTPUTS}


@pytest.fixture
def project(tmp_path: Path) -> Project:
    root = tmp_path / "repo"
    write_idx_dir(root / "sources" / "idx", n_train=200, n_test=50)  # inside: params paths are confined to the repo
    return Project(root, root / "sources" / "idx")


def test_push_then_pull_into_an_empty_cache_restores_everything_without_rerunning(tmp_path: Path, project: Project):
    # The committed default remote is a directory beside the clone, outside the repository.
    assert project.run("dvc", "remote", "default").stdout.strip() == "local-storage"
    listed = project.run("dvc", "remote", "list").stdout.split()
    assert listed[:2] == ["local-storage", str(project.root.parent / "kdpipe-dvc-storage")], listed
    remote = tmp_path / "remote"
    project.run("dvc", "remote", "modify", "local-storage", "url", str(remote))
    project.commit("tiny project, remote in tmp")

    assert project.repro() == ALL_STAGES
    project.commit("pipeline results")
    lock, before = (project.root / "dvc.lock").read_text(), project.hashes()

    project.run("dvc", "push")
    assert len([p for p in remote.rglob("*") if p.is_file()]) == len(CACHED_OUTPUTS)
    assert "in sync" in project.run("dvc", "status", "--cloud").stdout

    shutil.rmtree(project.root / ".dvc/cache")
    shutil.rmtree(project.root / "artifacts")
    (project.root / "data/dataset.safetensors").unlink()
    assert "deleted" in project.run("dvc", "status").stdout  # DVC sees the loss before the pull

    project.run("dvc", "pull")
    assert project.hashes() == before
    assert "Data and pipelines are up to date." in project.run("dvc", "status").stdout
    assert project.repro() == set()
    assert (project.root / "dvc.lock").read_text() == lock
