"""Scaling of the training loop: the plain single-process loop vs Ray Train with 1 and 2 workers.

    python benchmarks/scaling.py                       # tiny preset on the built-in dataset, CPU
    python benchmarks/scaling.py --iterations 120 --threads 2 --preset-overrides model.backbone=resnet50

Every run uses the same per-worker batch B (the global batch is B x workers) and the same torch thread count per
training process, and is timed in steady state: from the report after `--warmup` iterations to the last report
before the final validation (so model building, Ray start-up and evaluation are excluded).

- plain (memory): `run_local` over batches decoded once up front: the compute-only ceiling.
- plain (iter_local): `run_local` reading and augmenting in the training process, as a user without Ray would.
- ray 1 / ray 2 workers: `csl_ray.train.fit` (Ray Data decoding in separate processes, DDP over gloo for 2),
  with Ray workers at normal priority (Ray nices them to 15 by default).

Reported: iterations/s, images/s (labelled + unlabelled rows: 3B per worker per iteration), the Ray 1-worker rate
over the plain loop's, and the 2-worker over the 1-worker images/s (ideal 2x). Writes benchmarks/results/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import ray
import torch

from csl_ray.config import Config, load_config
from csl_ray.data.ray_datasets import data_cpus
from csl_ray.data.reader import iter_local
from csl_ray.loop import run_local
from csl_ray.ray_session import job_runtime_env
from csl_ray.tracking import RunDir
from csl_ray.train import fit


def steady_rate(points: list[tuple[int, float]], warmup: int) -> float:
    """Iterations/s between the first (step, time) point at or after `warmup` and the last point."""
    points = [p for p in points if p[0] >= warmup]
    if len(points) < 2:
        raise ValueError(f"need two timed points after iteration {warmup}; run more iterations")
    (s0, t0), (s1, t1) = points[0], points[-1]
    return (s1 - s0) / (t1 - t0)


def config(args: argparse.Namespace, workers: int, out: str) -> Config:
    return load_config(
        preset="tiny",
        overrides=[
            f"data.global_batch_size={args.batch * max(workers, 1)}",
            f"ray.num_workers={workers}",
            f"ray.cpus_per_worker={args.threads}",
            f"train.iterations={args.iterations}",
            f"train.eval_every={args.iterations}",
            f"train.checkpoint_every={args.iterations}",
            "logging.log_every=10",
            "logging.image_every=0",
            f"train.output_dir={out}",
            *args.preset_overrides,
        ],
    )


def bench_plain(cfg: Config, warmup: int, in_memory: bool) -> float:
    labeled, unlabeled = iter_local(cfg, "labeled"), iter_local(cfg, "unlabeled")
    if in_memory:  # decode enough distinct batches once; run_local cycles the lists
        labeled = [b for _, b in zip(range(16), labeled, strict=False)]
        unlabeled = [b for _, b in zip(range(16), unlabeled, strict=False)]
    points: list[tuple[int, float]] = []

    def log(metrics: dict) -> None:
        if "miou" not in metrics:
            points.append((int(metrics["step"]), time.perf_counter()))

    val = [b for _, b in zip(range(2), iter_local(cfg, "val"), strict=False)]
    run_local(cfg, labeled, unlabeled, val, device="cpu", log=log)
    return steady_rate(points, warmup)  # log() runs after each logged step, before any validation


def bench_ray(cfg: Config, warmup: int) -> float:
    summary = fit(cfg)
    rows = [r for r in RunDir(summary["run_dir"]).read_metrics() if r["step"] < cfg.train.iterations]
    return steady_rate([(r["step"], r["time"]) for r in rows], warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=60, help="iterations per run (default 60)")
    parser.add_argument("--warmup", type=int, default=10, help="iterations excluded from the timing (default 10)")
    parser.add_argument("--batch", type=int, default=4, help="per-worker batch B (default 4, as the tiny preset)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training process (default 1)")
    parser.add_argument("--preset-overrides", nargs="*", default=[], metavar="KEY=VALUE", help="tiny preset changes")
    parser.add_argument("--out", default="benchmarks/results/scaling.json", help="JSON results file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as out:
        rates["plain (memory)"] = bench_plain(config(args, 0, out), args.warmup, in_memory=True)
        rates["plain (iter_local)"] = bench_plain(config(args, 0, out), args.warmup, in_memory=False)
        two = config(args, 2, out)
        # Logical CPUs for 2 workers plus their data pipelines, even above the physical count (see init_ray).
        # Ray runs its workers at nice 15; on a shared machine that alone would slow them against the plain loop.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # address=local: a private Ray of exactly this size even when a cluster runs on the machine; its processes
        # set as a training job's (init_ray).
        cpus = int(2 * args.threads + data_cpus(two)) + 1
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, runtime_env=job_runtime_env())
        try:
            rates["ray 1 worker"] = bench_ray(config(args, 1, out), args.warmup)
            rates["ray 2 workers"] = bench_ray(two, args.warmup)
        finally:
            ray.shutdown()
    workers = {"plain (memory)": 1, "plain (iter_local)": 1, "ray 1 worker": 1, "ray 2 workers": 2}
    images = {k: v * 3 * args.batch * workers[k] for k, v in rates.items()}
    results = {
        "cpus": os.cpu_count(),
        "args": vars(args),
        "iterations_per_s": rates,
        "images_per_s": images,
        "ray1_over_plain_memory": rates["ray 1 worker"] / rates["plain (memory)"],
        "ray1_over_plain_iter_local": rates["ray 1 worker"] / rates["plain (iter_local)"],
        "ray2_over_ray1_images": images["ray 2 workers"] / images["ray 1 worker"],
    }
    print("| run | it/s | images/s |\n|---|---|---|")
    for key in rates:
        print(f"| {key} | {rates[key]:.2f} | {images[key]:.1f} |")
    print(
        f"\nray 1 worker / plain: {results['ray1_over_plain_memory']:.2f}x (memory), "
        f"{results['ray1_over_plain_iter_local']:.2f}x (iter_local); "
        f"ray 2 / 1 workers (images/s): {results['ray2_over_ray1_images']:.2f}x on {os.cpu_count()} CPUs"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
