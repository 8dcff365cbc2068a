"""Tiled passes over the pixels of a batch of class-probability maps, shared by the selectors (csl_ray/selection.py).

On CPU a pass walks tiles of pixels (every image at once) so that the per-pixel intermediates stay in cache; off the
CPU one tile covers every pixel. The class dimension is reduced in one sweep: running max, its first index and,
for CSL, the sums of the other probabilities, so nothing of size [N, C, H, W] is allocated.
"""

from __future__ import annotations

import torch
from torch import Tensor

CPU_TILE_PIXELS = 1 << 20
"""Pixels per CPU tile, summed over the batch (4 MiB per float32 work array, about 80 MiB of work arrays in all).
`benchmarks/selector.py` on a 2-core VM, csl median at 16x21x321^2 / 8x19x801^2: cache-sized 2^17-pixel tiles took
113 / 335 ms on 1 thread but 209 / 617 ms on 2, where each small op split across threads ran slower than on one;
2^20-pixel tiles take 154 / 392 ms on 1 thread and 113 / 292 ms on 2."""


def check_inputs(probs: Tensor, valid: Tensor) -> tuple[int, int, int, int]:
    """Shapes (N, C, H, W) of `probs` [N, C, H, W] float and `valid` [N, H, W] bool; ValueError if they do not fit."""
    if probs.dim() != 4 or not probs.is_floating_point():
        raise ValueError(f"probs must be a floating-point [N, C, H, W] tensor, got {probs.dtype} {tuple(probs.shape)}")
    n, c, h, w = probs.shape
    if valid.dtype != torch.bool or tuple(valid.shape) != (n, h, w):
        raise ValueError(f"valid must be a bool [N, H, W] = {[n, h, w]} tensor, got {valid.dtype} {tuple(valid.shape)}")
    if valid.device != probs.device:
        raise ValueError(f"probs ({probs.device}) and valid ({valid.device}) must be on the same device")
    if c < 2:
        raise ValueError(f"need at least 2 classes, got {c}")
    return n, c, h, w


def class_pass(
    probs: Tensor,
    max_prob: Tensor,
    argmax: Tensor,
    is_new_max: Tensor,
    residual_sums: Tensor | None = None,
    loser: Tensor | None = None,
) -> None:
    """One pass over the classes of a tile: max, first arg-max and (optionally) sums over the other classes.

    Args:
        probs: probabilities [n, C, l] in the compute dtype (a view is fine).
        max_prob: out [n, l], the max over classes (non-finite if any class is NaN or the max is inf).
        argmax: out [n, l], the first arg-max as a float (exact up to 2^24 classes).
        is_new_max: scratch [n, l].
        residual_sums: out [2, n, l] or None: the sum and the sum of squares of every class but the arg-max.
        loser: scratch [n, l], needed with `residual_sums`.
    """
    class_ids = torch.arange(probs.shape[1], dtype=argmax.dtype, device=argmax.device)
    max_prob.copy_(probs[:, 0])
    argmax.zero_()
    if residual_sums is not None:
        residual_sums.zero_()
    for c in range(1, probs.shape[1]):
        prob_c = probs[:, c]
        # Classes arrive in order, so a strictly larger value hands the arg-max to c (ties keep the first class).
        # lerp with a 0/1 weight is an exact select, and cheaper than torch.where / minimum / maximum here.
        torch.gt(prob_c, max_prob, out=is_new_max)
        torch.lerp(argmax, class_ids[c], is_new_max, out=argmax)
        if residual_sums is not None:
            # The loser of (p_c, running max) is never the arg-max entry: summing losers leaves exactly that one out.
            torch.lerp(prob_c, max_prob, is_new_max, out=loser)
            residual_sums[0].add_(loser)
            residual_sums[1].addcmul_(loser, loser)
        torch.lerp(max_prob, prob_c, is_new_max, out=max_prob)


class Tiling:
    """Pixel ranges [start, stop) that every pass walks, and the [n, 2, size] feature view of one range.

    The features live in one [n, 2 * pixels] buffer with each tile's a row and b row side by side, so a tile's
    features are contiguous and `torch.bmm` reads them without a copy.
    """

    def __init__(self, n: int, pixels: int, device: torch.device) -> None:
        # One tile off the CPU, where caches are not the bottleneck.
        step = max(pixels, 1) if device.type != "cpu" else max(256, CPU_TILE_PIXELS // max(n, 1))
        self.ranges = [(start, min(start + step, pixels)) for start in range(0, max(pixels, 1), step)]
        self.span = self.ranges[0][1] - self.ranges[0][0]

    @staticmethod
    def features(features: Tensor, start: int, stop: int) -> Tensor:
        return features[:, 2 * start : 2 * stop].unflatten(1, (2, stop - start))


def max_argmax(probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Max probability float32 [N, H, W], first arg-max int64 [N, H, W], and whether every class is finite."""
    n, num_classes, height, width = probs.shape
    pixels = height * width
    device = probs.device
    dtype = torch.float64 if probs.dtype == torch.float64 else torch.float32
    probs_flat = probs.reshape(n, num_classes, pixels)
    tiling = Tiling(n, pixels, device)
    confidence = torch.empty(n, pixels, dtype=torch.float32, device=device)
    labels = torch.empty(n, pixels, dtype=torch.int64, device=device)
    finite = torch.empty(n, pixels, dtype=torch.bool, device=device)
    span = tiling.span
    max_prob, argmax, is_new_max, class_sum = (torch.empty(n, span, dtype=dtype, device=device) for _ in range(4))
    upcast_tile = torch.empty(n, num_classes, span, dtype=dtype, device=device) if probs.dtype != dtype else None
    for start, stop in tiling.ranges:
        size = stop - start
        probs_tile = probs_flat[:, :, start:stop]
        if upcast_tile is not None:
            probs_tile = upcast_tile[:, :, :size].copy_(probs_tile)
        class_pass(probs_tile, max_prob[:, :size], argmax[:, :size], is_new_max[:, :size])
        confidence[:, start:stop].copy_(max_prob[:, :size])
        labels[:, start:stop].copy_(argmax[:, :size])
        # The max misses a -inf in another class; the class sum is non-finite if any class is.
        finite[:, start:stop] = torch.isfinite(torch.sum(probs_tile, dim=1, out=class_sum[:, :size]))
    shape = (n, height, width)
    return confidence.view(shape), labels.view(shape), finite.view(shape)
