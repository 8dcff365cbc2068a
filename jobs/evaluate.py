"""Evaluate a checkpoint on a dataset root: `python jobs/evaluate.py CHECKPOINT [--root DIR] [--mode MODE]`.

    python jobs/evaluate.py runs/ray/csl-resnet18-20250101-120000/checkpoint_2025-01-01_12-04-00.000000
    python jobs/evaluate.py runs/my-run --mode sliding_window --overlays overlays/ --num-overlays 16
    python jobs/evaluate.py runs/my-run --pseudo-labels pseudo_labels.png    # what the selector and TMP do

CHECKPOINT is a checkpoint directory (state.pt + config.yaml, as Ray Train stored it) or a run directory, whose
results.json names the best checkpoint. Runs in this process, without Ray.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from csl_ray.checkpoint import CheckpointError, checkpoint_of
from csl_ray.cli import format_iou_table
from csl_ray.config import ConfigError, load_config
from csl_ray.evaluate import MODES
from csl_ray.offline_eval import draw_pseudo_labels, evaluate_checkpoint
from csl_ray.preflight import check_dataset, check_writable, usage_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint directory, or a run directory (uses its best checkpoint)")
    parser.add_argument("--root", help="dataset root (manifest.json); default: the checkpoint config's data.root")
    parser.add_argument("--mode", choices=MODES, help="eval mode; default: the checkpoint config's data.eval_mode")
    parser.add_argument("--device", help="torch device; default cuda when available, else cpu")
    parser.add_argument("--overlays", metavar="DIR", help="write PNG panels (image | truth | prediction | weights)")
    parser.add_argument("--num-overlays", type=int, default=8, help="images to draw with --overlays (default 8)")
    parser.add_argument(
        "--pseudo-labels",
        metavar="FILE",
        help="also write a PNG of unlabelled training rows: weak view | ground truth | the checkpoint's prediction "
        "as teacher | CSL weight map | reliable pixels (green right, red wrong) | TMP-masked view",
    )
    parser.add_argument(
        "--num-pseudo-labels", type=int, default=4, help="unlabelled rows in the --pseudo-labels figure (default 4)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the scores as JSON")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        checkpoint = checkpoint_of(args.checkpoint)
    except CheckpointError as err:
        parser.error(str(err))
    try:  # before any work: a bad root or output path costs a second, not an evaluation
        cfg = load_config(path=checkpoint / "config.yaml")
        cfg.data.root = args.root or cfg.data.root
        check_dataset(cfg)
        check_writable("--overlays", args.overlays)
        check_writable("--pseudo-labels", args.pseudo_labels, is_file=True)
        check_writable("--json", args.json, is_file=True)
    except ConfigError as err:
        usage_error(parser, err)
    result = evaluate_checkpoint(
        checkpoint,
        root=args.root,
        mode=args.mode,
        device=args.device,
        overlays=args.overlays,
        num_overlays=args.num_overlays,
    )
    print(f"checkpoint {result['checkpoint']} (iteration {result['step']}), {result['mode']} eval")
    print(f"mIoU {result['miou']:.2f}   pixel acc {result['pixel_acc']:.2f}\n")
    print("\n".join(format_iou_table(result["class_names"], result["iou_per_class"])))
    if args.overlays:
        print(f"\noverlays in {args.overlays}")
    if args.pseudo_labels:
        path = draw_pseudo_labels(
            checkpoint, args.pseudo_labels, root=args.root, device=args.device, num_images=args.num_pseudo_labels
        )
        print(f"pseudo-label figure {path}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
