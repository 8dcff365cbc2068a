"""SGD with a per-iteration poly learning-rate schedule (docs/method.md, Model and optimisation).

optimizer = build_optimizer(cfg, model)
for step in range(total):
    set_lr(optimizer, step, total, cfg.optim.poly_power)
    ...
"""

from __future__ import annotations

import torch
from torch import nn

from csl_ray.config import Config
from csl_ray.model import unwrap


def poly_lr(step: int, total: int, base_lr: float, power: float) -> float:
    """`base_lr * (1 - step/total) ** power`; `step` is clamped to [0, total], so the rate ends at 0."""
    progress = min(max(step, 0), total) / total
    return base_lr * (1.0 - progress) ** power


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.SGD:
    """SGD over the model's backbone (lr) and head (lr * lr_multi) groups, each with its base lr as "initial_lr".

    Weight decay applies to every parameter (BatchNorm and biases included), as UniMatch does.
    """
    groups = unwrap(model).param_groups(cfg.optim.lr, cfg.optim.lr_multi)
    optimizer = torch.optim.SGD(
        groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
    )
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


def set_lr(optimizer: torch.optim.Optimizer, step: int, total: int, power: float) -> None:
    """Sets every group's lr to `poly_lr(step, total, group["initial_lr"], power)`."""
    for group in optimizer.param_groups:
        group["lr"] = poly_lr(step, total, group["initial_lr"], power)
