"""torchrun/DDP on CPU (gloo): two processes train like one with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kdpipe.artifacts import load_tensors
from tests.conftest import REPO, write_idx_dir

pytestmark = pytest.mark.e2e


def env_for(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "KDPIPE_", "MLFLOW_"))}
    env["PYTHONPATH"] = str(REPO)
    env["KDPIPE_DATA_SOURCE"] = str(root.parent / "idx")
    return env


def make_run_dir(root: Path) -> None:
    root.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(name="local", source="", val_size=100)
    for section in ("teacher", "distill"):
        params[section].update(epochs=2, batch_size=32, dropout=0.0, device="cpu")
    params["cache"].update(min_val_accuracy=0.0, device="cpu")
    # The MLP teacher: batch norm (the CNN teachers) normalises each process's share of the
    # batch separately under DDP, so a CNN's weights legitimately differ from one process's.
    params["teacher"]["model"] = "mlp-1200-1200"
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def stage(root: Path, module: str, *args: str, nproc: int = 1, track: bool = False) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", module, *args, *([] if track else ["--no-track"])]
    result = subprocess.run(cmd, cwd=root, env=env_for(root), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_tensors(path)[0]


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    write_idx_dir(tmp_path / "idx", n_train=1100, n_test=100)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    for root in (single, ddp):
        make_run_dir(root)
        stage(root, "stages.download")
    stage(single, "stages.train_teacher")
    out = stage(ddp, "stages.train_teacher", nproc=2, track=True)
    assert out.stdout.count("train_teacher: wrote") == 1  # only rank 0 writes and reports

    a = weights(single / "artifacts/teacher/model.safetensors")
    b = weights(ddp / "artifacts/teacher/model.safetensors")
    # Same data, order and global batch; only the summation order of the gradient differs.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
    history = json.loads((ddp / "metrics/history/teacher.json").read_text())
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert abs(history[-1]["val_accuracy"] - json.loads((single / "metrics/history/teacher.json").read_text())[-1]["val_accuracy"]) <= 0.02

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ddp / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("kdpipe").experiment_id])
    assert [r.info.run_name for r in runs] == ["teacher"]  # one run, from rank 0

    # Distillation from the cached logits of the (single-process) teacher, in both directories.
    for root in (single, ddp):
        (root / "artifacts/teacher").mkdir(parents=True, exist_ok=True)
        (root / "artifacts/teacher/model.safetensors").write_bytes((single / "artifacts/teacher/model.safetensors").read_bytes())
        stage(root, "stages.cache_logits")
    stage(single, "stages.distill", "--variant", "kd")
    out = stage(ddp, "stages.distill", "--variant", "kd", nproc=2)
    assert out.stdout.count("distill@kd: wrote") == 1
    a = weights(single / "artifacts/students/kd/model.safetensors")
    b = weights(ddp / "artifacts/students/kd/model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
