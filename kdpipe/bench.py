"""Benchmark: kdpipe's training engine against the seed's loop and the machine's compute bound.

    python -m kdpipe.bench [--data-dir /usr/share/datasets/fashion-mnist] [--repeats 3] [--skip-repro]

Measures, in one run and on the real Fashion-MNIST: fp32 GEMM throughput at
the models' shapes; one student distillation epoch from cached logits, with an
online teacher, and written the way the seed does it (torchvision dataset +
ToTensor + DataLoader, online teacher); one teacher epoch; caching the logits
of the whole training set; and peak RSS per pipeline stage with the wall time
of a full and a no-op ``dvc repro``. Prints a table and writes JSON
(``metrics/bench.json`` by default; not a DVC stage).

The compute bound of an epoch is the time its GEMMs alone take at the measured
throughput: per Linear layer and step, the forward product, the weight
gradient and (except for the first layer) the input gradient.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kdpipe.data import DATASETS, IDX_NAMES, build_split, read_dataset_files
from kdpipe.logits import compute_cache
from kdpipe.losses import cross_entropy, make_loss
from kdpipe.models import build_model, make_spec
from kdpipe.scaffold import copy_pipeline
from kdpipe.train import fit, seed_everything

BATCH = 128


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# ------------------------------------------------------------------ compute bound


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def gemm_seconds(m: int, k: int, n: int, repeats: int = 20) -> float:
    """Median time of one fp32 [m,k] @ [k,n] product."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    return median_time(lambda: torch.mm(a, b, out=out), repeats, warmup=3)


def step_gemms(shapes: list[tuple[int, int]], batch: int) -> list[tuple[str, int, int, int]]:
    """The GEMMs of one training step: forward, weight gradient, input gradient (not for layer 1)."""
    gemms = []
    for i, (fan_in, fan_out) in enumerate(shapes):
        gemms.append((f"fwd {fan_in}x{fan_out}", batch, fan_in, fan_out))
        gemms.append((f"wgrad {fan_in}x{fan_out}", fan_out, batch, fan_in))
        if i > 0:
            gemms.append((f"igrad {fan_in}x{fan_out}", batch, fan_out, fan_in))
    return gemms


def compute_bound(model: nn.Module, n_samples: int, batch: int) -> dict[str, float]:
    """FLOPs of one training epoch and the time its GEMMs take at the throughput measured per shape."""
    steps, last = divmod(n_samples, batch)
    flops = seconds = 0.0
    for _, m, k, n in step_gemms(linear_shapes(model), batch):
        t = gemm_seconds(m, k, n)
        flops += 2.0 * m * k * n * steps
        seconds += t * steps
    if last:
        for _, m, k, n in step_gemms(linear_shapes(model), last):
            flops += 2.0 * m * k * n
            seconds += gemm_seconds(m, k, n, repeats=5)
    return {"gflop": flops / 1e9, "bound_seconds": seconds, "gflops_at_shapes": flops / seconds / 1e9}


def peak_gemm_gflops() -> float:
    size = 1024
    return 2 * size**3 / gemm_seconds(size, size, size, repeats=10) / 1e9


# ------------------------------------------------------------------ epochs


def kd_epoch(student_spec: dict, data, *, soft_targets=None, teacher=None) -> float:
    """One kdpipe-engine epoch (T=4, alpha=0.9), training time only."""
    seed_everything(0)
    student = build_model(student_spec)
    result = fit(
        student, data.train_images, data.train_labels, val_images=data.val_images[:10], val_labels=data.val_labels[:10],
        loss_fn=make_loss("kd", temperature=4.0, alpha=0.9), soft_targets=soft_targets, teacher=teacher,
        epochs=1, batch_size=BATCH, lr=1e-3, weight_decay=0.0, seed=0,
    )
    return result.history[0].seconds


