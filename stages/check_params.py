"""Stage 0, check_params: validate the whole params file whenever any value in it changes.

DVC reruns a stage only for the params keys it declares, so a misspelt key
(`dvc exp run -S distill.temprature=8` adds one silently) would change
nothing and no code would see it. This stage declares the whole file, runs on
every change, and fails with the typo named. It writes nothing.
"""

from __future__ import annotations

from pathlib import Path

import typer

from kdpipe.params import load_params
from stages._common import DebugOption, ParamsOption, stage_command


@stage_command
def main(params: Path = ParamsOption, debug: bool = DebugOption) -> None:
    """Validate every section and key of the params file (names, types, ranges)."""
    p = load_params(params)
    typer.echo(f"check_params: {params} is valid (dataset {p.data.name}, teacher {p.teacher.model}, student {p.distill.student})")


if __name__ == "__main__":
    typer.run(main)
