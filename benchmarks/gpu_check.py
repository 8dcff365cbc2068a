"""The GPU path in one command: the selector on CUDA, the `pascal` step in bf16 and fp32, the worker's loop end to end.

    PYTHONPATH=. python benchmarks/gpu_check.py --json gpu.json            # one GPU; sized for under 8 minutes
    PYTHONPATH=. python benchmarks/gpu_check.py --device cpu --quick       # the same code on CPU at small sizes
    PYTHONPATH=. python benchmarks/gpu_check.py --only step --compile      # one section, plus a compiled student

Runs from the source tree with neither Ray nor W&B installed (nothing on this path imports them) on torch >= 2.11.
Three sections, each timed and checked; any error is printed, recorded in the JSON and makes the exit status 1
(the other sections still run, so one short GPU window shows every failure):

1. selector: `csl_select` vs the released algorithm as the authors ship it (`released_select` of
   benchmarks/selector.py: NaN-masked features, one-hot residuals, one `torch.linalg.svd` per image) vs the threshold
   baseline, at 16x21x321^2 and 8x19x801^2: medians of synchronised calls (methods interleaved), peak extra memory,
   the share of pixels whose weight differs from the released algorithm's by more than 1e-3, and on CUDA the
   largest weight difference between `csl_select` on CUDA and on CPU.
2. step: the `pascal` preset (ResNet-101, output stride 8, crop 321, 8 labelled + 16 unlabelled rows, self teacher,
   random init) on synthetic batches: seconds per iteration (median of per-step times after warm-up), peak memory,
   the selector's share of the step (a second, phase-synchronised run), in bf16 autocast and in fp32; with
   `--compile`, also a `torch.compile`d student in bf16.
3. end_to_end: the loop the Ray workers run (`csl_ray.loop.TrainLoop`) under a 1-rank process group (nccl on CUDA,
   gloo on CPU), the student wrapped in DDP (with SyncBatchNorm on CUDA), on the built-in dataset drawn at 321 px and
   read in-process (`csl_ray.data.reader.iter_local`): 50 iterations, one validation, then a checkpoint round trip
   (saved, loaded into a fresh loop that must hold the same weights, optimiser state and step) and one more step.

`--quick` shrinks every size (ResNet-18 at output stride 16, crop 48, 2 + 4 rows, small selector maps, a few
iterations) so that the default test suite runs this script on CPU. Repetition counts (default / --quick): selector
15 / 3 timed calls per method and size after one warm-up call; step 5 / 1 warm-up, 20 / 2 timed and 10 / 1
phase-timed iterations per precision; end to end 50 / 4 iterations.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from benchmarks.selector import (
    CSL,
    agreement,
    contenders,
    machine_description,
    make_inputs,
    peak_extra_mib,
    released_select,
    time_methods,
)
from benchmarks.step import synthetic_batches
from csl_ray.config import load_config
from csl_ray.data.builtin import ensure_builtin_dataset
from csl_ray.data.reader import iter_local
from csl_ray.data.streams import dataset_root
from csl_ray.loop import TrainLoop
from csl_ray.step import PhaseTimer

SECTIONS = ("selector", "step", "end_to_end")
MAX_SHARE_OFF_RELEASED = 1e-3
"""Fail when more than this share of pixels has a weight more than 1e-3 away from the released algorithm's (CPU
measured 0 %; a few pixels near a cluster boundary may flip under float32 rounding, a wrong selector moves many)."""
MAX_SHARE_OFF_CPU = 1e-4
"""Fail when more than this share of pixels has a CUDA weight more than 1e-5 away from the CPU weight."""


class CheckFailed(RuntimeError):
    """A check ran but its result is wrong."""


@dataclass(frozen=True)
class Settings:
    """Sizes and repetition counts of one run (see the module docstring).

    Attributes:
        selector_sizes: (N, C, side) batches of selector inputs.
        selector_repeats: timed calls per method and size.
        overrides: config overrides on top of the `pascal` preset for the step and the end-to-end run.
        step_warmup, step_timed, step_phase_timed: iterations per step variant: untimed, timed one by one, and timed
            by phase (with a device sync at each phase boundary).
        image_size: side of the built-in dataset's images for the end-to-end run.
        split_rows: (labelled, unlabelled, validation) images drawn.
        iterations: end-to-end training iterations before the validation and the checkpoint.
    """

    selector_sizes: tuple[tuple[int, int, int], ...]
    selector_repeats: int
    overrides: tuple[str, ...]
    step_warmup: int
    step_timed: int
    step_phase_timed: int
    image_size: int
    split_rows: tuple[int, int, int]
    iterations: int


FULL = Settings(
    selector_sizes=((16, 21, 321), (8, 19, 801)),
    selector_repeats=15,
    overrides=(),
    step_warmup=5,
    step_timed=20,
    step_phase_timed=10,
    image_size=321,
    split_rows=(16, 64, 8),
    iterations=50,
)
QUICK = Settings(
    selector_sizes=((4, 21, 65), (2, 19, 97)),
    selector_repeats=3,
    # The backbone is named here, not taken from the `tiny` preset, so that preset can change freely.
    overrides=(
        "model.backbone=resnet18",
        "model.output_stride=16",
        "model.decoder_channels=32",
        "data.crop_size=48",
        "data.global_batch_size=2",
        "ssl.tmp.block=8",
    ),
    step_warmup=1,
    step_timed=2,
    step_phase_timed=1,
    image_size=64,
    split_rows=(4, 8, 2),
    iterations=4,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    """Peak tensor memory since the last reset (CUDA); None on CPU, where the process's peak is not per section."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# --------------------------------------------------------------------------------------------------- selector


