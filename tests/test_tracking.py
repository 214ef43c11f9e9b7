import re


from kdpipe.tracking import StageRun, git_state, tracking_uri
from tests.conftest import REPO


class BrokenMlflow:
    """Stands in for a tracking server that dies after the run started."""

    def __init__(self):
        self.calls = 0

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            self.calls += 1
            raise ConnectionError("server went away")

        return fail


def test_logging_failure_after_training_is_a_warning_and_stops_further_calls(tmp_path, caplog):
    run = StageRun("train_teacher", "teacher", root=tmp_path)
    run._mlflow = broken = BrokenMlflow()
    run.log_metrics({"a": 1.0}, step=1)
    run.log_metrics({"a": 2.0}, step=2)
    run.log_artifact(tmp_path / "model.safetensors")
    run.__exit__(None, None, None)  # must not raise: the weights are already written
    assert broken.calls == 1
    assert "logging stops for this run" in caplog.text


def test_disabled_run_logs_nothing(tmp_path):
    with StageRun("download", "download", enabled=False, root=tmp_path) as run:
        run.log_params({"a": 1})
    assert not (tmp_path / "mlflow.db").exists()


def test_default_store_is_sqlite_at_the_root_and_env_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking_uri(tmp_path) == "http://mlflow.example:5000"


def test_git_state_outside_a_repository(tmp_path):
    assert git_state(tmp_path) == {"git.commit": "unknown", "git.dirty": "unknown"}


def test_no_unpickling_anywhere_in_the_code():
    """Weights load only through safetensors; model specs are JSON."""
    files = [*REPO.glob("kdpipe/*.py"), *REPO.glob("stages/*.py")]
    offenders = [f"{f.name}: {m.group(0)}" for f in files for m in re.finditer(r"torch\.load\(|pickle\.loads?\(|(?<![.\w])eval\(|(?<![.\w])exec\(", f.read_text())]
    assert offenders == []
