"""Ray Tune sweeps over CSL's knobs, one Tuner per label split.

    python jobs/tune.py --name sweep1                          # default space x splits 1/16, 1/8, 1/4
    python jobs/tune.py --smoke                                # 2 trials, 1 worker, a few iterations
    python jobs/tune.py --space ssl.tmp.mask_ratio=0.3,0.5,0.7 --space optim.lr=0.005,0.01 --splits 1/8
    python jobs/tune.py --name sweep1 --resume                 # continue an interrupted sweep

Each trial is a Tune function trainable that acts as a Train driver: it fits the same `TorchTrainer` as
jobs/train.py (csl_ray.train.fit) with the trial's config overrides, and `TuneReportCallback` forwards the
rank-0 validation reports to Tune (the Ray 2.60 pattern: a Trainer passed to a Tuner fails). Every search-space
value is crossed with every other (grid search), times `--num-samples`. ASHA stops trials whose validation mIoU
trails at its rungs. Label splits get separate Tuners, so early stopping never ranks a 1/16 run against a 1/4 run.

Outputs under `<train.output_dir>/<name>/`: results.csv (one row per trial: split, parameters, best and final
mIoU), miou_vs_mask_ratio.png, and each trial's own run directory (`<train.output_dir>/<name>-<split>-<trial>/`).
Each trial is its own W&B run in the W&B group `<name>`. Interrupted? `--resume` restores every split's Tuner from
storage and the unfinished trials continue from their latest Train checkpoint (same Train run name and storage).
"""

from __future__ import annotations

import copy
import csv
import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from csl_ray.config import Config, ConfigError, apply_overrides, config_from_dict, config_to_dict, valid_keys, validate
from csl_ray.data.ray_datasets import data_cpus
from csl_ray.tracking import plot_xy
from csl_ray.train import fit, storage_path, with_iterations

DEFAULT_SPACE: dict[str, list[Any]] = {
    "ssl.tmp.mask_ratio": [0.5, 0.7, 0.9],
    "ssl.selector.ridge": [0.0, 0.01],
    "ssl.selector.alpha": [4.0, 8.0],
}
"""Trial grid: TMP mask ratio x the selector's regularisation (12 trials per split)."""
DEFAULT_FRACTIONS = ("1/16", "1/8", "1/4")
"""Label splits: reproducible subsets of the labelled pool (data.labeled_fraction, seeded by data.split_seed)."""
SMOKE_SPACE: dict[str, list[Any]] = {"ssl.tmp.mask_ratio": [0.5, 0.9]}
SMOKE_FRACTIONS = ("1/2",)
TRIAL_DRIVER_CPUS = 0.1
"""The trial function only drives its TorchTrainer (whose workers ask for their own resources)."""


