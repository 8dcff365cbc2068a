"""Per-row views: one decoded row -> the named arrays of a training or validation row (docs/data.md, "Batch schema").

Pure functions of their inputs (numpy / torch in, arrays out; no Ray, no I/O): every row's random views come from a
generator seeded by (seed, split, epoch, row id), so they are the same in any process, in any order, on a retry.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torchvision.io import ImageReadMode, decode_image

from csl_ray.augment import mild_view, resize_crop_flip, strong_view
from csl_ray.config import Config
from csl_ray.masking import cutmix_box, tmp_cells

TORCH_DTYPES: dict[str, dict[str, torch.dtype]] = {
    "labeled": {"image": torch.uint8, "mask": torch.uint8, "index": torch.int64, "epoch": torch.int64},
    "unlabeled": {
        "image_weak": torch.uint8,
        "image_strong": torch.uint8,
        "image_masked": torch.uint8,
        "tmp_cells": torch.bool,
        "cutmix_box": torch.bool,
        "valid": torch.bool,
        "mask": torch.uint8,
        "index": torch.int64,
        "epoch": torch.int64,
        "partner_weak": torch.uint8,
        "partner_strong": torch.uint8,
        "partner_valid": torch.bool,
        "partner_index": torch.int64,
    },
    "val": {"image": torch.uint8, "mask": torch.uint8, "index": torch.int64},
}
"""`iter_torch_batches(dtypes=TORCH_DTYPES[split])`: masks stay uint8 (8x less than int64) until the training device,
where the step and `evaluate` widen them; boolean maps, uint8 between the decode tasks and here (`wire_array`),
become bool again."""

STREAM_IDS = {"labeled": 1, "unlabeled": 2, "val": 3}
"""Each split's own number in the seeds of its random draws."""


class CorruptRowError(RuntimeError):
    """A row whose bytes do not decode (strict mode); the message names the shard and the row."""


@dataclass(frozen=True)
class ViewParams:
    """Everything the per-row transforms need (built from the config by `view_params`)."""

    crop_size: int
    scale_range: tuple[float, float]
    ignore_index: int
    cutmix_prob: float
    tmp_enabled: bool
    tmp_prob: float
    tmp_block: int
    tmp_mask_ratio: float


def view_params(cfg: Config) -> ViewParams:
    """The ViewParams of a config."""
    return ViewParams(
        crop_size=cfg.data.crop_size,
        scale_range=tuple(cfg.data.scale_range),
        ignore_index=cfg.data.ignore_index,
        cutmix_prob=cfg.ssl.cutmix_prob,
        tmp_enabled=cfg.ssl.tmp.enabled,
        tmp_prob=cfg.ssl.tmp.prob,
        tmp_block=cfg.ssl.tmp.block,
        tmp_mask_ratio=cfg.ssl.tmp.mask_ratio,
    )


