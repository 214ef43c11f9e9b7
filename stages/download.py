"""Stage 1, download: find, verify and store the dataset as compact tensors.

Looks for the four IDX files in data.source, then $KDPIPE_DATA_SOURCE, then
/usr/share/datasets/<name>/, and only then downloads them from the official
mirrors. Every file is verified before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kdpipe.artifacts import save_tensors, sha256_file
from kdpipe.data import DATASETS, build_split, read_dataset_files
from kdpipe.params import flatten, load_params
from kdpipe.paths import confine, repo_root
from kdpipe.tracking import StageRun
from stages._common import DATA_FILE, DebugOption, NoTrackOption, ParamsOption, stage_command, summary


@stage_command
def main(
    params: Path = ParamsOption,
    data_source: Optional[Path] = typer.Option(
        None, "--data-source", help="Directory with the IDX(.gz) files, anywhere (overrides data.source, which must lie inside the repository)."
    ),
    no_track: bool = NoTrackOption,
    debug: bool = DebugOption,
) -> None:
    """Verify the dataset's IDX files and write data/dataset.safetensors (uint8 images, int64 labels, train/val/test)."""
    p = load_params(params).data
    spec = DATASETS[p.name]
    if data_source is not None:
        source = str(data_source)
    elif p.source:
        source = str(confine(p.source, repo_root(), "data.source", "--data-source PATH or KDPIPE_DATA_SOURCE=PATH"))
    else:
        source = ""
    with StageRun("download", "download", enabled=not no_track) as run:
        run.log_params(flatten("data", p))
        arrays, hashes, origin = read_dataset_files(spec, source)
        data, index = build_split(p.name, arrays, hashes, p.val_size, p.split_seed, spec.classes, origin)
        save_tensors(DATA_FILE, {**data.tensors(), **index}, data.meta)
        sizes = {f"{s}_size": int(getattr(data, f"{s}_labels").shape[0]) for s in ("train", "val", "test")}
        run.log_metrics(sizes)
        run.set_tags({"kdpipe.data_origin": origin, "kdpipe.data_sha256": sha256_file(DATA_FILE)})
    summary("download", [DATA_FILE], f"{p.name} from {origin}: {sizes['train_size']} train, {sizes['val_size']} val, {sizes['test_size']} test images")


if __name__ == "__main__":
    typer.run(main)
