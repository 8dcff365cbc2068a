"""Weighted CE (valid-pixel normalisation), OHEM, and the labelled-loss builder on hand-built tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from csl_ray.config import OptimConfig
from csl_ray.losses import build_labeled_loss, ohem_ce, weighted_ce


def test_weighted_ce_divides_by_valid_pixels_not_selected_ones():
    logits = torch.zeros(1, 2, 1, 4)  # CE = log 2 at every pixel
    target = torch.tensor([[[0, 1, 0, 255]]])  # 255 on the invalid pixel must not crash
    weights = torch.tensor([[[1.0, 0.0, 0.5, 1.0]]])
    valid = torch.tensor([[[True, True, True, False]]])
    loss = weighted_ce(logits, target, weights, valid)
    # 3 valid pixels, 2 with a non-zero weight: the denominator is 3
    assert loss.item() == pytest.approx((1.0 + 0.5) * math.log(2) / 3)


def test_weighted_ce_zero_weight_contributes_nothing():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(3, (2, 4, 4))
    weights = torch.rand(2, 4, 4)
    weights[0, 1, 2] = 0.0
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    loss = weighted_ce(logits, target, weights, valid)
    loss.backward()
    assert torch.equal(logits.grad[0, :, 1, 2], torch.zeros(3))
    changed = logits.detach().clone()
    changed[0, :, 1, 2] = torch.tensor([100.0, -100.0, 50.0])
    torch.testing.assert_close(weighted_ce(changed, target, weights, valid), loss.detach())
    ce = F.cross_entropy(logits.detach(), target, reduction="none")
    torch.testing.assert_close(loss.detach(), (weights * ce).sum() / valid.sum())


def test_weighted_ce_without_valid_pixels_is_zero():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.full((1, 2, 2), 255)
    loss = weighted_ce(logits, target, torch.ones(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def make_logits(true_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-class logits [1, 2, 1, P] whose class-0 probability is `true_probs`, with target 0 everywhere."""
    p = true_probs.double()
    logits = torch.stack([p.log(), (1 - p).log()]).view(1, 2, 1, -1).float()
    return logits, torch.zeros(1, 1, p.numel(), dtype=torch.long)


def test_ohem_keeps_hard_pixels_below_threshold():
    probs = torch.tensor([0.1, 0.2, 0.5, 0.8, 0.9, 0.95])
    logits, target = make_logits(probs)
    loss = ohem_ce(logits, target, ignore_index=255, thresh=0.7, min_kept=2)
    assert loss.item() == pytest.approx(-probs[:3].log().mean().item(), rel=1e-5)


def test_ohem_keeps_at_least_min_kept_hardest():
    probs = torch.tensor([0.99, 0.8, 0.95, 0.9, 0.85, 0.97])  # all easy (above thresh)
    logits, target = make_logits(probs)
    loss = ohem_ce(logits, target, ignore_index=255, thresh=0.7, min_kept=3)
    hardest = probs.sort().values[:3]  # 0.8, 0.85, 0.9
    assert loss.item() == pytest.approx(-hardest.log().mean().item(), rel=1e-5)


def test_ohem_ignores_pixels_and_keeps_all_when_few_are_valid():
    probs = torch.tensor([0.01, 0.8, 0.95, 0.9])
    logits, target = make_logits(probs)
    target[0, 0, 0] = 255  # the hardest pixel is ignored
    loss = ohem_ce(
        logits, target, ignore_index=255, thresh=0.7, min_kept=10
    )  # more than the 3 valid pixels: keep them all
    assert loss.item() == pytest.approx(-probs[1:].log().mean().item(), rel=1e-5)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, ignore_index=255))
    none_valid = ohem_ce(logits, torch.full_like(target, 255), ignore_index=255, thresh=0.7, min_kept=2)
    assert none_valid.item() == 0.0


def test_build_labeled_loss():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 5, 5), torch.randint(3, (2, 5, 5))
    target[0, 0] = 9
    ce = build_labeled_loss(OptimConfig(labeled_loss="ce"), ignore_index=9)
    torch.testing.assert_close(ce(logits, target), F.cross_entropy(logits, target, ignore_index=9))
    ohem = build_labeled_loss(OptimConfig(labeled_loss="ohem", ohem_thresh=0.5, ohem_min_kept=4), ignore_index=9)
    torch.testing.assert_close(ohem(logits, target), ohem_ce(logits, target, ignore_index=9, thresh=0.5, min_kept=4))
