"""Poly learning rate and the SGD parameter groups."""

import pytest
import torch

from csl_ray.config import load_config
from csl_ray.model import DeepLabV3Plus
from csl_ray.optim import build_optimizer, poly_lr, set_lr


def test_poly_lr_endpoints_and_monotonicity():
    assert poly_lr(0, 100, 0.01, 0.9) == 0.01
    assert poly_lr(100, 100, 0.01, 0.9) == 0.0
    assert poly_lr(150, 100, 0.01, 0.9) == 0.0  # past the end: clamped, not complex
    assert poly_lr(50, 100, 0.01, power=1.0) == pytest.approx(0.005)
    assert poly_lr(50, 100, 0.01, power=0.9) == pytest.approx(0.01 * 0.5**0.9)
    values = [poly_lr(s, 1000, 1.0, 0.9) for s in range(1001)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


def test_build_optimizer_groups_and_set_lr():
    cfg = load_config(preset="tiny", overrides=["optim.lr=0.02", "optim.lr_multi=10"])
    model = DeepLabV3Plus("resnet18", 3, output_stride=16)
    optimizer = build_optimizer(cfg, torch.nn.DataParallel(model))
    assert isinstance(optimizer, torch.optim.SGD)
    backbone, head = optimizer.param_groups
    assert backbone["lr"] == backbone["initial_lr"] == 0.02
    assert head["lr"] == head["initial_lr"] == pytest.approx(0.2)
    for group in optimizer.param_groups:
        assert group["momentum"] == cfg.optim.momentum == 0.9
        assert group["weight_decay"] == cfg.optim.weight_decay == 1e-4
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    set_lr(optimizer, 50, 100, 0.9)
    assert backbone["lr"] == pytest.approx(0.02 * 0.5**0.9)
    assert head["lr"] == pytest.approx(0.2 * 0.5**0.9)
    assert backbone["initial_lr"] == 0.02
    set_lr(optimizer, 100, 100, 0.9)
    assert backbone["lr"] == head["lr"] == 0.0
