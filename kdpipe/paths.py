"""Where the repository is, and keeping paths from params inside it."""

from __future__ import annotations

import os
from pathlib import Path

from kdpipe.errors import KdpipeError


def repo_root(start: Path | None = None) -> Path:
    """``$DVC_ROOT``, else the nearest directory upward holding ``.dvc``, else the start directory."""
    env = os.environ.get("DVC_ROOT")
    if env:
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / ".dvc").is_dir():
            return candidate
    return here


def confine(path: str | Path, root: Path, key: str, escape_hatch: str) -> Path:
    """``path`` resolved against ``root``, refused if it leaves it.

    A params file can come from anyone (a pull request, ``dvc exp run -S``);
    a path outside the repository must be given explicitly by the person
    running the command, via ``escape_hatch``.
    """
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise KdpipeError(
            f"params: `{key}` is {str(path)!r}, which points outside the repository ({root}). Paths in params.yaml "
            f"are confined to the repository; to use {resolved}, pass it explicitly with {escape_hatch}."
        )
    return resolved