def seed_style_epoch(raw_root: Path, student_spec: dict, teacher: nn.Module) -> float:
    """The seed quickstart's loop: torchvision dataset + ToTensor + DataLoader, online teacher, same models and optimizer."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    dataset = datasets.FashionMNIST(str(raw_root), train=True, download=False, transform=transforms.ToTensor())
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True)
    seed_everything(0)
    student = build_model(student_spec)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    loss_fn = make_loss("kd", temperature=4.0, alpha=0.9)
    teacher.eval()
    student.train()
    started = time.perf_counter()
    for x, y in loader:
        x = (x * 255).to(torch.uint8)  # our models take raw pixels; the seed normalised with ToTensor alone
        with torch.no_grad():
            t = teacher(x)
        loss = loss_fn(student(x), y, t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def teacher_epoch(teacher_spec: dict, data) -> float:
    seed_everything(0)
    model = build_model(teacher_spec)
    result = fit(
        model, data.train_images, data.train_labels, val_images=data.val_images[:10], val_labels=data.val_labels[:10],
        loss_fn=cross_entropy, epochs=1, batch_size=BATCH, lr=1e-3, weight_decay=0.0, seed=0,
    )
    return result.history[0].seconds


# ------------------------------------------------------------------ pipeline


def pipeline_runs(repo: Path, data_dir: Path) -> dict[str, Any]:
    """Full default `dvc repro` and a no-op one in a throwaway copy; peak RSS per stage from MLflow."""
    work = Path(tempfile.mkdtemp(prefix="kdpipe-bench-"))
    try:
        copy_pipeline(repo, work)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["KDPIPE_DATA_SOURCE"] = str(data_dir)
        env.setdefault("GIT_AUTHOR_NAME", "bench")
        env.setdefault("GIT_AUTHOR_EMAIL", "bench@example.com")
        env.setdefault("GIT_COMMITTER_NAME", "bench")
        env.setdefault("GIT_COMMITTER_EMAIL", "bench@example.com")

        def run(*args: str) -> str:
            return subprocess.run(args, cwd=work, env=env, check=True, capture_output=True, text=True).stdout

        run("git", "init", "-q")
        run("dvc", "init", "-q")
        run("git", "add", "-A")
        run("git", "commit", "-qm", "bench")
        started = time.perf_counter()
        out = run("dvc", "repro")
        full = time.perf_counter() - started
        stages = re.findall(r"Running stage '([^']+)'", out)
        noops = []
        for _ in range(3):
            started = time.perf_counter()
            run("dvc", "repro")
            noops.append(time.perf_counter() - started)

        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("kdpipe")
        rss = {}
        for r in client.search_runs([experiment.experiment_id]):
            if "mlflow.parentRunId" not in r.data.tags and "peak_rss_mb" in r.data.metrics:
                rss[r.info.run_name] = r.data.metrics["peak_rss_mb"]
        return {"full_repro_seconds": full, "noop_repro_seconds": statistics.median(noops), "stages_run": stages, "peak_rss_mb": rss}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ main


def prepare_torchvision_root(data_dir: Path) -> Path:
    """torchvision's FashionMNIST(download=False) expects decompressed files under <root>/FashionMNIST/raw."""
    root = Path(tempfile.mkdtemp(prefix="kdpipe-tv-"))
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in IDX_NAMES.values():
        gz = data_dir / f"{name}.gz"
        (raw / name).write_bytes(gzip.decompress(gz.read_bytes()) if gz.exists() else (data_dir / name).read_bytes())
    return root


