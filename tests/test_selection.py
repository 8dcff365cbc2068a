"""Selectors (docs/method.md, Selection) against an independent per-image float64 reference written from the spec.

Tolerances. Weights are float32, so float64 input is held to 1e-6 and exact cluster sizes. With float32 input the
per-pixel features carry ~1e-7 relative rounding, and the method has two discontinuities that such rounding can cross:
a pixel whose |h_1| and |h_2| agree to within it can switch clusters (shifting its image's statistics), and a pixel
with z_a or z_b at 0 jumps between w = 1 and w = exp(-z^2 / alpha) of the other z. Both are rare on random maps (the
benchmark's 5M-pixel batch has one such pixel). So an image in float32 is held to exact sizes and 2e-5 on the weights
only when the reference puts no pixel within 1e-4 (relative) of the cluster boundary, with pixels within 1e-4 of
z = 0 left out of the weight check; otherwise its cluster sizes may differ by at most its number of boundary pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csl_ray.config import SelectorConfig
from csl_ray.selection import EPS, Selection, build_selector, csl_select, none_select, threshold_select

BOUNDARY = 1e-4
RELEASED = {k: getattr(SelectorConfig(), k) for k in ("alpha", "lam", "ridge", "residual_rule", "residual_variance")}


def select(probs: torch.Tensor, valid: torch.Tensor, **changes) -> Selection:
    """csl_select with the config's defaults (the released selector), changed by `changes`."""
    return csl_select(probs, valid, **{**RELEASED, **changes})


def reference(
    probs: np.ndarray,
    valid: np.ndarray,
    *,
    alpha: float = 8.0,
    lam: float = 0.0,
    ridge: float = 0.0,
    residual_rule: str = "csl",
    residual_variance: str = "released",
) -> dict[str, np.ndarray]:
    """docs/method.md, Selection, literally, one image at a time, in float64 with a full SVD per image."""
    n, c, h, w = probs.shape
    weights = np.zeros((n, h * w))
    z_near_zero = np.zeros((n, h * w), dtype=bool)
    sizes = np.zeros((n, 2), dtype=np.int64)
    boundary = np.zeros(n, dtype=np.int64)
    for i in range(n):
        p = probs[i].reshape(c, h * w).T.astype(np.float64)
        usable = valid[i].reshape(-1) & np.isfinite(p).all(axis=1)
        p = np.where(np.isfinite(p), p, 0.5)  # placeholder values for pixels that are dropped anyway
        rows = np.arange(len(p))
        top, arg = p.max(axis=1), p.argmax(axis=1)
        zeroed = p.copy()
        zeroed[rows, arg] = 0.0  # as released: zero the arg-max entry ...
        mu_r = zeroed.sum(axis=1) / (c - 1)
        if residual_variance == "released":  # ... but keep it in the sum
            sigma2 = ((zeroed - mu_r[:, None]) ** 2).sum(axis=1) / (c - 1)
        else:
            others = p[np.arange(c)[None, :] != arg[:, None]].reshape(len(p), c - 1)
            sigma2 = ((others - mu_r[:, None]) ** 2).sum(axis=1) / (c - 1)
        g = (c - 1) ** 2 / (2 * (1 - top + EPS))
        a, b = np.log(top), -g * sigma2
        x = np.stack([a, b], axis=1)[usable]
        if len(x) == 0:
            continue
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        if len(s) == 1:  # a single pixel: complete the basis
            vt = np.stack([vt[0], [-vt[0, 1], vt[0, 0]]])
            s = np.array([s[0], 0.0])
        trace = (x**2).sum()
        lam_k = np.where(s**2 < 1e-12 * trace, 0.0, s**2)
        s_k = np.sqrt(lam_k + ridge * trace / 2)
        hk = np.where(s_k > 0, (x @ vt.T) / np.where(s_k > 0, s_k, 1.0), 0.0)
        assign = np.abs(hk).argmax(axis=1)
        gap = np.abs(np.abs(hk[:, 0]) - np.abs(hk[:, 1]))
        boundary[i] = (gap <= BOUNDARY * max(np.abs(hk).max(), 1e-300)).sum()
        means, variances = [], []
        for k in range(2):
            members = x[assign == k]
            sizes[i, k] = len(members)
            means.append(members.mean(axis=0) if len(members) else np.zeros(2))
            variances.append(members.var(axis=0, ddof=1) if len(members) > 1 else np.zeros(2))
        scores = [means[k][0] + lam * means[k][1] if sizes[i, k] else -np.inf for k in range(2)]
        best = 1 if scores[1] > scores[0] else 0
        (mu_a, mu_b), (v_a, v_b) = means[best], variances[best]
        z_a = (a - mu_a) / np.sqrt(v_a + EPS)
        z_b = (mu_b - b) / np.sqrt(v_b + EPS) if residual_rule == "csl" else (b - mu_b) / np.sqrt(v_b + EPS)
        wi = np.where((z_a > 0) | (z_b > 0), 1.0, np.exp(-(z_a**2) / alpha) * np.exp(-(z_b**2) / alpha))
        weights[i] = np.where(usable, wi, 0.0)
        z_near_zero[i] = usable & ((np.abs(z_a) < BOUNDARY) | (np.abs(z_b) < BOUNDARY))
    return {
        "weights": weights.reshape(n, h, w),
        "sizes": sizes,
        "boundary": boundary,
        "z_near_zero": z_near_zero.reshape(n, h, w),
    }