def row_generator(seed: int, split: str, epoch: int, row_id: str) -> torch.Generator:
    """A torch.Generator that is a pure function of (seed, split, epoch, row id), stable across processes."""
    digest = int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:8], "little")
    state = np.random.SeedSequence([seed, STREAM_IDS[split], epoch, digest]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def decode_row(image: bytes, mask: bytes | None, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded bytes -> (image uint8 [3, H, W] RGB, mask uint8 [H, W]; all `ignore_index` when there is no mask).

    Raises:
        ValueError (or torchvision's RuntimeError) for bytes that do not decode or sizes that disagree.
    """
    with warnings.catch_warnings():  # decoding only reads the buffer; copying it to make it writable is waste
        warnings.simplefilter("ignore", UserWarning)
        pixels = decode_image(torch.frombuffer(image, dtype=torch.uint8), mode=ImageReadMode.RGB)
        if mask is None:
            return pixels, torch.full(pixels.shape[1:], ignore_index, dtype=torch.uint8)
        labels = decode_image(torch.frombuffer(mask, dtype=torch.uint8), mode=ImageReadMode.GRAY)[0]
    if labels.shape != pixels.shape[1:]:
        raise ValueError(f"mask size {tuple(labels.shape)} != image size {tuple(pixels.shape[1:])}")
    return pixels, labels


def labeled_views(
    image: torch.Tensor, mask: torch.Tensor, params: ViewParams, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """A labelled training row: the weak crop and its mask.

    Args:
        image: uint8 [3, H, W].
        mask: uint8 [H, W].

    Returns:
        `image` uint8 [3, S, S], `mask` uint8 [S, S] (ignore_index on padding).
    """
    image, mask, _ = resize_crop_flip(
        image,
        mask,
        crop_size=params.crop_size,
        scale_range=params.scale_range,
        ignore_index=params.ignore_index,
        generator=generator,
    )
    return {"image": image, "mask": mask}


def unlabeled_views(
    image: torch.Tensor, mask: torch.Tensor, params: ViewParams, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """An unlabelled training row with every view the step needs (docs/data.md, "Batch schema").

    The masked view takes the mild aug + TMP cells with probability tmp_prob (when TMP is enabled), otherwise an
    independent strong draw with no cells.

    Args:
        image: uint8 [3, H, W].
        mask: uint8 [H, W] ground truth for diagnostics (all ignore_index when unknown).

    Returns:
        `image_weak`, `image_strong`, `image_masked` uint8 [3, S, S]; `tmp_cells`, `cutmix_box`, `valid`
        bool [S, S]; `mask` uint8 [S, S].
    """
    size = params.crop_size
    weak, mask, valid = resize_crop_flip(
        image, mask, crop_size=size, scale_range=params.scale_range, ignore_index=params.ignore_index,
        generator=generator,
    )  # fmt: skip
    strong = strong_view(weak, generator)
    if params.tmp_enabled and torch.rand((), generator=generator).item() < params.tmp_prob:
        masked = mild_view(weak, generator)
        cells = tmp_cells(size, params.tmp_block, params.tmp_mask_ratio, generator)
    else:
        masked = strong_view(weak, generator)
        cells = torch.zeros(size, size, dtype=torch.bool)
    return {
        "image_weak": weak,
        "image_strong": strong,
        "image_masked": masked,
        "tmp_cells": cells,
        "cutmix_box": cutmix_box(size, params.cutmix_prob, generator),
        "valid": valid,
        "mask": mask,
    }


def partner_views(
    image: torch.Tensor, mask: torch.Tensor, params: ViewParams, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The views a row's CutMix partner contributes: its weak crop and the strong view pasted into the row's box.

    Args:
        image: uint8 [3, H, W] of the partner.
        mask: uint8 [H, W] (shapes the crop; not returned).

    Returns:
        `partner_weak`, `partner_strong` uint8 [3, S, S]; `partner_valid` bool [S, S].
    """
    weak, _, valid = resize_crop_flip(
        image, mask, crop_size=params.crop_size, scale_range=params.scale_range, ignore_index=params.ignore_index,
        generator=generator,
    )  # fmt: skip
    return {"partner_weak": weak, "partner_strong": strong_view(weak, generator), "partner_valid": valid}


Decoded = tuple[int, torch.Tensor, torch.Tensor]
"""(row number within the group, image uint8 [3, H, W], mask uint8 [H, W])."""


def pairs(decoded: list[Decoded]) -> list[tuple[Decoded, Decoded]]:
    """Consecutive rows as (main, CutMix partner) pairs; an odd row left over takes the first row as its partner."""
    paired = list(zip(decoded[0::2], decoded[1::2], strict=False))  # the odd row out is paired below
    if len(decoded) % 2:
        paired.append((decoded[-1], decoded[0]))
    return paired


def transform_rows(
    table: pa.Table,
    rows: list[int],
    *,
    split: str,
    params: ViewParams,
    seed: int,
    epoch: int,
    first_index: int,
    where: str,
    first_row: int,
    strict: bool,
) -> tuple[list[dict[str, np.ndarray]], dict[str, str]]:
    """Decodes and augments rows of one row group (a pure function: numpy/torch in, arrays out).

    Unlabelled rows are paired in the given order (`pairs`): the first of a pair gives a row's own views, the second
    only its `partner_*` views, so each output row is a main crop with its CutMix partner.

    Args:
        table: the row group with columns id, image, mask.
        rows: row numbers within the group, in output order.
        split: labeled | unlabeled | val (which views to make).
        params: crop and augmentation parameters.
        seed, epoch: with the row id, the seed of the row's generator.
        first_index: split-wide index of the group's first row (the `index` column).
        where: the shard's name, first_row: the group's first row within it (for messages).
        strict: raise CorruptRowError instead of skipping a row that does not decode.

    Returns:
        (one dict of numpy arrays per kept row (unlabelled: per pair; boolean maps as uint8, `wire_array`), each with
        `index` and, for training splits, `epoch`;
        {"shard row N": "shard row N (id ...): corrupt: error"} for the skipped rows).
    """
    ids = table.column("id").to_pylist()
    images = table.column("image")
    masks = table.column("mask")
    decoded: list[Decoded] = []
    skipped = {}
    for row in rows:
        try:
            mask = masks[row].as_py()
            if mask is None and split != "unlabeled":
                raise ValueError("no mask in a labelled split")
            decoded.append((row, *decode_row(images[row].as_py(), mask, params.ignore_index)))
        except (RuntimeError, ValueError) as err:
            key = f"{where} row {first_row + row}"
            message = f"{key} (id {ids[row]!r}): corrupt: {err}"
            if strict:
                raise CorruptRowError(message) from err
            skipped[key] = message
    out = []
    if split == "unlabeled":
        for (row, image, labels), (partner, partner_image, partner_labels) in pairs(decoded):
            views = unlabeled_views(image, labels, params, row_generator(seed, split, epoch, ids[row]))
            generator = row_generator(seed, split, epoch, ids[partner])
            views.update(partner_views(partner_image, partner_labels, params, generator))
            views["partner_index"] = torch.tensor(first_index + partner)
            out.append((row, views))
    else:
        for row, image, labels in decoded:
            if split == "val":
                out.append((row, {"image": image, "mask": labels}))
            else:
                out.append((row, labeled_views(image, labels, params, row_generator(seed, split, epoch, ids[row]))))
    for row, views in out:
        views["index"] = torch.tensor(first_index + row)
        if split != "val":
            views["epoch"] = torch.tensor(epoch)
    return [{k: wire_array(v) for k, v in views.items()} for _, views in out], skipped


def wire_array(tensor: torch.Tensor) -> np.ndarray:
    """A view as the array a decode task hands to Ray Data: boolean maps as uint8 0/1.

    Arrow stores booleans as bits, and packing four [321, 321] maps per row into them cost the decode tasks more than
    the bytes saved; uint8 passes through as it is. `TORCH_DTYPES` turns them back into bool.
    """
    return (tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor).numpy()


def stack_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Row dicts -> one batch dict of stacked arrays."""
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}
