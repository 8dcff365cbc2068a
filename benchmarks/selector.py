"""Benchmark: the batched CSL selector against the released algorithm and the threshold baseline.

On the same inputs, in the same process, times (median of --repeats calls, methods interleaved so that load drifts
hit them alike, after one warm-up call each):
    csl        csl_ray.selection.csl_select (batched, closed-form 2x2 eigen-solve, tiled single class pass)
    released   (a) the released CSL selector's algorithm as the authors ship it: features with NaN masking and
               one-hot residuals over [N, C, H, W] temporaries, then a Python loop with one torch.linalg.svd of the
               P x 2 feature matrix per image, per-image cluster statistics, and the weights
    threshold  (b) csl_ray.selection.threshold_select (max over classes, first arg-max, compare)
    max+cmp    context only: the one-liner `conf, label = probs.max(1); conf >= 0.95` (no finiteness check)
and the peak extra memory of one call, outputs included: on CPU the growth of the process's peak resident set (VmHWM,
reset through /proc/self/clear_refs) over the resident set before the call, with glibc's mmap threshold pinned to
128 KiB and the heap trimmed before each call, so that large blocks are neither recycled unseen nor kept resident
after use; on CUDA torch.cuda.max_memory_allocated over the allocation before the call.

    python benchmarks/selector.py                               # CPU, both sizes
    python benchmarks/selector.py --sizes 16x21x321 --repeats 9 --json bench.json
    python benchmarks/selector.py --device cuda
    python benchmarks/selector.py --threads 1    # e.g. on a loaded machine, where OpenMP barriers stall every op
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from csl_ray.config import SelectorConfig
from csl_ray.selection import EPS, Selection, build_selector

DEFAULT_SIZES = "16x21x321,8x19x801"


@torch.no_grad()
def released_select(probs: torch.Tensor, valid: torch.Tensor, *, alpha: float = 8.0) -> torch.Tensor:
    """The released CSL selector's algorithm (defaults: released residual variance, csl rule); returns the weights.

    Follows the structure of the authors' code. One deviation, so that the outputs can be compared: an empty cluster
    is never chosen as the reliable one (docs/method.md, Selection); the released code gives it mean 0 and would
    pick it.

    Args:
        probs: float [N, C, H, W] softmax.
        valid: bool [N, H, W].
        alpha: soft-weight width.

    Returns:
        weights [N, H, W].
    """
    n, c = probs.shape[:2]
    nan = torch.tensor(float("nan"), device=probs.device)
    predictions = torch.where(valid.unsqueeze(1).expand_as(probs), probs, nan)
    max_conf, max_idx = torch.max(predictions, dim=1)
    one_hot = F.one_hot(max_idx, num_classes=c).permute(0, 3, 1, 2)
    remaining = predictions * (1 - one_hot)
    mean_remaining = remaining.sum(dim=1) / (c - 1)
    residual_var = ((remaining - mean_remaining.unsqueeze(1)) ** 2).sum(dim=1) / (c - 1)
    g = (c - 1) ** 2 / (2 * (1 - max_conf + EPS))
    a, b = torch.log(max_conf), -(g * residual_var)

    means, variances = [], []
    for i in range(n):
        features = torch.stack([a[i], b[i]], dim=-1).view(-1, 2)
        features = features[~torch.isnan(features).any(dim=-1)]
        if features.shape[0] == 0:
            means.append(torch.tensor([1.0, 0.0], device=probs.device))
            variances.append(torch.tensor([1.0, 1.0], device=probs.device))
            continue
        u, _, _ = torch.linalg.svd(features, full_matrices=False)
        assignment = torch.argmax(torch.abs(u), dim=1)
        centers, spreads, sizes = [], [], []
        for k in range(2):
            members = features[assignment == k]
            sizes.append(members.shape[0])
            centers.append(members.mean(dim=0) if sizes[-1] else torch.zeros(2, device=probs.device))
            spreads.append(members.var(dim=0, unbiased=True) if sizes[-1] > 1 else torch.zeros(2, device=probs.device))
        scores = torch.stack([centers[k][0] if sizes[k] else centers[k].new_tensor(-float("inf")) for k in range(2)])
        best = int(torch.argmax(scores))
        means.append(centers[best])
        variances.append(spreads[best])
    mean, var = torch.stack(means), torch.stack(variances)

    z_a = (a - mean[:, 0, None, None]) / torch.sqrt(var[:, 0, None, None] + EPS)
    z_b = (mean[:, 1, None, None] - b) / torch.sqrt(var[:, 1, None, None] + EPS)
    soft = torch.exp(-(z_a**2) / alpha) * torch.exp(-(z_b**2) / alpha)
    weights = torch.where((z_a > 0) | (z_b > 0), torch.ones_like(soft), soft)
    return torch.where(valid & torch.isfinite(weights), weights, torch.zeros_like(weights))


def naive_threshold(probs: torch.Tensor, valid: torch.Tensor, threshold: float = 0.95) -> torch.Tensor:
    """UniMatch's one-liner, for context: conf, label = probs.max(1); weight = conf >= threshold."""
    conf, _ = probs.max(dim=1)
    return ((conf >= threshold) & valid).float()


