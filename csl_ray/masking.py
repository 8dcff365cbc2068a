"""CutMix boxes and Trusted Mask Perturbation (TMP) block masks (docs/method.md, TMP and The step).

Pure tensor functions. Randomness comes only from the explicit `torch.Generator`, so a seeded generator gives the
same masks on any worker; masks are made on the generator's device.
"""

from __future__ import annotations

import math

import torch


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * torch.rand((), generator=generator, device=generator.device).item()


def _randint(high: int, generator: torch.Generator) -> int:
    return int(torch.randint(high, (), generator=generator, device=generator.device).item())


def cutmix_box(
    size: int,
    prob: float,
    generator: torch.Generator,
    *,
    size_min: float = 0.02,
    size_max: float = 0.4,
    ratio_min: float = 0.3,
    ratio_max: float = 1 / 0.3,
) -> torch.Tensor:
    """UniMatch's `obtain_cutmix_box`: with probability `prob` one axis-aligned box, else nothing.

    The box covers a uniform(size_min, size_max) fraction of the square image with aspect ratio
    uniform(ratio_min, ratio_max); the aspect ratio and the top-left corner are redrawn until the box fits.

    Args:
        size: side of the square crop in pixels.
        prob: probability that the box is not empty.
        generator: the source of randomness.

    Returns:
        bool [size, size], True inside the box.
    """
    box = torch.zeros(size, size, dtype=torch.bool, device=generator.device)
    if torch.rand((), generator=generator, device=generator.device).item() > prob:
        return box
    area = _uniform(size_min, size_max, generator) * size * size
    while True:
        ratio = _uniform(ratio_min, ratio_max, generator)
        width, height = int(math.sqrt(area / ratio)), int(math.sqrt(area * ratio))
        x, y = _randint(size, generator), _randint(size, generator)
        if x + width <= size and y + height <= size:
            break
    box[y : y + height, x : x + width] = True
    return box


def tmp_cells(size: int, block: int, mask_ratio: float, generator: torch.Generator) -> torch.Tensor:
    """TMP block grid: round(size / block) cells a side, each on with probability `mask_ratio`.

    Nearest-neighbour upsampling maps pixel i to cell floor(i * cells / size) (integer arithmetic, so cells are
    exact even when `size` is not a multiple of the grid).

    Args:
        size: side of the square crop in pixels.
        block: nominal cell side in pixels.
        mask_ratio: probability that a cell is on.
        generator: the source of randomness.

    Returns:
        bool [size, size], True on on-cells.
    """
    cells = max(round(size / block), 1)
    grid = torch.rand(cells, cells, generator=generator, device=generator.device) < mask_ratio
    index = torch.arange(size, device=generator.device) * cells // size
    return grid[index[:, None], index[None, :]]


def apply_tmp(images: torch.Tensor, cells: torch.Tensor, reliable: torch.Tensor) -> torch.Tensor:
    """Zeroes the pixels that are both on an on-cell and reliable (out of place).

    Args:
        images: normalised images [N, 3, H, W] (0 is the dataset mean after normalisation).
        cells: bool [N, H, W], the TMP on-cells (all False for rows without the mask).
        reliable: bool [N, H, W], pixels with selection weight 1.

    Returns:
        the masked images [N, 3, H, W].
    """
    return images.masked_fill((cells & reliable).unsqueeze(1), 0.0)


def paste(base: torch.Tensor, other: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """CutMix paste: `other` inside the box, `base` outside.

    Args:
        base: images [N, 3, H, W] or per-pixel maps [N, H, W] (labels, weights, masks).
        other: same shape as `base`.
        box: bool [N, H, W].

    Returns:
        where(box, other, base), shaped like `base`.
    """
    if base.dim() == 4:
        box = box.unsqueeze(1)
    return torch.where(box, other, base)