class EvalReportCallback(TuneReportCallback):
    """Forwards only the validation reports (those with `miou`) to Tune: the scheduler and Tune's strict metric
    check need `miou` in every result, and the periodic training reports have none."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if "miou" in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def parse_space(items: Sequence[str]) -> dict[str, list[Any]]:
    """`key=v1,v2,...` strings -> {key: [values]} (each value parsed as YAML: 0.5 -> float, true -> bool)."""
    space = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--space {item!r}: expected section.key=value1,value2,...")
        key, raw = item.split("=", 1)
        values = [yaml.safe_load(v) for v in raw.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"--space {item!r}: no values")
        space[key.strip()] = values
    return space


def check_space(base: Config, space: Mapping[str, Sequence[Any]]) -> None:
    """Raises ConfigError unless every key is a config key and every value gives a valid config."""
    keys = set(valid_keys())
    unknown = sorted(k for k in space if k not in keys)
    if unknown:
        raise ConfigError(f"unknown search-space key(s) {', '.join(unknown)}; valid keys: {', '.join(valid_keys())}")
    for key, values in space.items():
        for value in values:
            validate(apply_overrides(copy.deepcopy(base), {key: value}))


def split_grid(fractions: Sequence[str] = (), files: Sequence[str] = ()) -> list[tuple[str, dict[str, Any]]]:
    """The label splits as (label, config overrides): fractions like "1/8" or "0.125" of the labelled pool, and
    UniMatch-style split files of labelled ids (`data.labeled_list`)."""
    splits = []
    for text in fractions:
        try:
            fraction = Fraction(text)
        except ValueError as err:
            raise ConfigError(f"label split {text!r}: expected a fraction like 1/8 or 0.125") from err
        if not 0 < fraction <= 1:
            raise ConfigError(f"label split {text!r}: must be in (0, 1]")
        label = f"{fraction.numerator}-{fraction.denominator}"
        splits.append((label, {"data.labeled_fraction": float(fraction), "data.labeled_list": None}))
    for path in files:
        label = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(path).stem)
        splits.append((label, {"data.labeled_list": str(Path(path).expanduser().resolve())}))
    if not splits:
        raise ConfigError("no label split: give at least one fraction or split file")
    return splits


def max_concurrent_trials(cfg: Config, resources: Mapping[str, float]) -> int:
    """How many trials fit side by side: GPUs / GPUs per trial, or on CPU clusters CPUs / (the Train workers' CPUs
    plus the trial's data pipelines and driver); at least 1."""
    workers = max(cfg.ray.num_workers, 1)
    if cfg.ray.use_gpu:
        return max(1, int(resources.get("GPU", 0) // (workers * cfg.ray.gpus_per_worker)))
    per_trial = workers * cfg.ray.cpus_per_worker + data_cpus(cfg) + TRIAL_DRIVER_CPUS
    return max(1, int(resources.get("CPU", 0) // per_trial))


def _trial(params: dict[str, Any], base: dict[str, Any], experiment: str) -> None:
    """One Tune trial: the base config plus the trial's overrides, fitted as a Train run named after the trial."""
    cfg = apply_overrides(config_from_dict(base, source="sweep base config"), params)
    cfg.train.name = f"{experiment}-{tune.get_context().get_trial_id()}"
    fit(validate(cfg), callbacks=[EvalReportCallback()])


def _tuner(cfg: Config, space: Mapping[str, Sequence[Any]], experiment: str, num_samples: int, resume: bool):
    """A new Tuner for one split, or the interrupted one restored from storage with `resume`."""
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=config_to_dict(cfg), experiment=experiment), {"CPU": TRIAL_DRIVER_CPUS}
    )
    path = f"{storage_path(cfg)}/{experiment}"
    if resume and tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable=trainable, restart_errored=True)
    scheduler = ASHAScheduler(
        time_attr="step",
        max_t=cfg.train.iterations,
        grace_period=min(cfg.train.eval_every, cfg.train.iterations),
        reduction_factor=2,
    )
    return tune.Tuner(
        trainable,
        param_space={key: tune.grid_search(list(values)) for key, values in space.items()},
        tune_config=tune.TuneConfig(
            metric="miou",
            mode="max",
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=max_concurrent_trials(cfg, ray.cluster_resources()),
        ),
        run_config=tune.RunConfig(name=experiment, storage_path=storage_path(cfg)),
    )


def sweep(
    cfg: Config,
    space: Mapping[str, Sequence[Any]],
    splits: Sequence[tuple[str, Mapping[str, Any]]],
    *,
    name: str | None = None,
    num_samples: int = 1,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Runs one Tuner per label split on the connected Ray cluster and writes results.csv and the PNG.

    Args:
        cfg: base config of every trial (its output_dir and storage are made absolute for the trial processes).
        space: config key -> values, crossed as a grid.
        splits: from split_grid.
        name: experiment name (needed to resume); default `sweep-<timestamp>`.
        num_samples: repeats of the grid (different seeds only if the space varies train.seed).
        resume: restore each split's Tuner from storage when it exists.

    Returns:
        One row per trial: split, trial_id, the parameters, miou (best validation mIoU of the trial), final_miou,
        step (the last validated iteration), status (ok | stopped by ASHA | error).
    """
    check_space(cfg, space)
    name = name or f"sweep-{datetime.now():%Y%m%d-%H%M%S}"
    cfg = copy.deepcopy(cfg)
    cfg.logging.group = cfg.logging.group or name  # every trial is its own W&B run in this group
    cfg.train.output_dir = str(Path(cfg.train.output_dir).expanduser().resolve())
    cfg.ray.storage_path = storage_path(cfg)
    rows: list[dict[str, Any]] = []
    for label, overrides in splits:
        split_cfg = with_iterations(validate(apply_overrides(copy.deepcopy(cfg), dict(overrides))))
        grid = _tuner(split_cfg, space, f"{name}-split{label}", num_samples, resume).fit()
        for result in grid:
            history = result.metrics_dataframe
            best = float(history["miou"].max()) if history is not None and "miou" in history else math.nan
            metrics = result.metrics or {}
            step = metrics.get("step", 0)
            status = "error" if result.error else "ok" if step >= split_cfg.train.iterations else "stopped"
            rows.append(
                {
                    "split": label,
                    "trial_id": metrics.get("trial_id", Path(result.path).name),
                    **{key: result.config[key] for key in space},
                    "miou": best,
                    "final_miou": metrics.get("miou", math.nan),
                    "step": step,
                    "status": status,
                }
            )
    out = Path(cfg.train.output_dir) / name
    write_results(rows, list(space), out)
    print(format_table(rows, list(space)), flush=True)
    return rows


def write_results(rows: Sequence[Mapping[str, Any]], params: Sequence[str], out: Path) -> None:
    """results.csv, and miou_vs_mask_ratio.png (best mIoU over the other parameters, one line per split) when the
    mask ratio is swept."""
    out.mkdir(parents=True, exist_ok=True)
    columns = ["split", "trial_id", *params, "miou", "final_miou", "step", "status"]
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    key = "ssl.tmp.mask_ratio"
    if key in params:
        series: dict[str, dict[float, float]] = {}
        for row in rows:
            if not math.isnan(row["miou"]):
                best = series.setdefault(f"split {row['split']}", {})
                best[row[key]] = max(best.get(row[key], -math.inf), row["miou"])
        if series:
            plot_xy(
                {split: list(points.items()) for split, points in series.items()},
                xlabel="TMP mask ratio",
                ylabel="best validation mIoU",
                path=out / "miou_vs_mask_ratio.png",
            )


def format_table(rows: Sequence[Mapping[str, Any]], params: Sequence[str]) -> str:
    """The closing table: per split, the best trial's parameters and mIoU."""
    lines = [f"{'split':<10}{'trials':>7}{'best mIoU':>11}  best parameters"]
    for split in dict.fromkeys(r["split"] for r in rows):
        trials = [r for r in rows if r["split"] == split]
        scored = [r for r in trials if not math.isnan(r["miou"])]
        if not scored:
            lines.append(f"{split:<10}{len(trials):>7}{'-':>11}  (no trial reached a validation)")
            continue
        best = max(scored, key=lambda r: r["miou"])
        params_text = ", ".join(f"{k}={best[k]}" for k in params)
        lines.append(f"{split:<10}{len(trials):>7}{best['miou']:>11.2f}  {params_text}")
    return "\n".join(lines)
