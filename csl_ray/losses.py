"""Segmentation losses: the weighted pseudo-label CE (docs/method.md, The step) and the labelled CE / OHEM.

Pure tensor functions; nothing here synchronises with the host (no `.item()`, no data-dependent shapes).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from csl_ray.config import OptimConfig


def weighted_ce(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-pixel weighted cross-entropy `Σ w·CE / max(#valid, 1)`.

    Dividing by the valid pixels, not by the selected ones, is the released code's choice (docs/method.md, The step): a
    batch whose weights are mostly 0 contributes a small loss instead of a rescaled one.

    Args:
        logits: [N, C, H, W].
        target: int64 pseudo-labels [N, H, W]; values on invalid pixels are never read (255 is fine there).
        weights: per-pixel weights [N, H, W], usually in [0, 1].
        valid: bool [N, H, W]; False pixels contribute nothing.

    Returns:
        scalar loss.
    """
    ignore = -100
    ce = F.cross_entropy(logits, target.masked_fill(~valid, ignore), ignore_index=ignore, reduction="none")
    return (weights * ce).sum() / valid.sum().clamp_min(1)


def ohem_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int,
    thresh: float,
    min_kept: int,
) -> torch.Tensor:
    """Online hard example mining CE (UniMatch / U2PL `ProbOhemCrossEntropy2d`).

    Keeps the valid pixels whose true-class probability is <= the threshold, where the threshold is `thresh` raised
    to the `min_kept`-th smallest true-class probability when that is larger, so at least `min_kept` of the hardest
    pixels are kept (all valid pixels when there are fewer). Averages CE over the kept pixels. Unlike the reference,
    `min_kept=0` applies the plain `thresh` rule (the reference then keeps every pixel).

    Args:
        logits: [N, C, H, W].
        target: int64 labels [N, H, W], `ignore_index` where unlabelled.
        ignore_index: label value excluded from the loss.
        thresh: probability below which a pixel counts as hard.
        min_kept: least number of pixels kept (over the whole batch).

    Returns:
        scalar loss (0 when no pixel is valid).
    """
    valid = target != ignore_index
    safe_target = target.masked_fill(~valid, 0)
    with torch.no_grad():
        scores = logits.detach().float()
        prob = (scores.gather(1, safe_target.unsqueeze(1)).squeeze(1) - torch.logsumexp(scores, dim=1)).exp()
        # Invalid pixels sort after every probability, so the k-th smallest value is the k-th smallest valid one,
        # and with fewer than k valid pixels it is 2 and keeps them all, without a host sync to count them.
        prob = prob.masked_fill(~valid, 2.0)
        threshold = torch.tensor(thresh, device=prob.device)
        if min_kept > 0:
            kth = prob.flatten().kthvalue(min(min_kept, prob.numel())).values
            threshold = torch.maximum(threshold, kth)
        kept = valid & (prob <= threshold)
    ce = F.cross_entropy(logits, target.masked_fill(~kept, ignore_index), ignore_index=ignore_index, reduction="sum")
    return ce / kept.sum().clamp_min(1)


def build_labeled_loss(cfg: OptimConfig, ignore_index: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The labelled-batch loss `(logits, target) -> scalar` named by `cfg.labeled_loss` ("ce" or "ohem")."""
    if cfg.labeled_loss == "ce":
        return functools.partial(F.cross_entropy, ignore_index=ignore_index)
    return functools.partial(ohem_ce, ignore_index=ignore_index, thresh=cfg.ohem_thresh, min_kept=cfg.ohem_min_kept)
