"""Pseudo-label selection (docs/method.md, Selection): the CSL selector and the threshold / none baselines.

Every selector maps teacher probabilities [N, C, H, W] and a validity mask [N, H, W] to a `Selection`:

    select = build_selector(cfg.ssl.selector)    # the configured selector as a (probs, valid) -> Selection callable
    sel = select(probs, valid)                   # weights, labels, reliable, confidence (+ per-image stats)

`csl_select` is batched: each image's 2x2 spectral problem needs only masked sums over that image's pixels, so all
images are solved together in closed form, with no loop over images or pixels. It makes three passes over the
pixels, one per step of the method: the features (a, b) and each image's Gram matrix; the cluster of every pixel
and the moments of the second cluster; the soft weights from the reliable cluster's mean and variance. The passes
walk tiles of pixels (csl_ray/pixel_passes.py); nothing of size [N, C, H, W] is allocated (except a float32 copy of
one tile for half-precision input).

Precision: per-pixel work runs in float32 (float64 for float64 input); every per-image sum is accumulated in float64
from exact float64 products, and the 2x2 eigenproblems are solved in float64. The residual sums leave the arg-max
entry out directly instead of subtracting it from full sums: sum(p^2) - m^2 cancels catastrophically in float32 when
m is near 1, where g = (C-1)^2 / (2(1-m+eps)) then amplifies the error by up to 1/eps = 1e10.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from csl_ray.config import SelectorConfig
from csl_ray.pixel_passes import Tiling, check_inputs, class_pass, max_argmax

EPS = 1e-10
"""The epsilon of the released code: in g = (C-1)^2 / (2(1 - m + eps)) and in z = d / sqrt(v + eps)."""
RANK_TOL = 1e-12
"""An eigenvalue of the 2x2 Gram matrix below RANK_TOL * trace counts as zero (docs/method.md, Selection)."""


@dataclass
class Selection:
    """Pseudo-labels and their loss weights for a batch of unlabelled images.

    Attributes:
        weights: float32 [N, H, W] in [0, 1]; 0 on invalid pixels.
        labels: int64 [N, H, W], the arg-max class (the first one on ties).
        reliable: bool [N, H, W], weights == 1 on valid pixels (they drive TMP and the selected ratio).
        confidence: float32 [N, H, W], the max probability.
        stats: per-image tensors; empty for the baselines. `csl_select` gives `num_valid` int64 [N] (pixels used),
            `cluster_sizes` int64 [N, 2] (leading cluster first), `reliable_cluster` int64 [N] (0 = leading),
            `reliable_mean` and `reliable_var` float32 [N, 2] (of the features a = log m and b = -s over the
            reliable cluster) and `eigenvalues` float32 [N, 2] (of the Gram matrix, decreasing).
    """

    weights: Tensor
    labels: Tensor
    reliable: Tensor
    confidence: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


def _features(max_prob: Tensor, residual_sums: Tensor, a: Tensor, b: Tensor, num_classes: int, kappa: float) -> None:
    """Per-pixel features a = log m and b = -s (docs/method.md, Selection) from the max and the residual sums.

    With r1, r2 the sum and sum of squares of the C-1 non-max probabilities and mu_r = r1 / (C-1):
    (C-1) sigma^2 = sum_{c != y}(p_c - mu_r)^2 [+ mu_r^2 as released] = r2 - kappa r1^2, with
    kappa = (C-2)/(C-1)^2 (released) or 1/(C-1) (population); s = g sigma^2 = (C-1)/2 * (C-1) sigma^2 / (1 - m + eps).
    `a` is written first and serves as scratch for `b`'s denominator before the log.
    """
    # r1^2 is rounded on its own (no fused multiply-add) so that a single residual class (C = 2, population) gives
    # exactly r2 - r1^2 = 0, as in the reference; the clamp catches rounding below 0 for other uniform residuals.
    torch.mul(residual_sums[0], residual_sums[0], out=b)
    torch.add(residual_sums[1], b, alpha=-kappa, out=b).clamp_(min=0.0)
    # 1 - m is exact for m >= 1/2; eps is added after the subtraction, as in the reference.
    one_minus_max = torch.sub(torch.ones((), dtype=max_prob.dtype, device=max_prob.device), max_prob, out=a)
    b.div_(one_minus_max.add_(EPS)).mul_(-0.5 * (num_classes - 1))
    torch.log(max_prob, out=a)


def _mask_unusable(a: Tensor, b: Tensor, usable: Tensor) -> None:
    """Zeroes the features outside `usable` (float 0/1) and drops pixels with non-finite features from it."""
    if bool(torch.isfinite(a.sum() + b.sum())):  # the common case: two cheap reductions instead of a per-pixel test
        a.mul_(usable)
        b.mul_(usable)
        return
    usable.mul_(torch.isfinite(a) & torch.isfinite(b))
    a.nan_to_num_(0.0, 0.0, 0.0).mul_(usable)
    b.nan_to_num_(0.0, 0.0, 0.0).mul_(usable)


def _moment_rows(features: Tensor, indicator: Tensor, out: Tensor) -> Tensor:
    """f = (a, b, 1) times a 0/1 indicator, widened to float64 [n, 3, l] (its f f^T products are exact there).

    Args:
        features: [n, 2, l], rows a and b (already 0 outside the usable pixels).
        indicator: [n, l], 1 on the pixels to count.
        out: float64 [n, 3, l].
    """
    out[:, 2].copy_(indicator)
    torch.mul(features, indicator[:, None], out=out[:, :2])
    return out


def _whitened_directions(gram: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """Closed-form 2x2 symmetric eigen-solve, batched: h_k = x . v_k / s_k (docs/method.md, Selection).

    Args:
        gram: float64 [n, 2, 2], G = X^T X per image.
        ridge: s_k = sqrt(lambda_k + ridge * trace / 2).

    Returns:
        directions float64 [n, 2, 2] with h_k = directions[:, k] . (a, b) (rows zero where s_k = 0), and the
        eigenvalues [n, 2] (decreasing, those below RANK_TOL * trace set to 0).
    """
    p, q, r = gram[:, 0, 0], gram[:, 0, 1], gram[:, 1, 1]
    trace = p + r
    half_gap = torch.hypot(0.5 * (p - r), q)
    eigenvalues = torch.stack([0.5 * trace + half_gap, 0.5 * trace - half_gap], dim=1)
    eigenvalues = torch.where(eigenvalues < RANK_TOL * trace[:, None], 0.0, eigenvalues)  # also clears rounding < 0
    # The leading eigenvector is at angle theta with tan(2 theta) = 2q / (p - r); atan2 picks the maximum, not the
    # minimum, of the Rayleigh quotient. Its sign is arbitrary, which |h_k| ignores.
    theta = 0.5 * torch.atan2(2.0 * q, p - r)
    cos, sin = torch.cos(theta), torch.sin(theta)
    eigenvectors = torch.stack([torch.stack([cos, sin], dim=1), torch.stack([-sin, cos], dim=1)], dim=1)
    singular_values = torch.sqrt(eigenvalues + ridge * 0.5 * trace[:, None])
    inverse = torch.where(singular_values > 0, 1.0 / singular_values, 0.0)  # a zero s_k gives h_k = 0
    return eigenvectors * inverse[:, :, None], eigenvalues


def _cluster_moments(total: Tensor, second: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sizes [n, 2], means [n, 2, 2] and unbiased variances [n, 2, 2] (cluster, feature) from moment matrices.

    `total` and `second` are float64 [n, 3, 3] sums of f f^T with f = (a, b, 1) over the usable pixels of the image
    and of its second cluster. The products of float32 features are exact in float64 and the sums are float64, so
    E[x^2] - E[x]^2 keeps ~1e-16 * mean^2 / var relative precision, far below the features' own float32 rounding.
    """
    moments = torch.stack([total - second, second], dim=1)
    count = moments[:, :, 2, 2]
    sums = moments[:, :, :2, 2]
    squares = torch.diagonal(moments[:, :, :2, :2], dim1=-2, dim2=-1)
    mean = sums / count.clamp(min=1.0)[..., None]
    var = (squares - sums * mean).clamp(min=0.0) / (count - 1.0).clamp(min=1.0)[..., None]
    var = torch.where(count[..., None] >= 2, var, 0.0)  # a 1-pixel cluster has variance 0
    return count, mean, var


