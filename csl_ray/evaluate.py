"""Validation in UniMatch's three modes, scored with a device confusion matrix reduced once per evaluation.

- `full`: the whole image in one forward pass (Pascal).
- `center_crop`: the central crop_size x crop_size region of image and mask only (COCO, as UniMatch).
- `sliding_window`: windows of crop_size with stride int(2/3 crop_size) from the top-left corner, the last one
  truncated at the border, softmax averaged where windows overlap (Cityscapes, as UniMatch). Unlike UniMatch's
  loop, no window starts after the previous one already reached the border (such a window adds nothing but a
  smaller-context prediction); on Cityscapes (1024x2048, crop 801) the windows are UniMatch's exactly.

    result = evaluate(model, val_batches, num_classes=21, mode="full", crop_size=321, ignore_index=255)
    result["miou"], result["iou_per_class"], result["pixel_acc"]
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from csl_ray.config import DataConfig, EvalMode
from csl_ray.metrics import ConfusionMatrix
from csl_ray.model import normalize_input

MODES: tuple[str, ...] = typing.get_args(EvalMode)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central size x size region of the last two dims of `x` (image [..., H, W] or mask); a side shorter
    than `size` is kept whole (no padding)."""
    h, w = x.shape[-2:]
    top, left = max((h - size) // 2, 0), max((w - size) // 2, 0)
    return x[..., top : top + size, left : left + size]


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of sliding windows along one side: 0, stride, 2*stride, ... until a window reaches the end."""
    starts = [0]
    while starts[-1] + window < length:
        starts.append(starts[-1] + stride)
    return starts


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"eval mode {mode!r} is not one of {', '.join(MODES)}")


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm running statistics, no dropout) and no autograd; restores the model's mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def predict(model: nn.Module, image: torch.Tensor, *, mode: str, crop_size: int) -> torch.Tensor:
    """Per-pixel class probabilities of uint8 images, in eval mode, without gradients.

    Args:
        model: maps normalised images [N, 3, h, w] to logits [N, C, h, w]; its `pixel_mean` / `pixel_std` buffers
            normalise the input (see csl_ray.model.normalize_input).
        image: uint8 [N, 3, H, W] on any device; normalised on the model's device.
        mode: one of MODES (see the module docstring).
        crop_size: window / crop side (unused in `full` mode).

    Returns:
        float32 probabilities [N, C, H, W]; in `center_crop` mode [N, C, h, w] covering `center_crop(image,
        crop_size)`.
    """
    _check_mode(mode)
    x = normalize_input(model, image)
    with _inference(model):
        if mode == "full":
            return model(x).float().softmax(dim=1)
        if mode == "center_crop":
            return model(center_crop(x, crop_size)).float().softmax(dim=1)
        n, _, h, w = x.shape
        stride = max(int(crop_size * 2 / 3), 1)
        probs = None
        count = x.new_zeros(1, 1, h, w)
        for top in window_starts(h, crop_size, stride):
            for left in window_starts(w, crop_size, stride):
                rows, cols = slice(top, top + crop_size), slice(left, left + crop_size)
                window = model(x[:, :, rows, cols]).float().softmax(dim=1)
                if probs is None:
                    probs = x.new_zeros(n, window.shape[1], h, w)
                probs[:, :, rows, cols] += window
                count[:, :, rows, cols] += 1
        return probs / count


def eval_options(data: DataConfig, mode: str | None = None) -> dict[str, Any]:
    """`evaluate`'s (and `val_panels`') dataset keywords from the data config; `mode` defaults to data.eval_mode."""
    return {
        "num_classes": data.num_classes,
        "mode": mode or data.eval_mode,
        "crop_size": data.crop_size,
        "ignore_index": data.ignore_index,
    }


def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    num_classes: int,
    mode: str,
    crop_size: int,
    ignore_index: int,
) -> dict:
    """Scores a model on validation batches; with torch.distributed, every process passes its own shard and all
    get the global result.

    Args:
        model: the (unwrapped) segmentation model; left in the mode it came in.
        batches: dicts with `image` uint8 [N, 3, H, W] and `mask` uint8 or int64 [N, H, W] (ignore_index never counts).
        num_classes: C.
        mode: full | center_crop | sliding_window.
        crop_size: crop / window side.
        ignore_index: label value excluded from every score.

    Returns:
        `miou` (percent, mean over classes present in target or prediction), `iou_per_class` (C floats in percent,
        NaN for a class absent from both), `pixel_acc` (percent).
    """
    _check_mode(mode)
    device = next(model.parameters()).device
    matrix = ConfusionMatrix(num_classes, ignore_index, device)
    for batch in batches:
        probs = predict(model, batch["image"], mode=mode, crop_size=crop_size)
        target = batch["mask"].to(device, non_blocking=True).long()  # masks travel as uint8; widened here
        if mode == "center_crop":
            target = center_crop(target, crop_size)
        matrix.update(probs.argmax(dim=1), target)
    matrix.all_reduce()
    return {"miou": matrix.miou(), "iou_per_class": matrix.iou().tolist(), "pixel_acc": matrix.pixel_acc()}