def check_selector(settings: Settings, device: torch.device) -> dict[str, Any]:
    """Times csl / released / threshold on the same inputs and compares their weights (section 1)."""
    where = str(device)
    sizes = []
    for number, (n, c, side) in enumerate(settings.selector_sizes):
        probs, valid = make_inputs(n, c, side, where)
        methods = {k: fn for k, fn in contenders(probs, valid).items() if k in ("csl", "released", "threshold")}
        times = time_methods(methods, settings.selector_repeats, where)
        ours = CSL(probs, valid)
        entry: dict[str, Any] = {
            "shape": [n, c, side, side],
            "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "peak_extra_mib": {k: peak_extra_mib(fn, where) for k, fn in methods.items()},
            "vs_released": agreement(ours, released_select(probs, valid)),
        }
        if entry["vs_released"]["frac_weight_diff_gt_1e-3"] > MAX_SHARE_OFF_RELEASED:
            raise CheckFailed(f"selector {entry['shape']}: weights disagree with the released algorithm: {entry}")
        if device.type == "cuda" and number == 0:
            entry["cuda_vs_cpu"] = cuda_vs_cpu(ours, probs, valid)
        sizes.append(entry)
        print(f"  selector {n}x{c}x{side}x{side} done", file=sys.stderr, flush=True)
    return {"repeats": settings.selector_repeats, "sizes": sizes}


def cuda_vs_cpu(on_cuda: Any, probs: torch.Tensor, valid: torch.Tensor) -> dict[str, float]:
    """How far `csl_select` on CUDA is from the same call on CPU; raises CheckFailed beyond the limits."""
    on_cpu = CSL(probs.cpu(), valid.cpu())
    diff = (on_cuda.weights.cpu() - on_cpu.weights).abs()
    result = {
        "max_abs_weight_diff": float(diff.max()),
        "frac_weight_diff_gt_1e-5": float((diff > 1e-5).float().mean()),
        "labels_equal": bool(torch.equal(on_cuda.labels.cpu(), on_cpu.labels)),
    }
    if not result["labels_equal"] or result["frac_weight_diff_gt_1e-5"] > MAX_SHARE_OFF_CPU:
        raise CheckFailed(f"csl_select on CUDA disagrees with CPU: {result}")
    return result


# ------------------------------------------------------------------------------------------------------- step


def _checked(metrics: dict[str, float], where: str) -> dict[str, float]:
    if metrics["skipped"] or not math.isfinite(metrics["loss"]):
        raise CheckFailed(f"{where}: non-finite loss, the update was skipped: {metrics}")
    return metrics


