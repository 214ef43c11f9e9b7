"""MLflow: one run per stage execution, with the tags that tie it to DVC and git.

The default store is an embedded SQLite file at the repository root
(``$DVC_ROOT`` when DVC runs the stage, which for ``dvc exp run --queue`` is
the parent repository, not the temp copy), with artifacts beside it.
``MLFLOW_TRACKING_URI`` overrides it, e.g. a team's tracking server.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import resource
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from kdpipe.errors import KdpipeError
from kdpipe.paths import repo_root

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "kdpipe"
STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / STORE_FILE}"


def git_state(root: Path) -> dict[str, str]:
    """Commit and dirty flag of the working tree (tracked files only)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail before training, not after, when a tracking server does not answer."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):  # noqa: S310
            return
    except OSError as exc:
        raise KdpipeError(
            f"MLflow tracking server {uri} is unreachable ({exc}). Start it, fix MLFLOW_TRACKING_URI, "
            f"or pass --no-track to run without logging. Nothing was trained."
        ) from None


@contextlib.contextmanager
def sqlite_store_lock(uri: str) -> Iterator[None]:
    """Serialise creating an embedded SQLite store and its experiment across processes.

    Two stages starting at once against a fresh store (`dvc exp run --jobs 2`)
    would both run MLflow's schema migrations, and one fails with "table
    already exists". Later writes are short and SQLite's busy timeout covers them.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class StageRun:
    """One MLflow run for one stage execution; a no-op when tracking is disabled.

    Use as a context manager: the run ends FINISHED, or FAILED when the body raises.
    """

    def __init__(self, stage: str, run_name: str, *, enabled: bool = True, root: Path | None = None) -> None:
        self.stage, self.run_name, self.enabled = stage, run_name, enabled
        self.root = root or repo_root()
        self._mlflow: Any = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._failed = False

    def __enter__(self) -> "StageRun":
        if not self.enabled:
            return self
        import mlflow  # slow import: only when tracking

        uri = tracking_uri(self.root)
        check_reachable(uri)
        mlflow.set_tracking_uri(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
        try:
            with sqlite_store_lock(uri):
                run = self._start(mlflow, uri, name)
        except Exception as exc:  # MLflow raises many types; the user needs the URI and a way out.
            raise KdpipeError(
                f"MLflow tracking at {uri} failed before training ({exc}). Fix MLFLOW_TRACKING_URI or pass --no-track."
            ) from None
        self._mlflow, self.run_id = mlflow, run.info.run_id
        return self

    def _start(self, mlflow: Any, uri: str, name: str) -> Any:
        """Create the store, the experiment and the run (under the store lock for SQLite)."""
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            artifact_location = None
            if uri.startswith("sqlite:"):
                artifact_location = (self.root / ARTIFACT_DIR).as_uri()
            try:
                experiment_id = mlflow.create_experiment(name, artifact_location=artifact_location)
            except mlflow.exceptions.MlflowException:
                # Another process created it at the same moment (a tracking server has no file lock).
                experiment_id = mlflow.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        tags = {
            "dvc.stage": os.environ.get("DVC_STAGE", self.stage),
            "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
            "kdpipe.stage": self.stage,
            **git_state(self.root),
        }
        self.experiment_id = experiment_id
        return mlflow.start_run(experiment_id=experiment_id, run_name=self.run_name, tags=tags)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._mlflow is not None:
            # Peak memory of the stage process so far (Linux reports KiB), for capacity planning.
            self.log_metrics({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
            # Skipped after a logging failure: the run then stays RUNNING in the store rather than hang here.
            self._safely("end the run", self._mlflow.end_run, status="FAILED" if exc_type else "FINISHED")

    def _safely(self, what: str, fn, *args, **kwargs) -> None:
        """Logging after training must never lose the weights already written: warn, go on."""
        if self._mlflow is None or self._failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            # Stop logging for the rest of the run: each call to a dead server would retry for minutes.
            self._failed = True
            log.warning("MLflow: could not %s (%s); logging stops for this run, the stage's files are written regardless.", what, exc)

    def log_params(self, params: dict[str, Any]) -> None:
        self._safely("log params", self._mlflow and self._mlflow.log_params, params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._safely("log metrics", self._mlflow and self._mlflow.log_metrics, metrics, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._safely("set tags", self._mlflow and self._mlflow.set_tags, tags)

    def log_artifact(self, path: str | Path) -> None:
        self._safely("log artifact", self._mlflow and self._mlflow.log_artifact, str(path))

    def log_child(self, run_name: str, metrics: dict[str, float], tags: dict[str, str]) -> None:
        """A nested run (e.g. one per evaluated model) so the UI can compare models side by side."""
        if self._mlflow is None:
            return
        mlflow = self._mlflow

        def child() -> None:
            with mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name, nested=True, tags={"kdpipe.stage": self.stage, **tags}):
                mlflow.log_metrics(metrics)

        self._safely(f"log nested run {run_name}", child)
