import pytest
import torch

from kdpipe.artifacts import load_tensors, save_tensors, sha256_file, write_json
from kdpipe.errors import KdpipeError


def test_round_trip_with_metadata(tmp_path):
    path = tmp_path / "a" / "t.safetensors"
    tensors = {"w": torch.randn(3, 4), "idx": torch.arange(5)}
    meta = {"b": [1, 2], "a": {"nested": "x"}}
    save_tensors(path, tensors, meta)
    got, got_meta = load_tensors(path)
    assert got_meta == meta
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    assert oct(path.stat().st_mode & 0o777) != "0o600"


def test_same_content_gives_identical_bytes(tmp_path):
    tensors = {"z": torch.ones(2), "a": torch.zeros(3)}
    meta = {k: k * 3 for k in "qwertyuiopasdfghjkl"}  # many keys: random order would show
    for i in range(3):
        save_tensors(tmp_path / f"{i}.st", tensors, dict(reversed(list(meta.items()))) if i % 2 else meta)
    assert len({sha256_file(tmp_path / f"{i}.st") for i in range(3)}) == 1


def test_truncated_and_foreign_files_are_clear_errors(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"w": torch.randn(100)}, {"x": 1})
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(KdpipeError, match="not a valid safetensors file"):
        load_tensors(path, made_by="train_teacher")
    path.write_text("hello, I am not safetensors")
    with pytest.raises(KdpipeError, match="dvc repro train_teacher"):
        load_tensors(path, made_by="train_teacher")


def test_missing_file_names_the_stage(tmp_path):
    with pytest.raises(KdpipeError, match="dvc repro cache_logits"):
        load_tensors(tmp_path / "none.safetensors", made_by="cache_logits")


def test_atomic_write_leaves_no_temp_files(tmp_path):
    write_json(tmp_path / "m.json", {"b": 1, "a": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