def time_step(settings: Settings, device: torch.device, precision: str, compile_student: bool) -> dict[str, Any]:
    """One step variant of the `pascal` preset on synthetic batches (see Settings for the counts)."""
    _release_memory(device)
    total = settings.step_warmup + settings.step_timed + settings.step_phase_timed
    cfg = load_config(
        preset="pascal", overrides=[*settings.overrides, f"train.precision={precision}", f"train.iterations={total}"]
    )
    batch = cfg.data.global_batch_size
    loop = TrainLoop(cfg, device)
    if compile_student:
        loop.model = torch.compile(loop.student)
    labeled, unlabeled = synthetic_batches(cfg, batch, device)
    classifier = loop.student.classifier.weight
    before = classifier.detach().clone()
    where = f"step {precision}{' compiled' if compile_student else ''}"

    start = time.perf_counter()
    for _ in range(settings.step_warmup):
        _checked(loop.train_step(labeled, unlabeled), where)
    _sync(device)
    warmup_seconds = time.perf_counter() - start
    seconds = []
    for _ in range(settings.step_timed):
        _sync(device)
        start = time.perf_counter()
        _checked(loop.train_step(labeled, unlabeled), where)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    timer = PhaseTimer(sync=device.type == "cuda")
    for _ in range(settings.step_phase_timed):
        _checked(loop.train_step(labeled, unlabeled, timer=timer), where)
    _sync(device)
    if torch.equal(before, classifier.detach()):
        raise CheckFailed(f"{where}: {total} steps left the classifier's weights unchanged")
    phases = sum(timer.seconds.values())
    result = {
        "precision": precision,
        "autocast_bf16": loop.autocast,
        "compiled": compile_student,
        "setting": (
            f"{cfg.model.backbone} OS{cfg.model.output_stride}, crop {cfg.data.crop_size}, {batch} labelled + "
            f"{2 * batch} unlabelled rows, {cfg.data.num_classes} classes, {cfg.ssl.teacher.kind} teacher, "
            f"{cfg.ssl.selector.kind} selector, {'bf16 autocast' if loop.autocast else 'fp32'}"
        ),
        "warmup_seconds": warmup_seconds,
        "seconds_per_iteration": statistics.median(seconds),
        "seconds_per_iteration_mean": statistics.mean(seconds),
        "peak_gib": _peak_gib(device),
        "phase_ms": {name: 1e3 * s / settings.step_phase_timed for name, s in timer.seconds.items()},
        "selector_share_percent": 100 * timer.seconds.get("selector", 0.0) / phases,
    }
    del loop, labeled, unlabeled
    _release_memory(device)
    print(f"  {where} done", file=sys.stderr, flush=True)
    return result


def check_step(settings: Settings, device: torch.device, compile_student: bool) -> dict[str, Any]:
    """The step in bf16 autocast and fp32, and optionally compiled (section 2)."""
    variants = {"bf16": time_step(settings, device, "bf16", False), "fp32": time_step(settings, device, "fp32", False)}
    if compile_student:
        variants["bf16_compiled"] = time_step(settings, device, "bf16", True)
    return variants


# ------------------------------------------------------------------------------------------------ end to end