def run_benchmark(data_dir: Path, repeats: int, skip_repro: bool, repo: Path) -> dict[str, Any]:
    torch.set_num_threads(os.cpu_count() or 1)
    arrays, hashes, _ = read_dataset_files(DATASETS["fashion-mnist"], str(data_dir))
    data, _ = build_split("fashion-mnist", arrays, hashes, 5000, 0, DATASETS["fashion-mnist"].classes)
    m = data.meta
    mk = lambda name, dropout: make_spec(name, num_classes=10, image_shape=m["image_shape"], mean=m["mean"], std=m["std"], dropout=dropout)  # noqa: E731
    student_spec, teacher_spec = mk("mlp-800", 0.0), mk("mlp-1200-1200", 0.2)
    seed_everything(0)
    teacher = build_model(teacher_spec).eval()
    n = data.train_images.shape[0]
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}",
        "torch_threads": torch.get_num_threads(),
        "train_images": n,
        "batch_size": BATCH,
        "repeats": repeats,
    }
    results["gemm_peak_gflops_1024"] = peak_gemm_gflops()
    results["student_bound"] = compute_bound(build_model(student_spec), n, BATCH)
    results["teacher_bound"] = compute_bound(build_model(teacher_spec), n, BATCH)

    cache_seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        cache = compute_cache(teacher, {"train": torch.cat([data.train_images, data.val_images]), "val": data.val_images[:1]}, 2048)
        cache_seconds.append(time.perf_counter() - started)
    results["cache_60k_seconds"] = statistics.median(cache_seconds)
    soft = cache["train_logits"][:n]

    results["distill_cached_seconds"] = statistics.median(kd_epoch(student_spec, data, soft_targets=soft) for _ in range(repeats))
    results["distill_online_seconds"] = statistics.median(kd_epoch(student_spec, data, teacher=teacher) for _ in range(repeats))
    tv_root = prepare_torchvision_root(data_dir)
    try:
        results["seed_style_seconds"] = statistics.median(seed_style_epoch(tv_root, student_spec, teacher) for _ in range(max(1, repeats - 1)))
    finally:
        shutil.rmtree(tv_root, ignore_errors=True)
    results["teacher_epoch_seconds"] = statistics.median(teacher_epoch(teacher_spec, data) for _ in range(repeats))
    if not skip_repro:
        results["pipeline"] = pipeline_runs(repo, data_dir)
    return results


def format_table(r: dict[str, Any]) -> str:
    sb, tb = r["student_bound"], r["teacher_bound"]
    cached = r["distill_cached_seconds"]
    rows = [
        ("fp32 GEMM, 1024^3", f"{r['gemm_peak_gflops_1024']:.1f} GFLOP/s", ""),
        ("fp32 GEMM at student shapes (b=128)", f"{sb['gflops_at_shapes']:.1f} GFLOP/s", ""),
        ("fp32 GEMM at teacher shapes (b=128)", f"{tb['gflops_at_shapes']:.1f} GFLOP/s", ""),
        ("student epoch compute bound", f"{sb['bound_seconds']:.2f} s", f"{sb['gflop']:.0f} GFLOP"),
        ("distill epoch, cached logits (kdpipe)", f"{cached:.2f} s", f"{cached / sb['bound_seconds']:.2f}x bound"),
        ("distill epoch, online teacher (kdpipe)", f"{r['distill_online_seconds']:.2f} s", f"cached is {r['distill_online_seconds'] / cached:.1f}x faster"),
        ("distill epoch, seed-style DataLoader loop", f"{r['seed_style_seconds']:.2f} s", f"cached is {r['seed_style_seconds'] / cached:.1f}x faster"),
        ("teacher epoch compute bound", f"{tb['bound_seconds']:.2f} s", f"{tb['gflop']:.0f} GFLOP"),
        ("teacher epoch (kdpipe)", f"{r['teacher_epoch_seconds']:.2f} s", f"{r['teacher_epoch_seconds'] / tb['bound_seconds']:.2f}x bound"),
        ("cache logits of 60,000 images", f"{r['cache_60k_seconds']:.2f} s", ""),
    ]
    if "pipeline" in r:
        p = r["pipeline"]
        rows.append(("full default dvc repro", f"{p['full_repro_seconds']:.0f} s", f"{len(p['stages_run'])} stages"))
        rows.append(("no-op dvc repro", f"{p['noop_repro_seconds']:.2f} s", ""))
        for stage, mb in sorted(p["peak_rss_mb"].items()):
            rows.append((f"peak RSS, {stage}", f"{mb:.0f} MB", ""))
    width = max(len(a) for a, _, _ in rows)
    lines = [f"kdpipe benchmark, {r['date']}, {r['machine']} (median of {r['repeats']})", ""]
    lines += [f"{a:<{width}}  {b:>14}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdpipe.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"), help="directory with the Fashion-MNIST IDX(.gz) files")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per measurement (median reported)")
    parser.add_argument("--skip-repro", action="store_true", help="skip the full and no-op dvc repro (about 3.5 minutes)")
    parser.add_argument("--out", type=Path, default=Path("metrics/bench.json"), help="where to write the JSON results")
    args = parser.parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    results = run_benchmark(args.data_dir, args.repeats, args.skip_repro, repo)
    print(format_table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
