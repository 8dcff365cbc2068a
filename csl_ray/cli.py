"""What the job scripts share on the command line: the config flags and the tables printed at the end.

    parser = argparse.ArgumentParser(...); add_config_arguments(parser)
    cfg = config_from_arguments(parser.parse_args())     # defaults <- preset <- --config <- --smoke <- overrides
    print(format_summary(summary))

`python jobs/evaluate.py` uses the tables only: nothing here imports Ray.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from typing import Any

from csl_ray.config import PRESETS, Config, load_config, reference_text

SMOKE_OVERRIDES = [
    "train.iterations=4",
    "ssl.warmup_iterations=2",
    "train.eval_every=4",
    "train.checkpoint_every=2",
    "ray.num_workers=1",
    "data.global_batch_size=2",
    "logging.log_every=1",
]
"""`--smoke`: a few iterations on one worker (applied before the command line's own overrides)."""


def config_parser(description: str, keys_for: str) -> argparse.ArgumentParser:
    """The parser of a job that takes a config (jobs/train.py, jobs/tune.py): its docstring as description, the
    config flags, and every config key with its default and meaning after the flags ("Config keys (`keys_for`)")."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Config keys ({keys_for}), default and meaning:\n" + reference_text(),
    )
    add_config_arguments(parser)
    return parser


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The config flags shared by jobs/train.py and jobs/tune.py."""
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides applied last, e.g. ssl.tmp.mask_ratio=0.5 ray.num_workers=4 (values parsed as YAML); "
        "train.iterations wins over train.epochs when both are given; every key is listed below",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML config (any subset of the sections; may name a preset)")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="base preset; default: the config file's own `preset:` key, or `tiny` when no --config is given",
    )
    parser.add_argument(
        "--set",
        dest="set_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="same as a positional override; repeatable",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"a few iterations on 1 worker to check a setup end to end ({' '.join(SMOKE_OVERRIDES)})",
    )


def config_from_arguments(args: argparse.Namespace) -> Config:
    """defaults <- preset (tiny without --config) <- --config file <- --smoke <- overrides."""
    preset = args.preset or (None if args.config else "tiny")
    overrides = (SMOKE_OVERRIDES if args.smoke else []) + list(args.overrides) + list(args.set_overrides)
    return load_config(preset=preset, path=args.config, overrides=overrides)


def format_duration(seconds: float) -> str:
    """`42s`, or `3m07s` from a minute on."""
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def format_iou_table(class_names: Sequence[str], iou_per_class: Sequence[float | None]) -> list[str]:
    """Lines of a per-class IoU table ('-' for a class absent from both prediction and ground truth)."""
    lines = [f"{'class':<24}{'IoU':>8}"]
    for name, iou in zip(class_names, iou_per_class, strict=True):
        missing = iou is None or math.isnan(iou)
        lines.append(f"{name:<24}{'-' if missing else f'{iou:.2f}':>8}")
    return lines


def format_summary(summary: Mapping[str, Any]) -> str:
    """The result table printed at the end of a run."""
    train = summary.get("train", {})
    lines = [
        f"run directory  {summary['run_dir']}",
        f"iterations     {summary['step']} (resumed from {summary['resumed_from']})"
        f" in {format_duration(summary['wall_time_s'])}",
        f"val mIoU       {summary['miou']:.2f}   (best {summary['best_miou']:.2f},"
        f" pixel accuracy {summary['pixel_acc']:.2f})",
        "",
        *format_iou_table(summary["class_names"], summary["iou_per_class"]),
        "",
    ]
    if "selected_ratio" in train:
        lines.append(f"selected ratio                 {train['selected_ratio']:.3f}")
    for key, label in (("pseudo_acc_selected", "selected"), ("pseudo_acc_rejected", "rejected")):
        if key in train:
            lines.append(f"pseudo-label accuracy {label:<9}{train[key]:.3f}")
    lines.append(f"corrupt rows   {len(summary['corrupt_rows'])} skipped (listed in results.json)")
    lines.append(f"checkpoint     {summary['checkpoint']}")
    return "\n".join(lines)
