"""A saved checkpoint scored and drawn in this process, without Ray (what jobs/evaluate.py runs).

    result = evaluate_checkpoint("runs/ray/my-run/checkpoint_...", mode="sliding_window", overlays="overlays/")
    draw_pseudo_labels("runs/ray/my-run/checkpoint_...", "pseudo_labels.png")

Importing this module must not import Ray (tests/test_jobs.py checks it through jobs/evaluate.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from csl_ray.checkpoint import load_student
from csl_ray.data.reader import iter_local
from csl_ray.data.shards import read_manifest
from csl_ray.data.streams import dataset_root
from csl_ray.evaluate import eval_options, evaluate
from csl_ray.selection import build_selector
from csl_ray.tracking import pseudo_label_panels, write_overlays, write_pseudo_label_figure


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    root: str | None = None,
    mode: str | None = None,
    device: str | None = None,
    overlays: str | os.PathLike | None = None,
    num_overlays: int = 8,
) -> dict[str, Any]:
    """Scores a checkpoint's student on a dataset root's validation split, in this process (no Ray).

    Args:
        checkpoint: a checkpoint directory (state.pt + config.yaml), e.g. results.json's `best_checkpoint`.
        root: dataset root; default the checkpoint config's data.root (None = the built-in dataset).
        mode: full | center_crop | sliding_window; default the config's data.eval_mode.
        device: default CUDA when available, else CPU.
        overlays: write PNG panels (image, ground truth, prediction, CSL weight map) of the first images here.
        num_overlays: how many.

    Returns:
        evaluate()'s `miou`, `iou_per_class`, `pixel_acc`, plus `class_names`, `mode`, `step`, `checkpoint`.
    """
    cfg, model, step = load_student(checkpoint, root, device)
    root = dataset_root(cfg)
    batches = iter_local(cfg, "val", root)
    options = eval_options(cfg.data, mode)
    result = evaluate(model, batches, **options)
    if overlays is not None:
        selector = build_selector(cfg.ssl.selector)
        write_overlays(model, batches, overlays, selector=selector, limit=num_overlays, **options)
    names = list(read_manifest(root)["class_names"])
    return {**result, "class_names": names, "mode": options["mode"], "step": step, "checkpoint": str(checkpoint)}


def draw_pseudo_labels(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    root: str | None = None,
    device: str | None = None,
    num_images: int = 4,
) -> Path:
    """The pseudo-label diagnostics figure of a checkpoint: for the first unlabelled training rows of the run's
    stream (training augmentation, TMP cells and all), the weak view, its ground truth, the checkpoint's prediction
    as teacher, the selector's weight map, the reliable pixels and the TMP view, as one PNG (see
    tracking.pseudo_label_panels). Same arguments as `evaluate_checkpoint`; returns the PNG's path."""
    cfg, model, step = load_student(checkpoint, root, device)
    batch = next(iter(iter_local(cfg, "unlabeled", dataset_root(cfg), batch_size=num_images)))
    rows = pseudo_label_panels(
        model,
        batch,
        selector=build_selector(cfg.ssl.selector),
        num_classes=cfg.data.num_classes,
        ignore_index=cfg.data.ignore_index,
    )
    tmp = cfg.ssl.tmp
    title = f"iteration {step}; selector {cfg.ssl.selector.kind}; TMP mask ratio {tmp.mask_ratio}, block {tmp.block}"
    return write_pseudo_label_figure(rows, out, title=title)
