"""Sweep CSL with Ray Tune: search space x label splits, one Tuner per split, ASHA on validation mIoU.

    python jobs/tune.py --smoke                                       # 2 trials, 1 worker, a few iterations
    python jobs/tune.py --name sweep1                                 # default space x splits 1/16, 1/8, 1/4
    python jobs/tune.py --name sweep1 --resume                        # continue an interrupted sweep
    python jobs/tune.py --preset pascal data.root=/data/pascal ray.use_gpu=true ray.num_workers=2 \\
        --space ssl.tmp.mask_ratio=0.5,0.7 --space ssl.selector.lam=0,0.5 --split-files splits/1_4.txt

On a cluster submit it like jobs/train.py (`ray job submit --working-dir . -- python jobs/tune.py ...`) with
ray.storage_path on s3:// or gs://, so every trial's checkpoints are reachable from every node.
"""

from __future__ import annotations

import argparse

import ray

from csl_ray.cli import config_from_arguments, config_parser
from csl_ray.config import ConfigError
from csl_ray.preflight import check_run, usage_error
from csl_ray.ray_session import init_ray
from csl_ray.tune import (
    DEFAULT_FRACTIONS,
    DEFAULT_SPACE,
    SMOKE_FRACTIONS,
    SMOKE_SPACE,
    check_space,
    parse_space,
    split_grid,
    sweep,
)


def build_parser() -> argparse.ArgumentParser:
    parser = config_parser(__doc__, "for overrides and --space")
    default_space = " ".join(f"{k}={','.join(map(str, v))}" for k, v in DEFAULT_SPACE.items())
    parser.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help=f"a swept config key and its values (grid); repeatable; adds to or replaces the default space "
        f"({default_space})",
    )
    parser.add_argument(
        "--only-space", action="store_true", help="sweep only the --space keys, without the default space"
    )
    parser.add_argument(
        "--splits",
        default=None,
        metavar="F1,F2,...",
        help=f"label splits as fractions of the labelled pool (default {','.join(DEFAULT_FRACTIONS)}); one Tuner each",
    )
    parser.add_argument(
        "--split-files",
        default="",
        metavar="FILE1,FILE2,...",
        help="label splits as UniMatch-style files of labelled ids (data.labeled_list); one Tuner each; "
        "used instead of the default fractions",
    )
    parser.add_argument("--num-samples", type=int, default=1, help="repeats of the whole grid per split (default 1)")
    parser.add_argument("--name", help="experiment name (default sweep-<timestamp>); required with --resume")
    parser.add_argument(
        "--resume", action="store_true", help="restore the experiment --name from storage and finish its trials"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and not args.name:
        parser.error("--resume needs the --name of the experiment to continue")
    try:
        cfg = config_from_arguments(args)
        space = {} if args.only_space else dict(SMOKE_SPACE if args.smoke else DEFAULT_SPACE)
        space.update(parse_space(args.space))
        files = [f for f in args.split_files.split(",") if f]
        if args.splits is not None:
            fractions = [f for f in args.splits.split(",") if f]
        else:
            fractions = [] if files else list(SMOKE_FRACTIONS if args.smoke else DEFAULT_FRACTIONS)
        splits = split_grid(fractions, files)
        check_space(cfg, space)  # before Ray starts: a typo in a key fails in a second
        check_run(cfg)
    except ConfigError as err:
        usage_error(parser, err)
    started_here = init_ray(cfg)
    try:
        sweep(cfg, space, splits, name=args.name, num_samples=args.num_samples, resume=args.resume)
    finally:
        if started_here:
            ray.shutdown()


if __name__ == "__main__":
    main()