def _same_tensors(a: Any, b: Any) -> bool:
    """Whether two nested state dicts hold equal tensors and values (devices aside)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_same_tensors, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())
    return a == b


def check_end_to_end(settings: Settings, device: torch.device, workdir: Path) -> dict[str, Any]:
    """TrainLoop under DDP on the built-in dataset, one validation, a checkpoint round trip (section 3)."""
    _release_memory(device)
    start = time.perf_counter()
    labeled_rows, unlabeled_rows, val_rows = settings.split_rows
    data = ensure_builtin_dataset(
        workdir / "data", num_labeled=labeled_rows, num_unlabeled=unlabeled_rows, num_val=val_rows,
        size=settings.image_size,
    )  # fmt: skip
    draw_seconds = time.perf_counter() - start
    iterations = settings.iterations
    cfg = load_config(
        preset="pascal",
        overrides=[
            *settings.overrides,
            "data.num_classes=6",  # the built-in dataset's classes
            f"data.root={data}",
            f"train.iterations={iterations + 1}",  # + the step after the round trip
        ],
    )
    dataset_root(cfg)  # checks the classes against the manifest
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.FileStore(str(workdir / "store"), 1), rank=0, world_size=1)
    try:
        loop = TrainLoop(cfg, device, rank=0, world_size=1)
        batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in loop.student.modules())
        loop.wrap_ddp()
        sync_batchnorms = sum(isinstance(m, nn.SyncBatchNorm) for m in loop.student.modules())
        if device.type == "cuda" and sync_batchnorms != batchnorms:
            raise CheckFailed(f"{sync_batchnorms} SyncBatchNorm layers after wrap_ddp, expected {batchnorms}")
        labeled, unlabeled = iter(iter_local(cfg, "labeled")), iter(iter_local(cfg, "unlabeled"))
        data_seconds, step_seconds, losses, selected = [], [], [], []
        while loop.step < iterations:
            start = time.perf_counter()
            batches = next(labeled), next(unlabeled)
            data_seconds.append(time.perf_counter() - start)
            start = time.perf_counter()
            metrics = _checked(loop.train_step(*batches), f"end to end, iteration {loop.step + 1}")
            _sync(device)
            step_seconds.append(time.perf_counter() - start)
            losses.append(metrics["loss"])
            selected.append(metrics["selected_ratio"])
        start = time.perf_counter()
        val = loop.validate(iter_local(cfg, "val"))
        val_seconds = time.perf_counter() - start
        if not math.isfinite(val["miou"]):
            raise CheckFailed(f"validation mIoU is not finite: {val}")

        path = workdir / "checkpoint.pt"
        torch.save(loop.state_dict(), path)
        fresh = TrainLoop(cfg, device, rank=0, world_size=1)
        fresh.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        fresh.wrap_ddp()
        restored = {
            "step": fresh.step == loop.step == iterations,
            "student": _same_tensors(fresh.student.state_dict(), loop.student.state_dict()),
            "teacher": _same_tensors(fresh.teacher.state_dict(), loop.teacher.state_dict()),
            "optimizer": _same_tensors(fresh.optimizer.state_dict(), loop.optimizer.state_dict()),
            "best_miou": fresh.best_miou == loop.best_miou,
        }
        if not all(restored.values()):
            raise CheckFailed(f"checkpoint round trip lost state: {restored}")
        resumed = _checked(fresh.train_step(next(labeled), next(unlabeled)), "end to end, the step after loading")
    finally:
        dist.destroy_process_group()
    print("  end to end done", file=sys.stderr, flush=True)
    return {
        "backend": backend,
        "setting": (
            f"{cfg.model.backbone} OS{cfg.model.output_stride}, crop {cfg.data.crop_size}, built-in dataset at "
            f"{settings.image_size} px ({labeled_rows} / {unlabeled_rows} / {val_rows} images), "
            f"{cfg.data.global_batch_size} labelled + {2 * cfg.data.global_batch_size} unlabelled rows, "
            f"{'bf16 autocast' if loop.autocast else 'fp32'}"
        ),
        "iterations": iterations,
        "batchnorm_layers": batchnorms,
        "sync_batchnorm_layers": sync_batchnorms,
        "draw_seconds": draw_seconds,
        "seconds_per_iteration": statistics.median(step_seconds),
        "data_seconds_per_iteration": statistics.median(data_seconds),
        "loss_first_last": [losses[0], losses[-1]],
        "selected_ratio_mean": statistics.mean(selected),
        "validation_seconds": val_seconds,
        "miou": val["miou"],
        "checkpoint_mib": path.stat().st_size / 2**20,
        "checkpoint_restored": restored,
        "loss_after_resume": resumed["loss"],
        "peak_gib": _peak_gib(device),
    }


# ------------------------------------------------------------------------------------------------------ report


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} MiB"


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} GiB"


def table(results: dict[str, Any]) -> str:
    """The one table: a row per measurement (sections that failed show their error)."""
    rows = []
    for entry in results.get("selector", {}).get("sizes", []):
        shape = "x".join(map(str, entry["shape"]))
        med, mem, agree = entry["median_ms"], entry["peak_extra_mib"], entry["vs_released"]
        for name in med:
            rows.append(("selector", f"{shape} {name}", f"{med[name]:.2f} ms, peak extra {_mib(mem[name])}"))
        speed = f"{med['released'] / med['csl']:.1f}x; {med['csl'] / med['threshold']:.2f}x"
        rows.append(("selector", f"{shape} released / csl; csl / threshold", speed))
        off = f"{100 * agree['frac_weight_diff_gt_1e-3']:.4f} % of pixels off by > 1e-3"
        rows.append(("selector", f"{shape} weights vs released", f"{off} (max {agree['max_abs_weight_diff']:.1e})"))
        if "cuda_vs_cpu" in entry:
            c = entry["cuda_vs_cpu"]
            off = f"{100 * c['frac_weight_diff_gt_1e-5']:.4f} % of pixels off by > 1e-5"
            rows.append(("selector", f"{shape} csl on CUDA vs CPU", f"{off} (max {c['max_abs_weight_diff']:.1e})"))
    for name, step in results.get("step", {}).items():
        if name != "error":
            rate = f"{step['seconds_per_iteration']:.3f} s/it, peak {_gib(step['peak_gib'])}"
            rows.append(
                ("step", f"{name}: {step['setting']}", f"{rate}, selector {step['selector_share_percent']:.2f} %")
            )
    e2e = results.get("end_to_end", {})
    if "iterations" in e2e:
        rate = (
            f"{e2e['iterations']} its, {e2e['seconds_per_iteration']:.3f} s/it training + "
            f"{e2e['data_seconds_per_iteration']:.3f} s/it reading in-process, peak {_gib(e2e['peak_gib'])}"
        )
        first, last = e2e["loss_first_last"]
        restored = f"{e2e['checkpoint_mib']:.0f} MiB, state identical; next step's loss {e2e['loss_after_resume']:.3f}"
        rows += [
            ("end to end", f"{e2e['backend']}, DDP: {e2e['setting']}", rate),
            (
                "end to end",
                "SyncBatchNorm / BatchNorm layers",
                f"{e2e['sync_batchnorm_layers']} / {e2e['batchnorm_layers']}",
            ),
            (
                "end to end",
                "loss first / last; mean selected ratio",
                f"{first:.3f} / {last:.3f}; {e2e['selected_ratio_mean']:.3f}",
            ),
            ("end to end", "validation", f"mIoU {e2e['miou']:.1f} % in {e2e['validation_seconds']:.1f} s"),
            ("end to end", "checkpoint round trip", restored),
        ]
    for section in SECTIONS:
        if "error" in results.get(section, {}):
            rows.append((section, "FAILED", results[section]["error"].replace("|", "/").replace("\n", " ")))
    rows.append(("all", "seconds per section", ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items())))
    lines = [f"{results['machine']}; device {results['device']}", "", "| check | what | result |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", "PASSED" if results["ok"] else "FAILED"]
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: Path) -> None:
    """Written whole or not at all (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)