@torch.no_grad()
def csl_select(
    probs: Tensor,
    valid: Tensor,
    *,
    alpha: float,
    lam: float,
    ridge: float,
    residual_rule: str,
    residual_variance: str,
) -> Selection:
    """Confidence Separable Learning selection (docs/method.md, Selection), batched over images.

    Three passes over tiles of pixels, one per step of the method: (1) the features and each image's Gram matrix,
    (2) the cluster of every pixel and the second cluster's moments, (3) the soft weights from the reliable
    cluster's statistics. Pixels with a non-finite probability (or a max of 0, whose log is -inf) count as invalid.
    Image i's result depends only on image i.

    Args:
        probs: teacher softmax [N, C, H, W], any float dtype, any device.
        valid: bool [N, H, W], False on padding / ignore.
        alpha: width of the soft weights outside the reliable region.
        lam: weight of the residual feature when ranking the two clusters (score = mean a + lam * mean b).
        ridge: solver regularisation, s_k = sqrt(lambda_k + ridge * trace(G) / 2); 0 = the paper.
        residual_rule: "csl" (z_b = (mu_b - b) / sd, as released) or "covar" (z_b = (b - mu_b) / sd).
        residual_variance: "released" (keeps the zeroed arg-max entry in the sum) or "population".

    Returns:
        The Selection, with per-image stats.
    """
    n, num_classes, height, width = check_inputs(probs, valid)
    if residual_rule not in ("csl", "covar"):
        raise ValueError(f"residual_rule must be csl or covar, got {residual_rule!r}")
    if residual_variance not in ("released", "population"):
        raise ValueError(f"residual_variance must be released or population, got {residual_variance!r}")
    if not alpha > 0 or not ridge >= 0:
        raise ValueError(f"need alpha > 0 and ridge >= 0, got alpha={alpha}, ridge={ridge}")
    pixels = height * width
    device = probs.device
    dtype = torch.float64 if probs.dtype == torch.float64 else torch.float32
    kappa = (num_classes - 2) / (num_classes - 1) ** 2 if residual_variance == "released" else 1.0 / (num_classes - 1)
    probs_flat, valid_flat = probs.reshape(n, num_classes, pixels), valid.reshape(n, pixels)
    tiling = Tiling(n, pixels, device)

    def buffer(*shape: int, dt: torch.dtype = dtype) -> Tensor:
        return torch.empty(*shape, dtype=dt, device=device)

    confidence, labels = buffer(n, pixels, dt=torch.float32), buffer(n, pixels, dt=torch.int64)
    # `weights` holds the usable mask (valid and finite, as 0/1), the first factor of every weight, until pass 3
    # multiplies the soft weight in.
    weights, reliable = buffer(n, pixels, dt=torch.float32), buffer(n, pixels, dt=torch.bool)
    features = buffer(n, 2 * pixels)
    moment_rows = buffer(n, 3, tiling.span, dt=torch.float64)

    # Pass 1, the features: (a, b) per pixel and the per-image moments sum f f^T, f = (a, b, 1), over usable pixels.
    total = torch.zeros(n, 3, 3, dtype=torch.float64, device=device)
    max_prob, argmax, is_new_max, loser = (buffer(n, tiling.span) for _ in range(4))
    residual_sums = buffer(2, n, tiling.span)
    upcast_tile = buffer(n, num_classes, tiling.span) if probs.dtype != dtype else None
    for start, stop in tiling.ranges:
        size = stop - start
        probs_tile = probs_flat[:, :, start:stop]
        if upcast_tile is not None:
            probs_tile = upcast_tile[:, :, :size].copy_(probs_tile)
        max_tile, sums_tile = max_prob[:, :size], residual_sums[:, :, :size]
        class_pass(probs_tile, max_tile, argmax[:, :size], is_new_max[:, :size], sums_tile, loser[:, :size])
        confidence[:, start:stop].copy_(max_tile)
        labels[:, start:stop].copy_(argmax[:, :size])
        usable = weights[:, start:stop].copy_(valid_flat[:, start:stop])
        a, b = tiling.features(features, start, stop).unbind(1)
        _features(max_tile, sums_tile, a, b, num_classes, kappa)
        _mask_unusable(a, b, usable)
        rows = _moment_rows(tiling.features(features, start, stop), usable, moment_rows[:, :, :size])
        total.baddbmm_(rows, rows.mT)
    del max_prob, argmax, is_new_max, loser, residual_sums, upcast_tile

    # The separation: the whitened directions from the 2x2 Gram matrix G = X^T X of each image.
    directions, eigenvalues = _whitened_directions(total[:, :2, :2], ridge)
    directions = directions.to(dtype)

    # Pass 2, the clusters: each pixel goes to argmax_k |h_k| (ties -> the leading one); sum f f^T over the second.
    second = torch.zeros(n, 3, 3, dtype=torch.float64, device=device)
    h, in_second = buffer(n, 2, tiling.span), buffer(n, tiling.span)
    second_rows = buffer(n, 3, tiling.span, dt=torch.float64)
    for start, stop in tiling.ranges:
        size = stop - start
        tile_features, usable = tiling.features(features, start, stop), weights[:, start:stop]
        h_abs = torch.bmm(directions, tile_features, out=h[:, :, :size]).abs_()
        in_second_tile = torch.gt(h_abs[:, 1], h_abs[:, 0], out=in_second[:, :size]).mul_(usable)
        rows = _moment_rows(tile_features, usable, moment_rows[:, :, :size])
        rows_second = _moment_rows(tile_features, in_second_tile, second_rows[:, :, :size])
        second.baddbmm_(rows_second, rows.mT)
    del h, in_second, second_rows, moment_rows

    # The reliable cluster R: the higher score mean a + lam * mean b; ties and an empty second cluster go to the
    # leading one.
    count, mean, var = _cluster_moments(total, second)
    score = mean[..., 0] + lam * mean[..., 1]
    pick_second = (count[:, 1] > 0) & ((count[:, 0] == 0) | (score[:, 1] > score[:, 0]))
    reliable_mean = torch.where(pick_second[:, None], mean[:, 1], mean[:, 0])
    reliable_var = torch.where(pick_second[:, None], var[:, 1], var[:, 0])
    inverse_sd = torch.rsqrt(reliable_var + EPS)
    if residual_rule == "csl":
        inverse_sd[:, 1].neg_()  # z_b = (mu_b - b) / sd = (b - mu_b) * (-1 / sd)
    mean_a, mean_b = (t.to(dtype)[:, None] for t in reliable_mean.unbind(1))
    scale_a, scale_b = (t.to(dtype)[:, None] for t in inverse_sd.unbind(1))

    # Pass 3, the weights: w = 1 if z_a > 0 or z_b > 0, else exp(-(z_a^2 + z_b^2) / alpha); times usable.
    z_a, z_b, beyond_mean = (buffer(n, tiling.span) for _ in range(3))
    for start, stop in tiling.ranges:
        size = stop - start
        a, b = tiling.features(features, start, stop).unbind(1)
        weights_tile = weights[:, start:stop]  # still the usable mask
        # Subtract, then scale: a pixel equal to the mean gets z = 0 exactly (a 1-pixel cluster gets w = 1).
        za = torch.sub(a, mean_a, out=z_a[:, :size]).mul_(scale_a)
        zb = torch.sub(b, mean_b, out=z_b[:, :size]).mul_(scale_b)
        beyond = torch.gt(torch.maximum(za, zb, out=beyond_mean[:, :size]), 0.0, out=beyond_mean[:, :size])
        soft = za.mul_(za).addcmul_(zb, zb).mul_(-1.0 / alpha).exp_()  # in z_a's buffer, which is not read again
        weights_tile.mul_(torch.maximum(soft, beyond, out=soft))
        torch.eq(weights_tile, 1.0, out=reliable[:, start:stop])

    stats = {
        "num_valid": count.sum(1).long(),
        "cluster_sizes": count.long(),
        "reliable_cluster": pick_second.long(),
        "reliable_mean": reliable_mean.float(),
        "reliable_var": reliable_var.float(),
        "eigenvalues": eigenvalues.float(),
    }
    shape = (n, height, width)
    return Selection(
        weights=weights.view(shape),
        labels=labels.view(shape),
        reliable=reliable.view(shape),
        confidence=confidence.view(shape),
        stats=stats,
    )