def random_probs(n: int, c: int, h: int, w: int, *, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Softmax maps with per-pixel temperatures, so confidences range from near-uniform to near one-hot."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    temperature = torch.empty(n, 1, h, w, dtype=torch.float64).uniform_(0.3, 8.0, generator=gen)
    return (logits * temperature).softmax(dim=1).to(dtype)


def random_valid(n: int, h: int, w: int, *, seed: int, frac: float = 0.85) -> torch.Tensor:
    return torch.rand(n, h, w, generator=torch.Generator().manual_seed(seed + 1)) < frac


def assert_matches_reference(sel: Selection, probs: torch.Tensor, valid: torch.Tensor, **options) -> None:
    ref = reference(probs.double().numpy(), valid.numpy(), **options)
    exact = probs.dtype == torch.float64
    weights = sel.weights.numpy()
    for i in range(len(weights)):
        sizes = sel.stats["cluster_sizes"][i].numpy()
        if exact or ref["boundary"][i] == 0:
            np.testing.assert_array_equal(sizes, ref["sizes"][i])
            checked = np.ones_like(weights[i], dtype=bool) if exact else ~ref["z_near_zero"][i]
            np.testing.assert_allclose(
                weights[i][checked], ref["weights"][i][checked], rtol=0, atol=1e-6 if exact else 2e-5
            )
        else:
            assert np.abs(sizes - ref["sizes"][i]).max() <= ref["boundary"][i]
    finite = torch.isfinite(probs).all(dim=1)
    torch.testing.assert_close(sel.labels[finite], probs.argmax(dim=1)[finite], rtol=0, atol=0)
    torch.testing.assert_close(sel.confidence[finite], probs.amax(dim=1)[finite].float(), rtol=0, atol=0)
    assert torch.equal(sel.reliable, sel.weights == 1.0)


def check_contract(sel: Selection, shape: tuple[int, int, int]) -> None:
    assert sel.weights.dtype == torch.float32 and sel.weights.shape == shape
    assert sel.labels.dtype == torch.int64 and sel.labels.shape == shape
    assert sel.reliable.dtype == torch.bool and sel.reliable.shape == shape
    assert sel.confidence.dtype == torch.float32 and sel.confidence.shape == shape
    assert torch.isfinite(sel.weights).all() and (sel.weights >= 0).all() and (sel.weights <= 1).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,c,h,w", [(1, 2, 9, 7), (3, 3, 12, 10), (3, 19, 16, 16), (1, 21, 20, 13)])
@pytest.mark.parametrize("residual_variance", ["released", "population"])
@pytest.mark.parametrize("residual_rule", ["csl", "covar"])
def test_matches_reference(n, c, h, w, dtype, residual_variance, residual_rule):
    probs, valid = random_probs(n, c, h, w, seed=c * 100 + h, dtype=dtype), random_valid(n, h, w, seed=c)
    options = {"residual_variance": residual_variance, "residual_rule": residual_rule}
    sel = select(probs, valid, **options)
    check_contract(sel, (n, h, w))
    assert_matches_reference(sel, probs, valid, **options)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("options", [{"lam": 0.7}, {"lam": -2.0}, {"ridge": 0.05}, {"ridge": 10.0, "alpha": 2.0}])
def test_lam_ridge_alpha_match_reference(dtype, options):
    probs, valid = random_probs(3, 7, 15, 11, seed=5, dtype=dtype), random_valid(3, 15, 11, seed=5)
    assert_matches_reference(select(probs, valid, **options), probs, valid, **options)


def test_more_than_256_classes():
    probs, valid = random_probs(2, 300, 6, 7, seed=13), random_valid(2, 6, 7, seed=13)
    assert_matches_reference(select(probs, valid), probs, valid)


def test_large_image_spans_several_tiles():
    # 2 x 300 x 300 pixels: more than one CPU tile, so per-image sums are accumulated across tiles.
    probs, valid = random_probs(2, 5, 300, 300, seed=3, dtype=torch.float64), random_valid(2, 300, 300, seed=3)
    assert_matches_reference(select(probs, valid), probs, valid)


def test_all_invalid_image_gets_zero_weights_and_leaves_others_alone():
    probs = random_probs(2, 4, 10, 10, seed=1, dtype=torch.float64)
    valid = torch.ones(2, 10, 10, dtype=torch.bool)
    valid[1] = False
    sel = select(probs, valid)
    check_contract(sel, (2, 10, 10))
    assert (sel.weights[1] == 0).all() and not sel.reliable[1].any()
    assert sel.stats["num_valid"].tolist() == [100, 0]
    torch.testing.assert_close(sel.weights[0], select(probs[:1], valid[:1]).weights[0], rtol=0, atol=1e-7)
    assert_matches_reference(sel, probs, valid)


def test_single_valid_pixel_is_reliable():
    probs = random_probs(1, 5, 6, 6, seed=2)
    valid = torch.zeros(1, 6, 6, dtype=torch.bool)
    valid[0, 2, 3] = True
    sel = select(probs, valid)
    assert sel.weights[0, 2, 3] == 1.0 and sel.weights.sum() == 1.0
    assert sel.stats["cluster_sizes"].tolist() == [[1, 0]]
    assert_matches_reference(sel, probs, valid)


@pytest.mark.parametrize("residual_variance", ["released", "population"])
def test_one_hot_probabilities(residual_variance):
    labels = torch.randint(0, 6, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    probs = torch.nn.functional.one_hot(labels, 6).permute(0, 3, 1, 2).float()
    valid = random_valid(2, 8, 8, seed=0)
    sel = select(probs, valid, residual_variance=residual_variance)
    assert torch.equal(sel.labels, labels) and (sel.confidence == 1).all()
    assert torch.equal(sel.weights, valid.float())  # m = 1, sigma^2 = 0: every feature is (0, 0)
    assert_matches_reference(sel, probs, valid, residual_variance=residual_variance)


@pytest.mark.parametrize("c", [2, 21])
@pytest.mark.parametrize("residual_variance", ["released", "population"])
def test_uniform_probabilities(c, residual_variance):
    probs = torch.full((2, c, 7, 9), 1.0 / c)
    valid = random_valid(2, 7, 9, seed=4)
    sel = select(probs, valid, residual_variance=residual_variance)
    assert (sel.labels == 0).all()  # ties go to the first class
    assert torch.equal(sel.weights, valid.float())  # identical pixels: one cluster, zero variance, z = 0, w = 1
    assert_matches_reference(sel, probs, valid, residual_variance=residual_variance)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_identical_pixels_are_rank_one_and_stay_in_the_leading_cluster(dtype):
    pixel = torch.tensor([0.1, 0.6, 0.05, 0.25], dtype=dtype)
    probs = pixel.view(1, 4, 1, 1).expand(3, 4, 5, 6).contiguous()
    valid = random_valid(3, 5, 6, seed=6)
    sel = select(probs, valid)
    assert torch.equal(sel.weights, valid.float())
    assert sel.stats["cluster_sizes"][:, 1].eq(0).all()
    assert sel.stats["eigenvalues"][:, 1].eq(0).all()
    assert_matches_reference(sel, probs, valid)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pixels_are_dropped_without_affecting_others(bad):
    probs = random_probs(2, 5, 9, 9, seed=7, dtype=torch.float64)
    valid = random_valid(2, 9, 9, seed=7)
    spoiled = probs.clone()
    spoiled[0, 3, 1, 2] = bad  # one class of one pixel
    spoiled[1, :, 4, 4] = bad  # every class
    spoiled[1, 0, 0, 0] = bad
    sel = select(spoiled, valid)
    finite = torch.isfinite(spoiled).all(dim=1)
    assert (sel.weights[~finite] == 0).all() and torch.isfinite(sel.weights).all()
    expected = select(probs, valid & finite)
    torch.testing.assert_close(sel.weights, expected.weights, rtol=0, atol=1e-7)
    assert_matches_reference(sel, spoiled, valid)


def test_half_precision_input_is_upcast_per_tile():
    probs, valid = random_probs(2, 19, 24, 24, seed=8), random_valid(2, 24, 24, seed=8)
    for dtype in (torch.bfloat16, torch.float16):
        low = probs.to(dtype)
        sel = select(low, valid)
        check_contract(sel, (2, 24, 24))
        # The tile is upcast before any arithmetic: identical to float32 input holding the same values.
        assert torch.equal(sel.weights, select(low.float(), valid).weights)


def test_half_precision_input_tracks_float32_on_moderate_confidences():
    # Only away from m = 1: there bf16 (fp16) rounds m > 1 - 2^-9 (1 - 2^-12) to exactly 1 while the other classes
    # stay non-zero, and g = (C-1)^2 / (2(1 - m + eps)) jumps to ~1e12; callers should pass float32 probabilities.
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 19, 24, 24, generator=gen) * torch.empty(2, 1, 24, 24).uniform_(0.3, 1.5, generator=gen)
    probs, valid = logits.softmax(dim=1), random_valid(2, 24, 24, seed=8)
    assert probs.amax() < 0.9
    full = select(probs, valid)
    half = select(probs.half(), valid)  # 11-bit mantissa: features within ~1e-3
    assert torch.equal(half.stats["cluster_sizes"], full.stats["cluster_sizes"])
    torch.testing.assert_close(half.weights, full.weights, rtol=0, atol=2e-3)
    brain = select(probs.bfloat16(), valid)  # 8-bit mantissa: a few boundary pixels move, weights shift a little
    assert (brain.stats["cluster_sizes"] - full.stats["cluster_sizes"]).abs().max() <= 3
    assert (brain.weights - full.weights).abs().mean() < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    probs, valid = random_probs(3, 21, 33, 35, seed=9).to(dtype), random_valid(3, 33, 35, seed=9)
    cpu = select(probs, valid)
    gpu = select(probs.cuda(), valid.cuda())
    assert gpu.weights.device.type == "cuda"
    torch.testing.assert_close(gpu.labels.cpu(), cpu.labels, rtol=0, atol=0)
    assert torch.equal(gpu.stats["cluster_sizes"].cpu(), cpu.stats["cluster_sizes"])
    torch.testing.assert_close(gpu.weights.cpu(), cpu.weights, rtol=0, atol=1e-4)


# Property tests run in float64, where rounding cannot move a pixel across the cluster boundary unless it lies
# within ~1e-15 of it, and use fixed example sequences so that the suite is reproducible.
PROPERTY = settings(max_examples=15, deadline=None, derandomize=True)


@st.composite
def batches(draw) -> tuple[torch.Tensor, torch.Tensor]:
    n, c = draw(st.integers(1, 3)), draw(st.integers(2, 6))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    probs = random_probs(n, c, h, w, seed=seed, dtype=torch.float64)
    return probs, random_valid(n, h, w, seed=seed, frac=draw(st.sampled_from([0.3, 0.9, 1.0])))


@PROPERTY
@given(batches(), st.sampled_from(["csl", "covar"]), st.sampled_from(["released", "population"]))
def test_weights_are_in_range_and_zero_off_valid(batch, rule, variance):
    probs, valid = batch
    sel = select(probs, valid, residual_rule=rule, residual_variance=variance)
    check_contract(sel, tuple(valid.shape))
    assert (sel.weights[~valid] == 0).all()
    assert torch.equal(sel.reliable, sel.weights == 1.0)


@PROPERTY
@given(batches(), st.randoms(use_true_random=False))
def test_permuting_the_batch_permutes_the_output(batch, rng):
    probs, valid = batch
    order = torch.tensor(rng.sample(range(len(probs)), len(probs)))
    base, permuted = select(probs, valid), select(probs[order], valid[order])
    torch.testing.assert_close(permuted.weights, base.weights[order], rtol=0, atol=1e-7)
    assert torch.equal(permuted.labels, base.labels[order])


@PROPERTY
@given(batches(), st.randoms(use_true_random=False))
def test_permuting_classes_leaves_weights_unchanged(batch, rng):
    probs, valid = batch
    order = torch.tensor(rng.sample(range(probs.shape[1]), probs.shape[1]))
    base, permuted = select(probs, valid), select(probs[:, order], valid)
    torch.testing.assert_close(permuted.weights, base.weights, rtol=0, atol=1e-7)
    assert torch.equal(order[permuted.labels], base.labels)


@PROPERTY
@given(batches())
def test_each_image_is_independent_of_the_others(batch):
    probs, valid = batch
    together = select(probs, valid)
    for i in range(len(probs)):
        alone = select(probs[i : i + 1], valid[i : i + 1])
        torch.testing.assert_close(alone.weights[0], together.weights[i], rtol=0, atol=1e-7)
        assert torch.equal(alone.stats["cluster_sizes"][0], together.stats["cluster_sizes"][i])


def test_threshold_baseline():
    probs, valid = random_probs(2, 5, 10, 10, seed=10), random_valid(2, 10, 10, seed=10)
    probs[0, 2, 0, 0] = float("nan")
    probs[1, :, 0, 0] = torch.tensor([float("inf"), 0, 0, 0, 0])
    probs[1, 1, 0, 1] = -float("inf")
    sel = threshold_select(probs, valid, threshold=0.6)
    check_contract(sel, (2, 10, 10))
    finite = torch.isfinite(probs).all(dim=1)
    expected = (probs.amax(dim=1) >= 0.6) & valid & finite
    assert torch.equal(sel.weights, expected.float()) and torch.equal(sel.reliable, expected)
    torch.testing.assert_close(sel.labels[finite], probs.argmax(dim=1)[finite], rtol=0, atol=0)
    assert 0 < expected.sum() < valid.sum()


def test_none_baseline():
    probs, valid = random_probs(2, 5, 10, 10, seed=11), random_valid(2, 10, 10, seed=11)
    probs[0, :, 3, 3] = float("nan")
    sel = none_select(probs, valid)
    check_contract(sel, (2, 10, 10))
    expected = valid & torch.isfinite(probs).all(dim=1)
    assert torch.equal(sel.weights, expected.float()) and torch.equal(sel.reliable, expected)


def test_build_selector_dispatches_from_config():
    probs, valid = random_probs(2, 6, 12, 12, seed=12), random_valid(2, 12, 12, seed=12)
    options = {"alpha": 2.0, "lam": 0.5, "ridge": 0.1, "residual_rule": "covar", "residual_variance": "population"}
    expected = select(probs, valid, **options)
    assert torch.equal(build_selector(SelectorConfig(kind="csl", **options))(probs, valid).weights, expected.weights)
    assert not torch.equal(expected.weights, select(probs, valid).weights)
    threshold = build_selector(SelectorConfig(kind="threshold", threshold=0.5))(probs, valid)
    assert torch.equal(threshold.weights, threshold_select(probs, valid, threshold=0.5).weights)
    assert torch.equal(build_selector(SelectorConfig(kind="none"))(probs, valid).weights, valid.float())
    with pytest.raises(ValueError, match="unknown selector kind"):
        build_selector(SelectorConfig(kind="topk"))


@pytest.mark.parametrize(
    "probs,valid,options,match",
    [
        (torch.rand(2, 3, 4), torch.ones(2, 3, 4, dtype=torch.bool), {}, "N, C, H, W"),
        (torch.rand(2, 3, 4, 4), torch.ones(2, 4, 4), {}, "bool"),
        (torch.rand(2, 3, 4, 4), torch.ones(2, 4, 5, dtype=torch.bool), {}, "bool"),
        (torch.rand(2, 1, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool), {}, "at least 2 classes"),
        (torch.rand(2, 3, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool), {"residual_rule": "x"}, "residual_rule"),
        (torch.rand(2, 3, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool), {"residual_variance": "x"}, "residual_var"),
        (torch.rand(2, 3, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool), {"alpha": 0.0}, "alpha"),
        (torch.rand(2, 3, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool), {"ridge": -1.0}, "ridge"),
    ],
)
def test_bad_arguments_are_rejected(probs, valid, options, match):
    with pytest.raises(ValueError, match=match):
        select(probs, valid, **options)


def test_csl_trusts_a_large_share_of_even_a_near_uniform_teacher():
    """CSL's split is relative to each image (README, "Quality on the built-in data"): with every max-probability
    below 0.3 it still marks a large share of each image reliable, where the fixed threshold marks none."""
    g = torch.Generator().manual_seed(0)
    probs = (0.1 * torch.randn(4, 6, 32, 32, generator=g)).softmax(1)
    valid = torch.ones(4, 32, 32, dtype=torch.bool)
    assert probs.amax(1).max() < 0.3
    share = select(probs, valid).reliable.float().mean(dim=(1, 2))
    assert (share > 0.25).all(), share
    assert not threshold_select(probs, valid, threshold=0.95).reliable.any()
