"""Benchmark: does CSL beat the threshold baseline on the built-in dataset at a fixed iteration budget?

Four methods, each over several seeds, trained with the plain single-process loop (`csl_ray.loop.run_local`, the
same TrainLoop the Ray workers run) on the `tiny` preset:
    supervised    the labelled split only (ssl.enabled=false)
    threshold     FixMatch/UniMatch selection, w = 1[max prob >= 0.95]; TMP stays on (its "reliable" pixels are
                  then the confident ones), so that only the selector differs from `csl`
    csl           the CSL selector with TMP
    csl_no_tmp    the CSL selector without the masked branch
Prints a markdown table of mean ± std over seeds of the best and final validation mIoU, the selected ratio over the
first and last quarter of training, and the pseudo-label accuracy of selected vs rejected pixels over the last
quarter (the built-in unlabelled images keep their masks for this); writes the runs as JSON and PNG curves of mIoU,
selected ratio and pseudo-label accuracy next to --out. `--from-json` re-tabulates a saved JSON without training.

    python benchmarks/quality.py                                  # 4 methods x 3 seeds, tiny preset
    python benchmarks/quality.py --seeds 0 1 --iterations 200 --out benchmarks/results/quality
    python benchmarks/quality.py --methods csl threshold --set ssl.tmp.mask_ratio=0.5
    python benchmarks/quality.py --jobs 2 --threads 1          # two runs at a time, one torch thread each
    python benchmarks/quality.py --from-json benchmarks/results/quality.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from csl_ray.config import load_config
from csl_ray.data.pipeline import dataset_root, iter_local
from csl_ray.loop import run_local

METHODS = {
    "supervised": ["ssl.enabled=false"],
    "threshold": ["ssl.selector.kind=threshold"],
    "csl": ["ssl.selector.kind=csl"],
    "csl_no_tmp": ["ssl.selector.kind=csl", "ssl.tmp.enabled=false"],
}
CURVES = ("selected_ratio", "pseudo_acc_selected", "pseudo_acc_rejected", "mean_weight")


def run_one(method: str, seed: int, iterations: int | None, extra: list[str], threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    overrides = [*METHODS[method], f"train.seed={seed}", "ray.num_workers=1", *extra]
    if iterations is not None:
        overrides += [f"train.iterations={iterations}"]
    cfg = load_config("tiny", overrides=overrides)
    root = dataset_root(cfg)
    steps: list[dict] = []
    start = time.perf_counter()
    result = run_local(
        cfg,
        iter_local(cfg, "labeled", root),
        iter_local(cfg, "unlabeled", root) if cfg.ssl.enabled else None,
        iter_local(cfg, "val", root),
        device="cpu",
        log=lambda metrics: steps.append(dict(metrics)) if "miou" not in metrics else None,
    )
    return {
        "method": method,
        "seed": seed,
        "best_miou": result["best_miou"],
        "final_miou": result["val"].get("miou", math.nan),
        "seconds": time.perf_counter() - start,
        "curves": {key: [(s["step"], s.get(key, math.nan)) for s in steps] for key in CURVES},
        "val_history": [(v["step"], v["miou"]) for v in result["val_history"]],
    }


def phase_mean(run: dict, key: str, phase: str) -> float:
    """Mean of a logged curve over the first (`early`) or last (`late`) quarter of training; NaN if never logged."""
    points = [(step, v) for step, v in run["curves"][key] if not math.isnan(v)]
    if not points:
        return math.nan
    last = max(step for step, _ in run["curves"][key])
    keep = (lambda step: step <= last / 4) if phase == "early" else (lambda step: step > last * 3 / 4)
    values = [v for step, v in points if keep(step)]
    return statistics.fmean(values) if values else math.nan


def mean_std(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {std:.1f}"


def table(runs: list[dict], methods: list[str]) -> str:
    """Mean ± std over seeds; the selector columns are training-time means over the first / last quarter."""
    lines = [
        "| method | seeds | best mIoU | final mIoU | selected ratio, first ¼ | selected ratio, last ¼ "
        "| pseudo-acc selected, last ¼ | pseudo-acc rejected, last ¼ |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method in methods:
        rows = [r for r in runs if r["method"] == method]

        def pct(key: str, phase: str, rows: list[dict] = rows) -> str:
            text = mean_std([100 * phase_mean(r, key, phase) for r in rows])
            return text if text == "n/a" else f"{text} %"

        lines.append(
            f"| {method} | {len(rows)} | {mean_std([r['best_miou'] for r in rows])} "
            f"| {mean_std([r['final_miou'] for r in rows])} | {pct('selected_ratio', 'early')} "
            f"| {pct('selected_ratio', 'late')} | {pct('pseudo_acc_selected', 'late')} "
            f"| {pct('pseudo_acc_rejected', 'late')} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], methods: list[str], path: Path) -> None:
    """Val mIoU, selected ratio and pseudo-label accuracy of selected / rejected pixels against iteration; one
    colour per method, one line per seed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(18, 4), dpi=90)
    axes = fig.subplots(1, 4)
    for colour, method in enumerate(methods):
        for n, run in enumerate(r for r in runs if r["method"] == method):
            style = {"color": f"C{colour}", "alpha": 0.8, "label": method if n == 0 else None}
            if run["val_history"]:
                axes[0].plot(*zip(*run["val_history"], strict=True), marker="o", **style)
            for ax, key in zip(axes[1:], ("selected_ratio", "pseudo_acc_selected", "pseudo_acc_rejected"), strict=True):
                points = [(step, v) for step, v in run["curves"][key] if not math.isnan(v)]
                if points:
                    ax.plot(*zip(*points, strict=True), **style)
    titles = ("val mIoU", "selected ratio", "pseudo-label accuracy, selected", "pseudo-label accuracy, rejected")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="methods to run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (data is fixed)")
    parser.add_argument("--iterations", type=int, default=None, help="iteration budget (default: the tiny preset's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads per run (default: torch's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time, one process each")
    parser.add_argument("--out", default="benchmarks/results/quality", help="output prefix for .json and .png")
    parser.add_argument(
        "--from-json", metavar="FILE", help="re-print the table and redraw the PNG from a saved run JSON (no training)"
    )
    args = parser.parse_args()
    if args.from_json:
        runs = json.loads(Path(args.from_json).read_text())
        methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
        print(table(runs, methods))
        plot(runs, methods, Path(args.out).with_suffix(".png"))
        return
    threads = args.threads or torch.get_num_threads()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}; {args.jobs} run(s) at a time, {threads} thread(s) each"
    )
    grid = [(method, seed) for seed in args.seeds for method in args.methods]
    runs = []
    # Each run is a separate process (spawned, so every run starts from the same fresh interpreter state).
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = [pool.submit(run_one, m, s, args.iterations, args.set, args.threads) for m, s in grid]
        for future in concurrent.futures.as_completed(futures):
            run = future.result()
            print(
                f"{run['method']} seed {run['seed']}: best mIoU {run['best_miou']:.1f}, final {run['final_miou']:.1f},"
                f" selected (last ¼) {phase_mean(run, 'selected_ratio', 'late'):.3f}, {run['seconds']:.0f} s",
                flush=True,
            )
            runs.append(run)
    runs.sort(key=lambda r: (args.methods.index(r["method"]), r["seed"]))
    print(table(runs, args.methods))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(runs, indent=1))
    plot(runs, args.methods, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