@torch.no_grad()
def threshold_select(probs: Tensor, valid: Tensor, *, threshold: float) -> Selection:
    """FixMatch / UniMatch baseline: w = 1[max prob >= threshold] on valid pixels with finite probabilities.

    Args:
        probs: teacher softmax [N, C, H, W], any float dtype, any device.
        valid: bool [N, H, W].
        threshold: confidence threshold tau.
    """
    check_inputs(probs, valid)
    confidence, labels, finite = max_argmax(probs)
    keep = (confidence >= threshold) & valid & finite
    return Selection(weights=keep.float(), labels=labels, reliable=keep, confidence=confidence)


@torch.no_grad()
def none_select(probs: Tensor, valid: Tensor) -> Selection:
    """No selection: w = 1 on every valid pixel with finite probabilities.

    Args:
        probs: teacher softmax [N, C, H, W], any float dtype, any device.
        valid: bool [N, H, W].
    """
    check_inputs(probs, valid)
    confidence, labels, finite = max_argmax(probs)
    keep = valid & finite
    return Selection(weights=keep.float(), labels=labels, reliable=keep, confidence=confidence)


def build_selector(cfg: SelectorConfig) -> Callable[[Tensor, Tensor], Selection]:
    """The selector named by `cfg.kind` with its settings bound: `select(probs, valid) -> Selection`."""
    if cfg.kind == "csl":
        return functools.partial(
            csl_select,
            alpha=cfg.alpha,
            lam=cfg.lam,
            ridge=cfg.ridge,
            residual_rule=cfg.residual_rule,
            residual_variance=cfg.residual_variance,
        )
    if cfg.kind == "threshold":
        return functools.partial(threshold_select, threshold=cfg.threshold)
    if cfg.kind == "none":
        return none_select
    raise ValueError(f"unknown selector kind {cfg.kind!r}; choose csl, threshold or none")
