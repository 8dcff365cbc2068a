"""Quality study: which method wins on the built-in dataset, at which iteration budget, and why.

Every run trains the `tiny` preset with the plain single-process loop (`csl_ray.loop.run_local`, the same TrainLoop
the Ray workers run) and records its validation curve, final per-class IoU, wall time, and the selector statistics
logged during training. Methods:
    supervised     the labelled split only (ssl.enabled=false)
    oracle         supervised on the labelled split plus the masks of the whole unlabelled pool: the room that
                   unlabelled data could fill
    threshold      FixMatch/UniMatch selection, w = 1[max prob >= 0.95]; TMP stays on (its "reliable" pixels are
                   then the confident ones), so that only the selector differs from `csl`
    csl            the released CSL recipe (no warm-up, whatever the preset says)
and VARIANTS (CSL with another residual rule, alpha, TMP off, an EMA teacher; the recipe options of docs/method.md
for CSL and the threshold alike), run at one budget.

Tables (one per budget): mean ± std over seeds of the best and final mIoU, the trusted share of valid unlabelled
pixels over the first and last quarter of training, the pseudo-label accuracy of trusted and of other pixels and
the mean weight of the other pixels over the last quarter (the built-in unlabelled images keep their masks for
this), and the wall time per run. The plot shows mIoU against budget, a line per method.

The JSON holds every finished run and is rewritten after each one, so an interrupted study resumes where it
stopped (runs already in it are skipped); `--from-json` re-tabulates and redraws without training.

    python benchmarks/quality.py --jobs 2 --threads 1              # the study: 4 methods x 2 budgets x 3 seeds
    python benchmarks/quality.py --jobs 2 --threads 1 --budgets 3000   # a longer budget, where there is time
    python benchmarks/quality.py --budgets 300 --methods csl --variants all   # the variants at 300 iterations
    python benchmarks/quality.py --methods csl threshold --budgets 300 --seeds 0 --set ssl.tmp.mask_ratio=0.5
    python benchmarks/quality.py --from-json benchmarks/results/study.json
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
from csl_ray.data.reader import iter_local
from csl_ray.data.streams import dataset_root
from csl_ray.loop import run_local

RELEASED_CSL = ["ssl.selector.kind=csl", "ssl.warmup_iterations=0"]
RELEASED_THRESHOLD = ["ssl.selector.kind=threshold", "ssl.warmup_iterations=0"]
"""The released recipes: no warm-up, whatever the `tiny` preset adopts; every variant changes one thing of these."""
METHODS = {
    "supervised": ["ssl.enabled=false"],
    "oracle": ["ssl.enabled=false", "data.oracle_labels=true"],
    "threshold": RELEASED_THRESHOLD,
    "csl": RELEASED_CSL,
}
VARIANTS = {
    "csl_covar": [*RELEASED_CSL, "ssl.selector.residual_rule=covar"],
    "csl_alpha2": [*RELEASED_CSL, "ssl.selector.alpha=2"],
    "csl_no_tmp": [*RELEASED_CSL, "ssl.tmp.enabled=false"],
    "csl_ema": [*RELEASED_CSL, "ssl.teacher.kind=ema"],
    # Recipe options beyond the released code (docs/method.md), for CSL and the threshold alike; the floor only
    # changes soft weights, which the threshold has none of.
    "csl_warmup": [*RELEASED_CSL, "ssl.warmup_iterations=100"],
    "threshold_warmup": [*RELEASED_THRESHOLD, "ssl.warmup_iterations=100"],
    "csl_rampup": [*RELEASED_CSL, "ssl.rampup_iterations=300"],
    "threshold_rampup": [*RELEASED_THRESHOLD, "ssl.rampup_iterations=300"],
    "csl_floor": [*RELEASED_CSL, "ssl.selector.weight_floor=0.5"],
}
CURVES = ("selected_ratio", "pseudo_acc_selected", "pseudo_acc_rejected", "mean_weight")


def run_key(run: dict) -> tuple:
    return run["method"], run["iterations"], run["seed"], tuple(run["extra"])


def run_one(method: str, seed: int, iterations: int, extra: list[str], threads: int | None, device: str) -> dict:
    if threads:
        torch.set_num_threads(threads)
    overrides = [*{**METHODS, **VARIANTS}[method], f"train.seed={seed}", "ray.num_workers=1"]
    # About ten validations per run whatever the budget, at least every 100 iterations.
    overrides += [f"train.iterations={iterations}", f"train.eval_every={max(100, iterations // 10)}", *extra]
    cfg = load_config("tiny", overrides=overrides)
    root = dataset_root(cfg)
    steps: list[dict] = []
    start = time.perf_counter()
    result = run_local(
        cfg,
        iter_local(cfg, "labeled", root),
        iter_local(cfg, "unlabeled", root) if cfg.ssl.enabled else None,
        iter_local(cfg, "val", root),
        device=device,
        log=lambda metrics: steps.append(dict(metrics)) if "miou" not in metrics else None,
    )
    return {
        "method": method,
        "iterations": iterations,
        "seed": seed,
        "extra": extra,
        "best_miou": result["best_miou"],
        "final_miou": result["val"].get("miou", math.nan),
        "iou_per_class": result["val"].get("iou_per_class"),
        "seconds": time.perf_counter() - start,
        "curves": {key: [(s["step"], s.get(key, math.nan)) for s in steps] for key in CURVES},
        "val_history": [(v["step"], v["miou"]) for v in result["val_history"]],
    }


def phase_mean(run: dict, key: str, phase: str) -> float:
    """Mean of a logged curve over the first (`early`) or last (`late`) quarter of training; NaN if never logged."""
    points = [(step, v) for step, v in run["curves"][key] if not math.isnan(v)]
    if not points:
        return math.nan
    last = run["iterations"]
    keep = (lambda step: step <= last / 4) if phase == "early" else (lambda step: step > last * 3 / 4)
    values = [v for step, v in points if keep(step)]
    return statistics.fmean(values) if values else math.nan


def other_weight(run: dict) -> float:
    """Mean weight of the valid pixels that are not trusted, over the last quarter.

    The step logs the mean weight over all valid pixels and the trusted share s; trusted pixels weigh 1, so the
    others' mean is (mean_weight - s) / (1 - s).
    """
    share, mean_weight = phase_mean(run, "selected_ratio", "late"), phase_mean(run, "mean_weight", "late")
    return (mean_weight - share) / (1 - share) if share < 1 else math.nan


def mean_std(values: list[float], scale: float = 1.0, unit: str = "") -> str:
    values = [scale * v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {std:.1f}{unit}"


def table(runs: list[dict], iterations: int) -> str:
    """One markdown table of the runs at one budget, a row per method (and extra overrides)."""
    lines = [
        f"**{iterations} iterations**",
        "",
        "| method | seeds | best mIoU | final mIoU | trusted, first ¼ | trusted, last ¼ | right among trusted "
        "| right among others | mean weight of others | minutes per run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows: dict[tuple, list[dict]] = {}
    for run in runs:
        if run["iterations"] == iterations:
            rows.setdefault((run["method"], tuple(run["extra"])), []).append(run)
    order = list(METHODS) + list(VARIANTS)
    for (method, extra), group in sorted(rows.items(), key=lambda item: (order.index(item[0][0]), item[0][1])):
        name = method + (f" ({', '.join(extra)})" if extra else "")

        def pct(key: str, phase: str, group: list[dict] = group) -> str:
            return mean_std([phase_mean(r, key, phase) for r in group], 100, " %")

        lines.append(
            f"| {name} | {len(group)} | {mean_std([r['best_miou'] for r in group])} "
            f"| {mean_std([r['final_miou'] for r in group])} | {pct('selected_ratio', 'early')} "
            f"| {pct('selected_ratio', 'late')} | {pct('pseudo_acc_selected', 'late')} "
            f"| {pct('pseudo_acc_rejected', 'late')} | {mean_std([other_weight(r) for r in group], 1, '')} "
            f"| {mean_std([r['seconds'] for r in group], 1 / 60)} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    """Best mIoU against budget (mean over seeds, seeds as dots) and the validation curves of the largest budget."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.5), dpi=90)
    budget_ax, curve_ax = fig.subplots(1, 2)
    methods = [m for m in METHODS if any(r["method"] == m and not r["extra"] for r in runs)]
    largest = max(r["iterations"] for r in runs)
    for colour, method in enumerate(methods):
        mine = [r for r in runs if r["method"] == method and not r["extra"]]
        budgets = sorted({r["iterations"] for r in mine})
        means = [statistics.fmean(r["best_miou"] for r in mine if r["iterations"] == b) for b in budgets]
        budget_ax.plot(budgets, means, marker="o", color=f"C{colour}", label=method)
        budget_ax.scatter([r["iterations"] for r in mine], [r["best_miou"] for r in mine], color=f"C{colour}", s=8)
        for n, run in enumerate(r for r in mine if r["iterations"] == largest):
            curve_ax.plot(*zip(*run["val_history"], strict=True), color=f"C{colour}", alpha=0.7,
                          label=method if n == 0 else None)  # fmt: skip
    budget_ax.set_xscale("log")
    budget_ax.set(title="best val mIoU against iteration budget", xlabel="iterations", ylabel="mIoU")
    curve_ax.set(title=f"val mIoU during the {largest}-iteration runs", xlabel="iteration", ylabel="mIoU")
    for ax in (budget_ax, curve_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def report(runs: list[dict], out: Path) -> str:
    text = "\n\n".join(table(runs, b) for b in sorted({r["iterations"] for r in runs}))
    out.with_suffix(".md").write_text(text + "\n")
    plot(runs, out.with_suffix(".png"))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--methods",
        nargs="*",
        choices=list(METHODS),
        default=list(METHODS),
        help="methods to run (none: variants only)",
    )
    parser.add_argument(
        "--variants", nargs="+", choices=[*VARIANTS, "all"], default=[], help="CSL variants / recipe options to run"
    )
    parser.add_argument(
        "--budgets",
        nargs="+",
        type=int,
        default=[300, 1000],
        help="iteration budgets (the default grid is sized for a 2-core machine; add 3000 where there is time)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (data is fixed)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads per run (default: torch's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time, one process each")
    parser.add_argument("--device", default="cpu", help="torch device of every run (cpu, cuda)")
    parser.add_argument("--out", default="benchmarks/results/study", help="output prefix for .json, .md and .png")
    parser.add_argument("--from-json", action="store_true", help="re-tabulate and redraw from --out's JSON only")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    runs = json.loads(path.read_text()) if path.is_file() else []
    if args.from_json:
        print(report(runs, out))
        return
    variants = list(VARIANTS) if "all" in args.variants else args.variants
    grid = [(m, b, s) for b in args.budgets for s in args.seeds for m in [*args.methods, *variants]]
    done = {run_key(r) for r in runs}
    todo = [(m, b, s) for m, b, s in grid if (m, b, s, tuple(args.set)) not in done]
    threads = args.threads or torch.get_num_threads()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"{len(todo)} runs to do ({len(grid) - len(todo)} already in {path}), {args.jobs} at a time, "
        f"{threads} thread(s) each",
        flush=True,
    )
    # Each run is a separate process (spawned, so every run starts from the same fresh interpreter state).
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = [pool.submit(run_one, m, s, b, args.set, args.threads, args.device) for m, b, s in todo]
        for future in concurrent.futures.as_completed(futures):
            run = future.result()
            runs.append(run)
            temp = path.with_suffix(".json.tmp")
            temp.write_text(json.dumps(runs, indent=1))
            os.replace(temp, path)
            print(
                f"[{len(runs)}] {run['method']} {run['iterations']} it seed {run['seed']}: best mIoU "
                f"{run['best_miou']:.1f}, final {run['final_miou']:.1f}, trusted (last ¼) "
                f"{phase_mean(run, 'selected_ratio', 'late'):.3f}, {run['seconds'] / 60:.1f} min",
                flush=True,
            )
    print(report(runs, out))
    print(f"wrote {path}, {out.with_suffix('.md')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
