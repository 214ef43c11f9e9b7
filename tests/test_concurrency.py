"""Parallel stages against one fresh embedded SQLite store lose no runs and no metrics."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from tests.conftest import REPO, write_idx_dir

WRITERS = 4


def test_parallel_stages_on_a_fresh_sqlite_store_lose_no_runs(tmp_path):
    store = tmp_path / "shared" / "mlflow.db"
    store.parent.mkdir()
    procs = []
    for i in range(WRITERS):
        work = tmp_path / f"run{i}"
        write_idx_dir(work / "idx", n_train=120, n_test=30)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["data"].update(name="local", source="idx", val_size=20 + i)
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "KDPIPE_", "MLFLOW_"))}
        env.update(PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=f"sqlite:///{store}")
        procs.append(subprocess.Popen([sys.executable, "-m", "stages.download"], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("kdpipe").experiment_id])
    assert len(runs) == WRITERS
    assert sorted(int(r.data.params["data.val_size"]) for r in runs) == [20 + i for i in range(WRITERS)]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert {"train_size", "val_size", "test_size", "peak_rss_mb"} <= set(run.data.metrics)
