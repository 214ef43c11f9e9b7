"""Stage commands run by hand: clear errors, non-zero exit, nothing written or lost."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from kdpipe.artifacts import sha256_file
from tests.conftest import REPO, write_idx_dir


def run_stage(cwd: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "KDPIPE_", "MLFLOW_"))}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", module, "--no-track", *args], cwd=cwd, env=env, capture_output=True, text=True)


def write_params(cwd: Path, **data) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(data)
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))


def test_download_writes_a_verified_dataset(tmp_path):
    write_idx_dir(tmp_path / "idx")
    write_params(tmp_path, name="local", source=str(tmp_path / "idx"), val_size=50)
    result = run_stage(tmp_path, "stages.download")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("download: wrote data/dataset.safetensors; local from")
    assert (tmp_path / "data/dataset.safetensors").is_file()


def test_corrupt_source_fails_clearly_and_leaves_previous_output_intact(tmp_path):
    idx = tmp_path / "idx"
    write_idx_dir(idx)
    write_params(tmp_path, name="local", source=str(idx), val_size=50)
    assert run_stage(tmp_path, "stages.download").returncode == 0
    before = sha256_file(tmp_path / "data/dataset.safetensors")
    # Flip one byte inside the (uncompressed) payload of a label file: the checksum must catch it.
    gz = idx / "train-labels-idx1-ubyte.gz"
    import gzip

    raw = bytearray(gzip.decompress(gz.read_bytes()))
    raw[-1] ^= 1
    gz.write_bytes(gzip.compress(bytes(raw)))
    result = run_stage(tmp_path, "stages.download")
    assert result.returncode == 1
    assert "checksum mismatch" in result.stderr and "Traceback" not in result.stderr
    assert sha256_file(tmp_path / "data/dataset.safetensors") == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["dataset.safetensors"]


def test_missing_upstream_output_names_the_stage(tmp_path):
    write_params(tmp_path)
    result = run_stage(tmp_path, "stages.train_teacher")
    assert result.returncode == 1
    assert "data/dataset.safetensors: file not found. Run `dvc repro download`" in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    write_params(tmp_path)
    result = run_stage(tmp_path, "stages.train_teacher", "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_every_stage_has_help():
    for module in ("download", "train_teacher", "cache_logits", "distill", "evaluate"):
        result = run_stage(REPO, f"stages.{module}", "--help")
        assert result.returncode == 0 and "--params" in result.stdout, module


def test_data_source_outside_the_repository_needs_the_command_line(tmp_path):
    run_dir, idx = tmp_path / "run", tmp_path / "elsewhere"
    run_dir.mkdir()
    write_idx_dir(idx)
    write_params(run_dir, name="local", source=str(idx), val_size=50)
    refused = run_stage(run_dir, "stages.download")
    assert refused.returncode == 1 and "points outside the repository" in refused.stderr and "--data-source" in refused.stderr
    assert not (run_dir / "data").exists()
    accepted = run_stage(run_dir, "stages.download", "--data-source", str(idx))
    assert accepted.returncode == 0, accepted.stderr


def test_unwritable_output_is_a_clear_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    """Disk full (ENOSPC) or a read-only directory (EROFS) while writing: old file intact, no temp left."""
    import errno

    import torch

    from kdpipe import artifacts
    from kdpipe.errors import KdpipeError

    target = tmp_path / "model.safetensors"
    artifacts.save_tensors(target, {"w": torch.ones(3)}, {"v": 1})
    before = sha256_file(target)
    for code in (errno.ENOSPC, errno.EROFS):
        def failing_fsync(fd, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(artifacts.os, "fsync", failing_fsync)
        try:
            artifacts.save_tensors(target, {"w": torch.zeros(3)}, {"v": 2})
        except KdpipeError as exc:
            assert os.strerror(code) in str(exc) and "previous version of the file, if any, is untouched" in str(exc)
        else:
            raise AssertionError("no error")
        assert sha256_file(target) == before
        assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
