"""Teachers that produce the pseudo-label probabilities (docs/method.md, The step).

- `SelfTeacher`: the student itself (the released CSL code's default). The weak-view prediction comes from the
  step's own training-mode forward; `predict` serves the extra no-grad passes (the CutMix partner images), in
  training mode (released) or eval mode (UniMatch), `ssl.teacher.partner_pass`.
- `EmaTeacher`: a momentum copy of the student in timm `ModelEmaV3` style (deepcopy, eval, no grad, foreach lerp).

Teachers are plain objects, not modules: they are never wrapped in DDP and a `.train()` on the loop's modules
cannot reach them.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from csl_ray.config import Config
from csl_ray.model import running_stats_kept, unwrap


def ema_momentum(step: int, base: float) -> float:
    """EMA momentum at optimiser step `step`: `min(1 - 1/(step + 1), base)` (0 at step 0, i.e. a plain copy)."""
    return min(1.0 - 1.0 / (step + 1), base)


def _predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images).float().softmax(dim=1)


class SelfTeacher:
    """The student as its own teacher; holds no state of its own.

    Args:
        student: the student model (a DDP wrapper is unwrapped: teacher passes need no gradient sync).
        partner_pass: "train" (released: BatchNorm on the batch's own statistics, the running statistics put back
            afterwards) or "eval" (UniMatch: BatchNorm on the running statistics).
    """

    kind = "self"

    def __init__(self, student: nn.Module, partner_pass: str) -> None:
        self.student = unwrap(student)
        self.partner_pass = partner_pass

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities [N, C, H, W] (float32) for normalised images [N, 3, H, W], without gradient.

        Runs in the `partner_pass` mode and leaves the running statistics as they were either way; the student's
        previous mode is restored afterwards.
        """
        was_training = self.student.training
        self.student.train(self.partner_pass == "train")
        try:
            with running_stats_kept(self.student):
                return _predict(self.student, images)
        finally:
            self.student.train(was_training)

    def update(self, student: nn.Module, step: int) -> None:
        """Nothing to do: the teacher is the student."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            raise ValueError(f"a self teacher has no state, got keys {sorted(state_dict)[:5]}")


class EmaTeacher:
    """Exponential moving average of the student's parameters; buffers (BatchNorm statistics) are copied.

    Args:
        student: the model to track (a DDP wrapper is unwrapped before the copy).
        momentum: the base momentum; the effective one ramps up as `ema_momentum(step, momentum)`.
    """

    kind = "ema"

    def __init__(self, student: nn.Module, momentum: float) -> None:
        self.momentum = momentum
        self.model = copy.deepcopy(unwrap(student)).eval().requires_grad_(False)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities [N, C, H, W] (float32) of the EMA model (always in eval mode), without gradient."""
        return _predict(self.model, images)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        """ema = m * ema + (1 - m) * student for parameters, with m = ema_momentum(step, momentum); buffers copied."""
        student = unwrap(student)
        weight = 1.0 - ema_momentum(step, self.momentum)
        ema_params, student_params = list(self.model.parameters()), list(student.parameters())
        if len(ema_params) != len(student_params):
            raise ValueError(f"student has {len(student_params)} parameters, the EMA teacher {len(ema_params)}")
        torch._foreach_lerp_(ema_params, [p.detach() for p in student_params], weight)
        for ema_buffer, buffer in zip(self.model.buffers(), student.buffers(), strict=True):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.model.load_state_dict(state_dict)


def build_teacher(cfg: Config, student: nn.Module) -> SelfTeacher | EmaTeacher:
    """The teacher named by `cfg.ssl.teacher.kind` ("self" or "ema") for `student`."""
    if cfg.ssl.teacher.kind == "self":
        return SelfTeacher(student, cfg.ssl.teacher.partner_pass)
    return EmaTeacher(student, cfg.ssl.teacher.momentum)