def run(settings: Settings, device: torch.device, sections: list[str], compile_student: bool) -> dict[str, Any]:
    """Runs the sections in order; an error in one is recorded and the next still runs."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # so that calls without a device (memory statistics, nccl) mean this one
    results: dict[str, Any] = {
        "machine": machine_description(str(device)),
        "device": str(device),
        "torch": torch.__version__,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "settings": asdict(settings),
        "seconds": {},
    }
    with tempfile.TemporaryDirectory(prefix="csl-gpu-check-") as tmp:
        for section in sections:
            print(f"{section} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            try:
                if section == "selector":
                    results[section] = check_selector(settings, device)
                elif section == "step":
                    results[section] = check_step(settings, device, compile_student)
                else:
                    results[section] = check_end_to_end(settings, device, Path(tmp))
            except Exception as err:  # recorded, printed, and turned into exit status 1
                traceback.print_exc()
                results[section] = {"error": f"{type(err).__name__}: {err}"}
            results["seconds"][section] = time.perf_counter() - start
    results["ok"] = not any("error" in results[s] for s in sections)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:i or cpu (default cuda)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repetitions (the CPU test mode)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this path")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated sections to run (default {','.join(SECTIONS)})"
    )
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd student in bf16")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        parser.error(f"--only {args.only!r}: choose from {', '.join(SECTIONS)}")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here (use --device cpu --quick)")
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device {args.device!r}: choose cuda, cuda:i or cpu")

    start = time.perf_counter()
    results = run(QUICK if args.quick else FULL, device, sections, args.compile)
    results["seconds"]["total"] = time.perf_counter() - start
    print(table(results))
    if args.json is not None:
        write_json(results, args.json)
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