def make_inputs(n: int, c: int, size: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax maps with a spread of confidences and ~10 % padding (bottom and right strips), as crops have."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, size, size, generator=gen)
    temperature = torch.empty(n, 1, size, size).uniform_(0.5, 6.0, generator=gen)
    probs = (logits * temperature).softmax(dim=1)
    valid = torch.ones(n, size, size, dtype=torch.bool)
    pad = size // 20
    valid[:, -pad:, :] = False
    valid[:, :, -pad:] = False
    return probs.to(device), valid.to(device)


def machine_description(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = (
        f"CPU: {cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} with {torch.get_num_threads()} "
        f"intra-op threads; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    if device.startswith("cuda"):
        text += f"; GPU: {torch.cuda.get_device_name(torch.device(device))}"
    return text


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_methods(methods: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds per call for each method; one warm-up call each, then `repeats` rounds over all methods."""
    for fn in methods.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mib(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory one call adds on top of what was allocated before it (see the module docstring)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        _libc().malloc_trim(0)  # free heap memory goes back to the OS, so the call cannot reuse it unseen
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        fn()
        return (_status_kib("VmHWM") - before) / 1024
    except (OSError, RuntimeError):
        return None


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6")


def pin_mmap_threshold() -> bool:
    """Makes glibc map every allocation above 128 KiB afresh and unmap it on free, so that the resident set tracks
    use (by default the threshold grows with the largest freed block and large blocks get recycled)."""
    try:
        return bool(_libc().mallopt(-3, 128 * 1024))  # M_MMAP_THRESHOLD
    except OSError:
        return False


def agreement(ours: Selection, released: torch.Tensor) -> dict[str, float]:
    diff = (ours.weights - released).abs()
    return {"max_abs_weight_diff": float(diff.max()), "frac_weight_diff_gt_1e-3": float((diff > 1e-3).float().mean())}


CSL = build_selector(SelectorConfig(kind="csl"))
"""The selector as configured by default (the released recipe)."""
THRESHOLD = build_selector(SelectorConfig(kind="threshold"))


def contenders(probs: torch.Tensor, valid: torch.Tensor) -> dict[str, Callable[[], object]]:
    return {
        "csl": lambda: CSL(probs, valid),
        "released": lambda: released_select(probs, valid),
        "threshold": lambda: THRESHOLD(probs, valid),
        "max+cmp": lambda: naive_threshold(probs, valid),
    }


def run(sizes: list[tuple[int, int, int]], device: str, repeats: int) -> dict:
    results = {"machine": machine_description(device), "device": device, "repeats": repeats, "sizes": []}
    for n, c, size in sizes:
        probs, valid = make_inputs(n, c, size, device)
        methods = contenders(probs, valid)
        times = time_methods(methods, repeats, device)
        entry = {
            "shape": [n, c, size, size],
            "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "min_ms": {k: 1e3 * min(v) for k, v in times.items()},
            "agreement_vs_released": agreement(CSL(probs, valid), released_select(probs, valid)),
        }
        results["sizes"].append(entry)
        print(f"done {n}x{c}x{size}x{size}", file=sys.stderr, flush=True)
    # Memory runs last: pinning the mmap threshold changes allocation behaviour (and speed) for the rest of the run.
    results["memory_method"] = (
        "torch.cuda.max_memory_allocated - memory_allocated before the call"
        if device.startswith("cuda")
        else "peak RSS (VmHWM after a clear_refs reset) - RSS before the call, outputs included; glibc mmap threshold "
        "pinned to 128 KiB, heap trimmed before the call"
    )
    if not device.startswith("cuda") and not pin_mmap_threshold():
        results["memory_method"] += " (pinning failed: recycled heap memory is not counted)"
    for (n, c, size), entry in zip(sizes, results["sizes"], strict=True):
        probs, valid = make_inputs(n, c, size, device)
        methods = contenders(probs, valid)
        entry["peak_extra_mib"] = {k: peak_extra_mib(fn, device) for k, fn in methods.items()}
    return results


def markdown(results: dict) -> str:
    lines = [
        f"Machine: {results['machine']}; device {results['device']}; median of {results['repeats']} calls.",
        f"Peak extra memory: {results['memory_method']}.",
        "",
        "| N x C x H x W | method | median ms | min ms | peak extra MiB |",
        "|---|---|---:|---:|---:|",
    ]
    for entry in results["sizes"]:
        shape = "x".join(map(str, entry["shape"]))
        for name, med in entry["median_ms"].items():
            mem = entry["peak_extra_mib"][name]
            mem_text = "n/a" if mem is None else f"{mem:.0f}"
            lines.append(f"| {shape} | {name} | {med:.1f} | {entry['min_ms'][name]:.1f} | {mem_text} |")
    lines += ["", "| N x C x H x W | released / csl (speed-up) | csl / threshold (cost) | weights vs released |"]
    lines.append("|---|---:|---:|---|")
    for entry in results["sizes"]:
        med = entry["median_ms"]
        agree = entry["agreement_vs_released"]
        lines.append(
            f"| {'x'.join(map(str, entry['shape']))} | {med['released'] / med['csl']:.1f}x | "
            f"{med['csl'] / med['threshold']:.2f}x | max |dw| {agree['max_abs_weight_diff']:.1e}, "
            f"{100 * agree['frac_weight_diff_gt_1e-3']:.3f} % of pixels > 1e-3 |"
        )
    return "\n".join(lines)


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    """`16x21x321,8x19x801` -> [(N, C, side), ...]."""
    sizes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"size {item!r}: expected NxCxS, e.g. 16x21x321")
        sizes.append(tuple(int(p) for p in parts))
    return sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method and size (default 5)")
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=parse_sizes(DEFAULT_SIZES),
        help=f"comma-separated NxCxS batches of SxS maps (default {DEFAULT_SIZES})",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this path")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available")
    results = run(args.sizes, args.device, args.repeats)
    print(markdown(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
