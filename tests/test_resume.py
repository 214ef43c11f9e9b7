"""A real stage process killed with SIGKILL mid-epoch resumes to byte-identical weights."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from kdpipe.artifacts import sha256_file
from tests.conftest import REPO, write_idx_dir

TEACHER = Path("artifacts/teacher/model.safetensors")


def prepare(root: Path, idx: Path, epochs: int = 3) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(name="local", source="", val_size=200)
    params["teacher"].update(epochs=epochs, batch_size=16)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "KDPIPE_", "MLFLOW_"))}
    env["PYTHONPATH"] = str(REPO)
    env["KDPIPE_DATA_SOURCE"] = str(idx)  # outside the run directory: given explicitly, not through params
    subprocess.run([sys.executable, "-m", "stages.download", "--no-track"], cwd=root, env=env, check=True, capture_output=True)
    return env


def teacher_cmd() -> list[str]:
    return [sys.executable, "-m", "stages.train_teacher", "--no-track"]


def test_sigkill_in_second_epoch_then_rerun_gives_identical_weights(tmp_path):
    idx = tmp_path / "idx"
    write_idx_dir(idx, n_train=4200, n_test=50)
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    for d in (reference, interrupted):
        d.mkdir()
    env = prepare(reference, idx)
    prepare(interrupted, idx)
    subprocess.run(teacher_cmd(), cwd=reference, env=env, check=True, capture_output=True)

    proc = subprocess.Popen(teacher_cmd(), cwd=interrupted, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = None
    for line in proc.stderr:  # one plain line per epoch when not on a terminal
        if "teacher epoch 1/3" in line:
            started = time.perf_counter()
            break
    assert started is not None, "the stage never finished its first epoch"
    epoch_seconds = float(line.rsplit(",", 1)[1].strip().rstrip("s"))
    # Epoch times vary with machine load: stay early in the second epoch.
    time.sleep(random.uniform(0.05, 0.3) * epoch_seconds)
    assert proc.poll() is None, "the stage finished before it could be killed; make the epochs longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (interrupted / TEACHER).exists()
    assert (interrupted / ".kdpipe/checkpoints/teacher.safetensors").exists()

    resumed = subprocess.run(teacher_cmd(), cwd=interrupted, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the checkpoint of epoch 1/3" in resumed.stderr
    assert "teacher epoch 1/3" not in resumed.stderr
    assert sha256_file(interrupted / TEACHER) == sha256_file(reference / TEACHER)
    assert not (interrupted / ".kdpipe/checkpoints/teacher.safetensors").exists()


def test_checkpoint_from_other_params_is_not_resumed(tmp_path):
    idx = tmp_path / "idx"
    write_idx_dir(idx, n_train=600, n_test=50)
    env = prepare(tmp_path, idx, epochs=10)  # long enough that Ctrl-C after epoch 1 lands mid-run
    ckpt = tmp_path / ".kdpipe/checkpoints/teacher.safetensors"
    # A shell that starts a job in the background (`cmd &`) makes it ignore SIGINT, and children
    # inherit that: restore the default so Ctrl-C behaves as on a terminal, however pytest was started.
    proc = subprocess.Popen(
        teacher_cmd(), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in proc.stderr:
        if "teacher epoch 1/10" in line:
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate()
    assert proc.returncode == 130 and "resume" in err and ckpt.exists()
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["teacher"]["lr"] = 0.003  # differs from the default
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rerun = subprocess.run(teacher_cmd(), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0 and "resuming" not in rerun.stderr and "teacher epoch 1/10" in rerun.stderr
