"""Time breakdown of one CSL training iteration by phase, and the selector's share of it (goal: <= 3 %).

    python benchmarks/step.py                     # tiny preset (resnet18 OS16, crop 64, batch 8, fp32) on CPU
    python benchmarks/step.py --device cuda       # pascal preset: resnet101 OS8, crop 321, batch 8, bf16
    python benchmarks/step.py --device cuda ssl.selector.kind=threshold   # any config override

Batches are synthetic and already on the device (as Ray Data's iter_torch_batches hands them over), so the
table covers the training process only. Phases are timed with a CUDA sync at each boundary, which removes
CPU/GPU overlap; the unsynchronised step time is printed as well.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from csl_ray.config import load_config
from csl_ray.loop import TrainLoop
from csl_ray.masking import cutmix_box, tmp_cells
from csl_ray.step import PhaseTimer

PHASES = (
    "inputs",
    "teacher",
    "selector",
    "masking",
    "student_forward",
    "loss",
    "backward",
    "optimizer",
    "teacher_update",
)


def synthetic_batches(cfg, batch: int, device: torch.device, seed: int = 0) -> tuple[dict, dict]:
    """A labelled batch and an unlabelled one (each row with its CutMix partner) of `batch` rows in the step's
    schema."""
    g = torch.Generator().manual_seed(seed)
    size, classes = cfg.data.crop_size, cfg.data.num_classes

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)

    labeled = {"image": images(batch), "mask": torch.randint(0, classes, (batch, size, size), generator=g)}
    n = batch
    tmp = cfg.ssl.tmp
    unlabeled = {
        "image_weak": images(n),
        "image_strong": images(n),
        "image_masked": images(n),
        "tmp_cells": torch.stack([tmp_cells(size, tmp.block, tmp.mask_ratio, g) for _ in range(n)]),
        "cutmix_box": torch.stack([cutmix_box(size, cfg.ssl.cutmix_prob, g) for _ in range(n)]),
        "valid": torch.ones(n, size, size, dtype=torch.bool),
        "mask": torch.randint(0, classes, (n, size, size), generator=g, dtype=torch.uint8),
        "partner_weak": images(n),
        "partner_strong": images(n),
        "partner_valid": torch.ones(n, size, size, dtype=torch.bool),
    }
    for valid in (unlabeled["valid"], unlabeled["partner_valid"]):
        valid[:, -size // 8 :] = False  # some padding, as a crop of a small image has
    move = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731
    return move(labeled), move(unlabeled)


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    text = f"{platform.system()} {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads"
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--preset", default=None, help="config preset (default: tiny on CPU, pascal on CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="rows per batch (default: data.global_batch_size)")
    parser.add_argument("--steps", type=int, default=10, help="timed iterations (default: 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default: 3)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this path")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = parser.parse_args()

    device = torch.device(args.device)
    preset = args.preset or ("pascal" if device.type == "cuda" else "tiny")
    cfg = load_config(preset=preset, overrides=[*args.overrides, f"train.iterations={args.warmup + 2 * args.steps}"])
    batch = args.batch or cfg.data.global_batch_size
    loop = TrainLoop(cfg, device)
    labeled, unlabeled = synthetic_batches(cfg, batch, device)

    for _ in range(args.warmup):
        loop.train_step(labeled, unlabeled)
    timer = PhaseTimer(sync=device.type == "cuda")
    for _ in range(args.steps):
        loop.train_step(labeled, unlabeled, timer=timer)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        loop.train_step(labeled, unlabeled)
    if device.type == "cuda":
        torch.cuda.synchronize()
    unsynced = (time.perf_counter() - start) / args.steps

    total = sum(timer.seconds.values())
    precision = "bf16" if loop.autocast else "fp32"
    print(
        f"{preset}: {cfg.model.backbone} OS{cfg.model.output_stride}, crop {cfg.data.crop_size}, batch {batch} "
        f"(+{2 * batch} unlabelled rows), {cfg.data.num_classes} classes, selector {cfg.ssl.selector.kind}, "
        f"teacher {cfg.ssl.teacher.kind}, {precision}, {args.steps} steps after {args.warmup} warm-up"
    )
    print(f"machine: {machine(device)}\n")
    print("| phase | ms / iteration | share |")
    print("|---|---:|---:|")
    for name in [*PHASES, *sorted(set(timer.seconds) - set(PHASES))]:
        if name in timer.seconds:
            seconds = timer.seconds[name] / args.steps
            print(f"| {name} | {1e3 * seconds:.1f} | {100 * timer.seconds[name] / total:.1f} % |")
    print(f"| **total (phases timed)** | {1e3 * total / args.steps:.1f} | 100 % |")
    print(f"| total, no phase syncs | {1e3 * unsynced:.1f} | |")
    share = 100 * timer.seconds.get("selector", 0.0) / total
    print(f"\nselector share: {share:.2f} % (goal <= 3 %)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        milliseconds = {name: 1e3 * seconds / args.steps for name, seconds in timer.seconds.items()}
        results = {
            "preset": preset,
            "machine": machine(device),
            "precision": precision,
            "batch": batch,
            "ms_per_iteration": milliseconds,
            "ms_per_iteration_unsynced": 1e3 * unsynced,
            "selector_share_percent": share,
        }
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
