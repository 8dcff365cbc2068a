"""One semi-supervised CSL step (docs/method.md, The step) and the supervised-only baseline step.

A step computes the loss and named metrics and nothing else; the loop does backward, the optimiser, the schedule
and the teacher update. Batches follow docs/data.md, "Batch schema" (uint8 images, normalised here on the
student's device).

Teacher paths (`teacher.kind`):
- `self` (as released): the weak-view probabilities are the detached softmax of the student's own training-mode
  forward on [x_l; x_w] (the pass that also gives L_x and L_fp); the CutMix partner gets a separate no-grad
  `teacher.predict` pass (training or eval mode, `ssl.teacher.partner_pass`; see teacher.py).
- `ema`: the weak and partner probabilities come from one `teacher.predict` pass of the EMA model.

BatchNorm running statistics (`bn_stats`): `released` keeps the [x_s; x_m] pass out of them (the released code
saves them before that pass and restores them at the next forward), so only [x_l; x_w] updates them; `all` lets
both student passes update them. The partner pass never does.

With `tmp_enabled=False` the masked branch is skipped (no forward pass, loss_u_m = 0, its weight dropped, so
L = (L_x + w_s L_s + w_fp L_fp) / 2). An unmasked third view is `ssl.tmp.mask_ratio=0` instead.

Options beyond the released code (all off by default), for every selector alike: the loop runs `supervised_step`
during a warm-up (`in_warmup`), scales the unlabelled weights by a sigmoid ramp-up (`unlabeled_scale`), and the step
zeroes soft weights below a floor (`floor_weights`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from csl_ray.losses import weighted_ce
from csl_ray.masking import apply_tmp, paste
from csl_ray.model import normalize_input, running_stats_kept
from csl_ray.selection import Selection
from csl_ray.teacher import EmaTeacher, SelfTeacher

Batch = dict[str, torch.Tensor]
Timer = Callable[[str], AbstractContextManager[None]]
"""`timer(phase_name)` -> a context manager around one phase of the step (see PhaseTimer)."""


@dataclass(frozen=True)
class LossWeights:
    """Weights of the unlabelled losses in L = (L_x + strong L_s + masked L_m + fp L_fp) / 2 (`ssl.weight_*`)."""

    strong: float
    masked: float
    fp: float

    def scaled(self, factor: float) -> LossWeights:
        """Every weight times `factor` (the ramp-up)."""
        return LossWeights(self.strong * factor, self.masked * factor, self.fp * factor)


def sigmoid_rampup(progress: float) -> float:
    """Mean Teacher's ramp-up `exp(-5 (1 - t)^2)` at `t = progress` clamped to [0, 1] (exp(-5) = 0.0067 -> 1)."""
    t = min(max(progress, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def in_warmup(step: int, warmup_iterations: int) -> bool:
    """Whether iteration `step` (0-based) trains on the labelled loss alone (`ssl.warmup_iterations`)."""
    return step < warmup_iterations


def unlabeled_scale(step: int, warmup_iterations: int, rampup_iterations: int) -> float:
    """Factor on the unlabelled loss weights at iteration `step` (0-based).

    0 during the warm-up; then `sigmoid_rampup` over `rampup_iterations` iterations counted from the warm-up's end
    (so the two compose: warm-up, then ramp-up); 1 afterwards, and always 1 with both at 0 (the released recipe).
    """
    if in_warmup(step, warmup_iterations):
        return 0.0
    if rampup_iterations <= 0:
        return 1.0
    return sigmoid_rampup((step - warmup_iterations) / rampup_iterations)


def floor_weights(weights: torch.Tensor, floor: float) -> torch.Tensor:
    """Soft weights [N, H, W] with every weight below `floor` set to 0 (`ssl.selector.weight_floor`; 0 = none).

    Only CSL's soft weights lie strictly between 0 and 1, so the hard 0/1 baselines are unchanged by a floor <= 1.
    """
    if floor <= 0:
        return weights
    return weights.masked_fill(weights < floor, 0.0)


@dataclass
class StepOutput:
    """What one step hands to the loop.

    Attributes:
        loss: scalar with grad.
        metrics: detached scalar tensors (no host sync inside the step; the loop converts them in one go).
        visuals: detached tensors of the first unlabelled row for image logging (views; clone to keep them past
            the next step): `image_weak` uint8 [3, H, W], `pseudo_label` int64 [H, W], `weight` [H, W],
            `reliable` bool [H, W], `image_masked` (normalised float [3, H, W], only with TMP) and `gt` [H, W]
            when the batch carries ground truth.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    visuals: dict[str, torch.Tensor] = field(default_factory=dict)


class PhaseTimer:
    """Sums wall-clock seconds per named phase over any number of steps.

    With `sync` (CUDA), it synchronises at each phase boundary so asynchronous kernels are charged to the phase
    that launched them; that removes CPU/GPU overlap, so use it for benchmarks, not for training.
    """

    def __init__(self, sync: bool = False) -> None:
        self.sync = sync
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def untimed(name: str) -> AbstractContextManager[None]:
    """The Timer used when nobody is measuring."""
    return nullcontext()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _ratio(numerator: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
    """Fraction of the `among` pixels that are also `numerator` pixels; NaN when there are none (no host sync)."""
    count = among.sum()
    return torch.where(count > 0, (numerator & among).sum() / count.clamp_min(1), torch.nan)


def semi_supervised_step(
    student: nn.Module,
    teacher: SelfTeacher | EmaTeacher,
    selector: Callable[[torch.Tensor, torch.Tensor], Selection],
    labeled_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    labeled: Batch,
    unlabeled: Batch,
    *,
    weights: LossWeights,
    weight_floor: float,
    tmp_enabled: bool,
    bn_stats: str,
    ignore_index: int,
    timer: Timer = untimed,
) -> StepOutput:
    """Loss and metrics of one CSL iteration (docs/method.md, The step).

    Args:
        student: the model being trained (possibly DDP-wrapped); called in its current (training) mode.
        teacher: SelfTeacher or EmaTeacher (`kind`, `predict(normalised images) -> probs`).
        selector: `(probs [N, C, H, W], valid [N, H, W]) -> Selection` (build_selector).
        labeled_loss: `(logits, target) -> scalar` for the labelled batch (CE or OHEM).
        labeled: `image` uint8 [B, 3, S, S], `mask` uint8 or int64 [B, S, S].
        unlabeled: B main crops, each with its CutMix partner (docs/data.md, "Batch schema"): `image_weak`,
            `image_strong`, `image_masked`, `partner_weak`, `partner_strong` uint8 [B, 3, S, S]; `tmp_cells`,
            `cutmix_box`, `valid`, `partner_valid` bool [B, S, S]; optional `mask` uint8 or int64 [B, S, S]
            (diagnostics only).
        weights: unlabelled loss weights (already scaled by the ramp-up).
        weight_floor: soft weights below it count as 0 (`floor_weights`), for the main crops and the partners.
        tmp_enabled: run the masked branch (see the module docstring for the disabled case).
        bn_stats: "released" (only the [x_l; x_w] pass updates the BatchNorm running statistics) or "all".
        ignore_index: label value of unknown ground truth in `unlabeled["mask"]`.
        timer: phase timer for benchmarks.

    Returns:
        StepOutput with metrics loss, loss_x, loss_u_s, loss_u_m, loss_u_fp, selected_ratio (reliable / valid
        pixels of the weak view), mean_weight (over valid pixels) and, when `unlabeled` has `mask`, pseudo_acc,
        pseudo_acc_selected, pseudo_acc_rejected (accuracy of the weak-view pseudo-labels over all / reliable /
        other valid pixels with known ground truth; NaN where no such pixel exists).
    """
    device = _device(student)
    with timer("inputs"):
        x_l = normalize_input(student, labeled["image"])
        y_l = labeled["mask"].to(device, non_blocking=True).long()  # masks travel as uint8; widened here
        x_w = normalize_input(student, unlabeled["image_weak"])
        x_s = normalize_input(student, unlabeled["image_strong"])
        valid = unlabeled["valid"].to(device, non_blocking=True)
        box = unlabeled["cutmix_box"].to(device, non_blocking=True)
        x_w_mix = normalize_input(student, unlabeled["partner_weak"])
        x_s_mix = normalize_input(student, unlabeled["partner_strong"])
        valid_mix = unlabeled["partner_valid"].to(device, non_blocking=True)
        if tmp_enabled:
            x_m = normalize_input(student, unlabeled["image_masked"])
            cells = unlabeled["tmp_cells"].to(device, non_blocking=True)
    n_l, n_u = x_l.shape[0], x_w.shape[0]

    if teacher.kind == "self":
        with timer("teacher"):
            probs_mix = teacher.predict(x_w_mix)
        with timer("student_forward"):
            logits, logits_fp = student(torch.cat((x_l, x_w)), need_fp=True)
        probs = torch.cat((logits[n_l:].detach().float().softmax(dim=1), probs_mix))
    else:
        with timer("teacher"):
            probs = teacher.predict(torch.cat((x_w, x_w_mix)))
        with timer("student_forward"):
            logits, logits_fp = student(torch.cat((x_l, x_w)), need_fp=True)
    logits_l, logits_fp_w = logits[:n_l], logits_fp[n_l:]

    # The selector is per image, so the main crops and their partners go through it in one call; outside autocast
    # because its statistics must not be computed in bf16.
    with timer("selector"), torch.autocast(device.type, enabled=False):
        selection = selector(probs, torch.cat((valid, valid_mix)))
    labels, labels_mix = selection.labels.split(n_u)
    weight, weight_mix = floor_weights(selection.weights, weight_floor).split(n_u)
    reliable = selection.reliable[:n_u]

    with timer("masking"):
        x_s = paste(x_s, x_s_mix, box)
        labels_s = paste(labels, labels_mix, box)
        weight_s = paste(weight, weight_mix, box)
        valid_s = paste(valid, valid_mix, box)
        if tmp_enabled:
            x_m = apply_tmp(x_m, cells, reliable)

    keep_stats = running_stats_kept(student) if bn_stats == "released" else nullcontext()
    with timer("student_forward"), keep_stats:
        # Strong and masked views share one forward pass (and so their BatchNorm statistics), as UniMatch's s1/s2.
        if tmp_enabled:
            logits_s, logits_m = student(torch.cat((x_s, x_m))).split(n_u)
        else:
            logits_s = student(x_s)

    with timer("loss"):
        loss_x = labeled_loss(logits_l, y_l)
        loss_s = weighted_ce(logits_s, labels_s, weight_s, valid_s)
        loss_fp = weighted_ce(logits_fp_w, labels, weight, valid)
        loss_m = weighted_ce(logits_m, labels, weight, valid) if tmp_enabled else loss_x.new_zeros(())
        loss = (loss_x + weights.strong * loss_s + weights.masked * loss_m + weights.fp * loss_fp) / 2

        num_valid = valid.sum().clamp_min(1)
        metrics = {
            "loss": loss.detach(),
            "loss_x": loss_x.detach(),
            "loss_u_s": loss_s.detach(),
            "loss_u_m": loss_m.detach(),
            "loss_u_fp": loss_fp.detach(),
            "selected_ratio": (reliable & valid).sum() / num_valid,
            "mean_weight": (weight * valid).sum() / num_valid,
        }
        visuals = {
            "image_weak": unlabeled["image_weak"][0],
            "pseudo_label": labels[0],
            "weight": weight[0],
            "reliable": reliable[0],
        }
        if tmp_enabled:
            visuals["image_masked"] = x_m[0].detach()
        if "mask" in unlabeled:
            gt = unlabeled["mask"].to(device, non_blocking=True).long()
            known = valid & (gt != ignore_index)
            correct = labels == gt
            metrics["pseudo_acc"] = _ratio(correct, known)
            metrics["pseudo_acc_selected"] = _ratio(correct, known & reliable)
            metrics["pseudo_acc_rejected"] = _ratio(correct, known & ~reliable)
            visuals["gt"] = gt[0]
    return StepOutput(loss, metrics, visuals)


def supervised_step(
    student: nn.Module,
    labeled_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    labeled: Batch,
    *,
    labeled_weight: float,
    timer: Timer = untimed,
) -> StepOutput:
    """The labelled loss alone: loss = labeled_weight * L_x (metrics loss and loss_x).

    One forward pass on the labelled batch: no teacher pass, no unlabelled views.

    Args:
        student: the model being trained.
        labeled_loss: `(logits, target) -> scalar`.
        labeled: `image` uint8 [B, 3, S, S], `mask` uint8 or int64 [B, S, S].
        labeled_weight: 1 for the supervised-only baseline; 1/2 for the warm-up of a semi-supervised run, the
            weight L_x has in its loss, so the labelled gradient keeps its scale when the unlabelled terms start.
        timer: phase timer for benchmarks.
    """
    device = _device(student)
    with timer("inputs"):
        x_l = normalize_input(student, labeled["image"])
        y_l = labeled["mask"].to(device, non_blocking=True).long()
    with timer("student_forward"):
        logits = student(x_l)
    with timer("loss"):
        loss_x = labeled_loss(logits, y_l)
        loss = labeled_weight * loss_x
    return StepOutput(loss, {"loss": loss.detach(), "loss_x": loss_x.detach()})
