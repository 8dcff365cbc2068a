"""Pseudo-label selection (CSL_SPEC sections 1-3): the CSL selector and the threshold / none baselines.

Every selector maps teacher probabilities [N, C, H, W] and a validity mask [N, H, W] to a `Selection`:

    sel = csl_select(probs, valid)               # weights, labels, reliable, confidence (+ per-image stats)
    select = build_selector(cfg.ssl.selector)    # the configured selector as a (probs, valid) -> Selection callable

`csl_select` is batched: each image's 2x2 spectral problem needs only masked sums over that image's pixels, so all
images are solved together in closed form, with no loop over images or pixels. On CPU the work runs over tiles of
pixels (every image at once) so that the per-pixel intermediates stay in cache, and each tile reduces the class
dimension in one pass: running max, its first index, and the sums of the other probabilities. Nothing of size
[N, C, H, W] is allocated (except a float32 copy of one tile for half-precision input).

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

EPS = 1e-10
"""The epsilon of CSL_SPEC (as released): in g = (C-1)^2 / (2(1 - m + eps)) and in z = d / sqrt(v + eps)."""
RANK_TOL = 1e-12
"""An eigenvalue of the 2x2 Gram matrix below RANK_TOL * trace counts as zero (CSL_SPEC section 2)."""
_CPU_TILE_PIXELS = 1 << 20
"""Pixels per CPU tile, summed over the batch (4 MiB per float32 work array, about 80 MiB of work arrays in all).
`benchmarks/selector.py` on a 2-core VM, csl median at 16x21x321^2 / 8x19x801^2: cache-sized 2^17-pixel tiles took
113 / 335 ms on 1 thread but 209 / 617 ms on 2, where each small op split across threads ran slower than on one;
2^20-pixel tiles take 154 / 392 ms on 1 thread and 113 / 292 ms on 2."""


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


def _check_inputs(probs: Tensor, valid: Tensor) -> tuple[int, int, int, int]:
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


def _tiles(n: int, pixels: int, device: torch.device) -> list[tuple[int, int]]:
    """Pixel ranges [start, stop) of the tiles; one tile off the CPU, where caches are not the bottleneck."""
    step = max(pixels, 1) if device.type != "cpu" else max(256, _CPU_TILE_PIXELS // max(n, 1))
    return [(start, min(start + step, pixels)) for start in range(0, max(pixels, 1), step)]


def _class_pass(x: Tensor, top: Tensor, arg: Tensor, beats: Tensor, rest: Tensor | None = None) -> None:
    """One pass over the classes of a tile: max, first arg-max and (optionally) sums over the other classes.

    Args:
        x: probabilities [n, C, l] in the compute dtype (a view is fine).
        top: out [n, l], the max over classes (non-finite if any class is NaN or the max is inf).
        arg: out [n, l], the first arg-max as a float (exact up to 2^24 classes).
        beats: scratch [n, l].
        rest: out [3, n, l] or None: rows 0 and 1 get the sum and the sum of squares of every class but the arg-max;
            row 2 is scratch.
    """
    marks = torch.arange(x.shape[1], dtype=arg.dtype, device=arg.device)
    top.copy_(x[:, 0])
    arg.zero_()
    if rest is not None:
        rest[:2].zero_()
    for c in range(1, x.shape[1]):
        xc = x[:, c]
        # Classes arrive in order, so a strictly larger value hands the arg-max to c (ties keep the first class).
        # lerp with a 0/1 weight is an exact select, and cheaper than torch.where / minimum / maximum here.
        torch.gt(xc, top, out=beats)
        torch.lerp(arg, marks[c], beats, out=arg)
        if rest is not None:
            # The loser of (x_c, running max) is never the arg-max entry: summing losers leaves exactly that one out.
            loser = torch.lerp(xc, top, beats, out=rest[2])
            rest[0].add_(loser)
            rest[1].addcmul_(loser, loser)
        torch.lerp(top, xc, beats, out=top)


def _features(top: Tensor, rest: Tensor, a: Tensor, b: Tensor, scratch: Tensor, num_classes: int, kappa: float) -> None:
    """Per-pixel features a = log m and b = -s (CSL_SPEC section 1) from the max and the residual sums.

    With r1, r2 the sum and sum of squares of the C-1 non-max probabilities and mu_r = r1 / (C-1):
    (C-1) sigma^2 = sum_{c != y}(p_c - mu_r)^2 [+ mu_r^2 as released] = r2 - kappa r1^2, with
    kappa = (C-2)/(C-1)^2 (released) or 1/(C-1) (population); s = g sigma^2 = (C-1)/2 * (C-1) sigma^2 / (1 - m + eps).
    """
    torch.log(top, out=a)
    # r1^2 is rounded on its own (no fused multiply-add) so that a single residual class (C = 2, population) gives
    # exactly r2 - r1^2 = 0, as in the reference; the clamp catches rounding below 0 for other uniform residuals.
    torch.mul(rest[0], rest[0], out=b)
    torch.add(rest[1], b, alpha=-kappa, out=b).clamp_(min=0.0)
    # 1 - m is exact for m >= 1/2; eps is added after the subtraction, as in the reference.
    torch.sub(torch.ones((), dtype=top.dtype, device=top.device), top, out=scratch).add_(EPS)
    b.div_(scratch).mul_(-0.5 * (num_classes - 1))


def _mask_unusable(a: Tensor, b: Tensor, usable: Tensor, scratch: Tensor) -> None:
    """Zeroes the features outside `usable` (float 0/1) and drops pixels with non-finite features from it."""
    torch.add(a, b, out=scratch)
    if bool(torch.isfinite(scratch.sum())):  # the common case: one cheap reduction instead of a per-pixel test
        a.mul_(usable)
        b.mul_(usable)
        return
    usable.mul_(torch.isfinite(scratch))
    a.nan_to_num_(0.0, 0.0, 0.0).mul_(usable)
    b.nan_to_num_(0.0, 0.0, 0.0).mul_(usable)


def _whitened_directions(gram: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """Closed-form 2x2 symmetric eigen-solve, batched: h_k = x . v_k / s_k (CSL_SPEC section 2).

    Args:
        gram: float64 [n, 2, 2], G = X^T X per image.
        ridge: s_k = sqrt(lambda_k + ridge * trace / 2).

    Returns:
        coef float64 [n, 2, 2] with h_k = coef[:, k] . (a, b) (rows zero where s_k = 0), and the eigenvalues [n, 2]
        (decreasing, those below RANK_TOL * trace set to 0).
    """
    p, q, r = gram[:, 0, 0], gram[:, 0, 1], gram[:, 1, 1]
    trace = p + r
    half_gap = torch.hypot(0.5 * (p - r), q)
    lam = torch.stack([0.5 * trace + half_gap, 0.5 * trace - half_gap], dim=1)
    lam = torch.where(lam < RANK_TOL * trace[:, None], 0.0, lam)  # also clears negative rounding of lambda_2
    # The leading eigenvector is at angle theta with tan(2 theta) = 2q / (p - r); atan2 picks the maximum, not the
    # minimum, of the Rayleigh quotient. Its sign is arbitrary, which |h_k| ignores.
    theta = 0.5 * torch.atan2(2.0 * q, p - r)
    cos, sin = torch.cos(theta), torch.sin(theta)
    vectors = torch.stack([torch.stack([cos, sin], dim=1), torch.stack([-sin, cos], dim=1)], dim=1)
    scale = torch.sqrt(lam + ridge * 0.5 * trace[:, None])
    inverse = torch.where(scale > 0, 1.0 / scale, 0.0)  # a zero s_k gives h_k = 0
    return vectors * inverse[:, :, None], lam


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
    alpha: float = 8.0,
    lam: float = 0.0,
    ridge: float = 0.0,
    residual_rule: str = "csl",
    residual_variance: str = "released",
) -> Selection:
    """Confidence Separable Learning selection (CSL_SPEC sections 1-3), batched over images.

    Pixels with a non-finite probability (or a max of 0, whose log is -inf) count as invalid. Image i's result
    depends only on image i.

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
    n, num_classes, height, width = _check_inputs(probs, valid)
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
    x = probs.reshape(n, num_classes, pixels)
    valid_flat = valid.reshape(n, pixels)
    tiles = _tiles(n, pixels, device)
    span = tiles[0][1] - tiles[0][0]

    def work(*shape: int, dt: torch.dtype = dtype) -> Tensor:
        return torch.empty(*shape, dtype=dt, device=device)

    confidence, labels = work(n, pixels, dt=torch.float32), work(n, pixels, dt=torch.int64)
    weights, reliable = work(n, pixels, dt=torch.float32), work(n, pixels, dt=torch.bool)
    # Fresh memory costs a page fault per 4 KiB, a large share of the time at these sizes, so the intermediates live
    # in the output buffers until pass 3 overwrites them tile by tile: `weights` holds "usable" (valid and finite, as
    # 0/1); for float32 work and C <= 256, `reliable` holds the labels as uint8 and the int64 `labels` hold the
    # features, each tile's a and b side by side in the bytes of that tile's labels.
    stash = dtype == torch.float32 and num_classes <= 256
    label_stash = reliable.view(torch.uint8) if stash else labels
    feats = labels.view(torch.float32) if stash else work(n, 2 * pixels)

    def feature_tile(start: int, stop: int) -> Tensor:
        """[n, 2, size] view of a tile's features (rows a, b; 0 where not usable)."""
        return feats[:, 2 * start : 2 * stop].unflatten(1, (2, stop - start))

    top, arg, scratch, rest = work(n, span), work(n, span), work(n, span), work(3, n, span)
    wide, wide_masked = work(n, 3, span, dt=torch.float64), work(n, 3, span, dt=torch.float64)
    tile_copy = work(n, num_classes, span) if probs.dtype != dtype else None

    # Pass 1: features, and the per-image moments sum f f^T with f = (a, b, 1) over usable pixels (float64).
    total = torch.zeros(n, 3, 3, dtype=torch.float64, device=device)
    for start, stop in tiles:
        size = stop - start
        xt = x[:, :, start:stop]
        if tile_copy is not None:
            xt = tile_copy[:, :, :size].copy_(xt)
        tt, st, rt = top[:, :size], scratch[:, :size], rest[:, :, :size]
        _class_pass(xt, tt, arg[:, :size], st, rt)
        confidence[:, start:stop].copy_(tt)
        label_stash[:, start:stop].copy_(arg[:, :size])
        ft, ut = feature_tile(start, stop), weights[:, start:stop].copy_(valid_flat[:, start:stop])
        _features(tt, rt, ft[:, 0], ft[:, 1], st, num_classes, kappa)
        _mask_unusable(ft[:, 0], ft[:, 1], ut, st)
        fw = wide[:, :, :size]
        fw[:, :2].copy_(ft)
        fw[:, 2].copy_(ut)
        total.baddbmm_(fw, fw.mT)

    coef, eigenvalues = _whitened_directions(total[:, :2, :2], ridge)
    coef = coef.to(dtype)

    # Pass 2: cluster assignment argmax_k |h_k| (ties -> leading) and the moments of the second cluster.
    second = torch.zeros(n, 3, 3, dtype=torch.float64, device=device)
    h = work(n, 2, span)
    for start, stop in tiles:
        size = stop - start
        ft, ut = feature_tile(start, stop), weights[:, start:stop]
        ht = torch.bmm(coef, ft, out=h[:, :, :size]).abs_()
        in_second = torch.gt(ht[:, 1], ht[:, 0], out=scratch[:, :size]).mul_(ut)
        fw, fm = wide[:, :, :size], wide_masked[:, :, :size]
        fw[:, :2].copy_(ft)
        fw[:, 2].copy_(ut)
        fm[:, 2].copy_(in_second)
        torch.mul(fw[:, :2], fm[:, 2:], out=fm[:, :2])
        second.baddbmm_(fm, fw.mT)

    count, mean, var = _cluster_moments(total, second)
    score = mean[..., 0] + lam * mean[..., 1]
    # The reliable cluster R: the higher score; ties and an empty second cluster go to the leading one.
    pick_second = (count[:, 1] > 0) & ((count[:, 0] == 0) | (score[:, 1] > score[:, 0]))
    r_mean = torch.where(pick_second[:, None], mean[:, 1], mean[:, 0])
    r_var = torch.where(pick_second[:, None], var[:, 1], var[:, 0])
    inv_sd = torch.rsqrt(r_var + EPS)
    if residual_rule == "csl":
        inv_sd[:, 1].neg_()  # z_b = (mu_b - b) / sd = (b - mu_b) * (-1 / sd)
    mean_a, mean_b = (t.to(dtype)[:, None] for t in r_mean.unbind(1))
    scale_a, scale_b = (t.to(dtype)[:, None] for t in inv_sd.unbind(1))

    # Pass 3: w = 1 if z_a > 0 or z_b > 0, else exp(-(z_a^2 + z_b^2) / alpha); times usable.
    za_buf = work(n, span)
    for start, stop in tiles:
        size = stop - start
        ft, ut = feature_tile(start, stop), weights[:, start:stop]
        # Subtract, then scale: a pixel equal to the mean gets z = 0 exactly (a 1-pixel cluster gets w = 1).
        za = torch.sub(ft[:, 0], mean_a, out=za_buf[:, :size]).mul_(scale_a)
        zb = torch.sub(ft[:, 1], mean_b, out=scratch[:, :size]).mul_(scale_b)
        above = torch.maximum(za, zb, out=top[:, :size])
        torch.gt(above, 0.0, out=above)
        za.mul_(za).addcmul_(zb, zb).mul_(-1.0 / alpha).exp_()
        ut.mul_(torch.maximum(za, above, out=za))
        if stash:  # this order: the tile's features, then its stashed labels, are consumed before being overwritten
            labels[:, start:stop].copy_(label_stash[:, start:stop])
        torch.eq(ut, 1.0, out=reliable[:, start:stop])

    stats = {
        "num_valid": count.sum(1).long(),
        "cluster_sizes": count.long(),
        "reliable_cluster": pick_second.long(),
        "reliable_mean": r_mean.float(),
        "reliable_var": r_var.float(),
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


def _max_argmax(probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Max probability float32 [N, H, W], first arg-max int64 [N, H, W], and whether every class is finite."""
    n, num_classes, height, width = probs.shape
    pixels = height * width
    device = probs.device
    dtype = torch.float64 if probs.dtype == torch.float64 else torch.float32
    x = probs.reshape(n, num_classes, pixels)
    tiles = _tiles(n, pixels, device)
    span = tiles[0][1] - tiles[0][0]
    confidence = torch.empty(n, pixels, dtype=torch.float32, device=device)
    labels = torch.empty(n, pixels, dtype=torch.int64, device=device)
    finite = torch.empty(n, pixels, dtype=torch.bool, device=device)
    top, arg, beats, class_sum = (torch.empty(n, span, dtype=dtype, device=device) for _ in range(4))
    tile_copy = torch.empty(n, num_classes, span, dtype=dtype, device=device) if probs.dtype != dtype else None
    for start, stop in tiles:
        size = stop - start
        xt = x[:, :, start:stop]
        if tile_copy is not None:
            xt = tile_copy[:, :, :size].copy_(xt)
        _class_pass(xt, top[:, :size], arg[:, :size], beats[:, :size])
        confidence[:, start:stop].copy_(top[:, :size])
        labels[:, start:stop].copy_(arg[:, :size])
        # The max misses a -inf in another class; the class sum is non-finite if any class is.
        finite[:, start:stop] = torch.isfinite(torch.sum(xt, dim=1, out=class_sum[:, :size]))
    shape = (n, height, width)
    return confidence.view(shape), labels.view(shape), finite.view(shape)


@torch.no_grad()
def threshold_select(probs: Tensor, valid: Tensor, *, threshold: float = 0.95) -> Selection:
    """FixMatch / UniMatch baseline: w = 1[max prob >= threshold] on valid pixels with finite probabilities.

    Args:
        probs: teacher softmax [N, C, H, W], any float dtype, any device.
        valid: bool [N, H, W].
        threshold: confidence threshold tau.
    """
    _check_inputs(probs, valid)
    confidence, labels, finite = _max_argmax(probs)
    keep = (confidence >= threshold) & valid & finite
    return Selection(weights=keep.float(), labels=labels, reliable=keep, confidence=confidence)


@torch.no_grad()
def none_select(probs: Tensor, valid: Tensor) -> Selection:
    """No selection: w = 1 on every valid pixel with finite probabilities.

    Args:
        probs: teacher softmax [N, C, H, W], any float dtype, any device.
        valid: bool [N, H, W].
    """
    _check_inputs(probs, valid)
    confidence, labels, finite = _max_argmax(probs)
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
