"""Copy the pipeline into a fresh directory, for benchmarks and tests that need a throwaway project."""

from __future__ import annotations

import shutil
from pathlib import Path

PIPELINE_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "stages", "kdpipe")


def copy_pipeline(repo: Path, dest: Path) -> Path:
    """Copy what ``dvc repro`` needs (pipeline, params, code) from ``repo`` into ``dest``; returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PIPELINE_FILES:
        src = repo / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest
