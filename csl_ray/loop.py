"""The training loop object shared by the Ray worker and the plain single-process baseline (`run_local`).

    loop = TrainLoop(cfg, "cuda", rank=rank, world_size=world_size)
    loop.load_state_dict(torch.load(path, weights_only=True))   # on resume
    loop.wrap_ddp()                                             # under torch.distributed (Ray Train)
    while loop.step < cfg.train.iterations:
        metrics = loop.train_step(next(labeled), next(unlabeled))
        if loop.step % cfg.train.eval_every == 0:
            loop.validate(val_batches)

Iteration-based: the poly learning rate is set from `loop.step` before each update, so resuming or changing the
worker count keeps the recipe. `loop.step` advances on every call, including skipped (non-finite) updates.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator
from inspect import signature
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from csl_ray.cadence import Due, run_steps
from csl_ray.config import Config
from csl_ray.evaluate import eval_options, evaluate
from csl_ray.losses import build_labeled_loss
from csl_ray.model import build_model
from csl_ray.optim import build_optimizer, set_lr
from csl_ray.selection import build_selector
from csl_ray.step import (
    Batch,
    LossWeights,
    Timer,
    in_warmup,
    semi_supervised_step,
    supervised_step,
    unlabeled_scale,
    untimed,
)
from csl_ray.teacher import build_teacher


def seed_everything(seed: int) -> None:
    """Seeds torch (CPU and CUDA), numpy and python `random`."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """All RNG states as tensors and plain values, so `torch.load(..., weights_only=True)` accepts them."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Inverse of rng_state."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class TrainLoop:
    """Student, teacher, selector, optimiser and losses built from one config, stepped one iteration at a time.

    Args:
        cfg: the resolved config.
        device: where this process trains ("cpu", "cuda", "cuda:1", ...).
        rank: this process's rank (seeds the per-process randomness, e.g. the feature-perturbation dropout).
        world_size: number of processes; > 1 makes the skip decision for a non-finite loss collective.

    Attributes:
        student: the unwrapped model (what is evaluated and checkpointed).
        model: the module called for training: `student`, or its DDP wrapper after `wrap_ddp`.
        teacher, selector, optimizer: as built from `cfg`.
        step: completed iterations; best_miou: best validation mIoU so far (percent); skipped_steps: iterations
            whose loss was not finite and so changed nothing.
        last_visuals: the latest step's StepOutput.visuals (device tensors).
    """

    def __init__(self, cfg: Config, device: torch.device | str, *, rank: int = 0, world_size: int = 1) -> None:
        if cfg.train.iterations is None:
            raise ValueError("train.iterations is unset: resolve train.epochs first (config.resolve_iterations)")
        self.cfg = cfg
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        # Same initial weights on every rank (DDP also broadcasts them), then per-rank randomness.
        seed_everything(cfg.train.seed)
        self.student = build_model(cfg).to(self.device)
        self.model: nn.Module = self.student
        self.teacher = build_teacher(cfg, self.student)
        self.selector = build_selector(cfg.ssl.selector)
        self.labeled_loss = build_labeled_loss(cfg.optim, cfg.data.ignore_index)
        self.optimizer = build_optimizer(cfg, self.student)
        self.loss_weights = LossWeights(
            strong=cfg.ssl.weight_strong, masked=cfg.ssl.weight_masked, fp=cfg.ssl.weight_fp
        )
        self.autocast = self.device.type == "cuda" and cfg.train.precision == "bf16"
        self.step = 0
        self.best_miou = 0.0
        self.skipped_steps = 0
        self.last_visuals: dict[str, torch.Tensor] = {}
        self._broadcast_buffers_for_eval = False
        # Snapshot of the BatchNorm statistics taken before each forward: a skipped step restores them, so a
        # non-finite batch leaves no trace in the model (a NaN running mean would poison every later prediction).
        self._buffers = list(self.student.buffers())
        self._buffer_backup = [b.clone() for b in self._buffers]
        seed_everything(cfg.train.seed + rank)

    def wrap_ddp(self, device_ids: list[int] | None = None) -> None:
        """Wraps the student in DistributedDataParallel (torch.distributed must be initialised).

        On CUDA, BatchNorm becomes SyncBatchNorm first, as UniMatch; the conversion replaces the BatchNorm children
        in place and reuses their parameter and buffer tensors, so the optimiser, the teacher (which holds the
        unwrapped module) and the buffer snapshot stay valid. PyTorch's SyncBatchNorm has no CPU kernel, so on CPU
        (gloo) each forward starts from rank 0's BatchNorm statistics (DDP's buffer sync) instead, and `validate`
        broadcasts them so that every rank evaluates, and rank 0 checkpoints, the same model.
        """
        cuda = self.device.type == "cuda"
        if cuda:
            nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
            if device_ids is None:
                device_ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        # With SyncBatchNorm the statistics are already equal on every rank: no buffer sync per forward. torch 2.13
        # renamed broadcast_buffers to forward_sync_buffers; the GPU machines run torch 2.11, which has only the old
        # name (with it, False also skips the buffers' broadcast at wrap time: every rank built them from one seed).
        ddp = nn.parallel.DistributedDataParallel
        sync_buffers = (
            "forward_sync_buffers" if "forward_sync_buffers" in signature(ddp).parameters else "broadcast_buffers"
        )
        self.model = ddp(self.student, device_ids=device_ids, **{sync_buffers: not cuda})
        self._broadcast_buffers_for_eval = not cuda

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether every process's loss is finite: a host sync, but the decision must precede backward.

        Collective under DDP: a rank that skipped backward alone would leave the others waiting in all-reduce.
        """
        flag = torch.isfinite(loss.detach()).float()
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)

    def train_step(self, labeled: Batch, unlabeled: Batch | None = None, *, timer: Timer = untimed) -> dict:
        """One iteration: poly LR, forward (bf16 autocast on CUDA if configured), backward, SGD, teacher update.

        Args:
            labeled: labelled batch of B rows.
            unlabeled: B unlabelled rows, each with its CutMix partner's columns (docs/data.md, "Batch schema").
                Unused (may be None) when `ssl.enabled` is false; unused during the warm-up
                (`ssl.warmup_iterations`), where the callers still draw it so that the data streams stay at the
                iteration count they were planned (and are re-planned on resume) from.
            timer: phase timer for benchmarks.

        Returns:
            The step's metrics as floats (pseudo-label accuracies only when defined; the unlabelled ones not during
            the warm-up), plus `lr` (backbone group), `step`, `skipped` (1.0 when the update was skipped for a
            non-finite loss) and, with `ssl.enabled`, `unlabeled_scale` (the warm-up / ramp-up factor).
        """
        cfg = self.cfg
        set_lr(self.optimizer, self.step, cfg.train.iterations, cfg.optim.poly_power)
        torch._foreach_copy_(self._buffer_backup, self._buffers)
        # Every rank takes the same branch at the same step (all decide from `self.step`), so DDP's collectives
        # (buffer broadcasts per forward, gradient all-reduce) stay matched during the warm-up.
        warmup = cfg.ssl.enabled and in_warmup(self.step, cfg.ssl.warmup_iterations)
        scale = unlabeled_scale(self.step, cfg.ssl.warmup_iterations, cfg.ssl.rampup_iterations)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if cfg.ssl.enabled and not warmup:
                if unlabeled is None:
                    raise ValueError("ssl.enabled is true but no unlabelled batch was given")
                out = semi_supervised_step(
                    self.model,
                    self.teacher,
                    self.selector,
                    self.labeled_loss,
                    labeled,
                    unlabeled,
                    weights=self.loss_weights.scaled(scale),
                    weight_floor=cfg.ssl.selector.weight_floor,
                    tmp_enabled=cfg.ssl.tmp.enabled,
                    bn_stats=cfg.ssl.bn_stats,
                    ignore_index=cfg.data.ignore_index,
                    timer=timer,
                )
            else:
                # The warm-up is the semi-supervised loss without its unlabelled terms, L_x / 2 (see supervised_step).
                out = supervised_step(
                    self.model, self.labeled_loss, labeled, labeled_weight=0.5 if warmup else 1.0, timer=timer
                )
        self.optimizer.zero_grad(set_to_none=True)
        finite = self._all_finite(out.loss)
        if finite:
            with timer("backward"):
                out.loss.backward()
            with timer("optimizer"):
                self.optimizer.step()
            with timer("teacher_update"):
                self.teacher.update(self.student, self.step)
        else:
            self.skipped_steps += 1
            torch._foreach_copy_(self._buffers, self._buffer_backup)
        self.step += 1
        self.last_visuals = out.visuals
        names = list(out.metrics)
        values = torch.stack([out.metrics[k].float() for k in names]).tolist()  # one host sync for all metrics
        metrics = {
            k: v for k, v in zip(names, values, strict=True) if not (k.startswith("pseudo_acc") and math.isnan(v))
        }
        metrics.update(lr=self.optimizer.param_groups[0]["lr"], step=float(self.step), skipped=float(not finite))
        if cfg.ssl.enabled:
            metrics["unlabeled_scale"] = scale
        return metrics

    def validate(self, val_batches: Iterable[Batch]) -> dict:
        """Evaluates the student on this process's validation batches (all processes must call it under DDP).

        Returns:
            evaluate()'s dict plus `best_miou`, which is updated here.
        """
        if self._broadcast_buffers_for_eval:
            for buffer in self.student.buffers():
                dist.broadcast(buffer, src=0)
        result = evaluate(self.student, val_batches, **eval_options(self.cfg.data))
        if result["miou"] > self.best_miou:
            self.best_miou = result["miou"]
        result["best_miou"] = self.best_miou
        return result

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: weights, optimiser, counters and this process's RNG states.

        Holds only tensors and plain values, so it loads with `torch.load(..., weights_only=True)`.
        """
        return {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "best_miou": self.best_miou,
            "skipped_steps": self.skipped_steps,
            "rng": rng_state(self.device),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a `state_dict()`. Rank 0 restores the saved RNG states exactly; other ranks (whose states were
        not saved) reseed from the seed, step and rank, so they stay distinct and deterministic."""
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.best_miou = float(state["best_miou"])
        self.skipped_steps = int(state["skipped_steps"])
        if self.rank == 0:
            set_rng_state(state["rng"], self.device)
        else:
            seed_everything(self.cfg.train.seed + self.step * self.world_size + self.rank)


def _forever(batches: Iterable[Batch], name: str) -> Iterator[Batch]:
    """Cycles through a re-iterable batch source (a list, a Ray dataset) or passes an endless iterator through."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError(f"{name} yielded no batches: pass a re-iterable source or an endless iterator")


def run_local(
    cfg: Config,
    labeled_iter: Iterable[Batch],
    unlabeled_iter: Iterable[Batch] | None,
    val_batches: Iterable[Batch],
    *,
    device: torch.device | str | None = None,
    log: Callable[[dict], None] | None = None,
) -> dict:
    """The plain single-process loop (no Ray): cfg.train.iterations steps, validation every train.eval_every.

    Args:
        cfg: the resolved config.
        labeled_iter: labelled batches; cycled when it is re-iterable.
        unlabeled_iter: unlabelled batches (each row with its CutMix partner); cycled when re-iterable; None for
            supervised-only runs.
        val_batches: validation batches, iterated once per validation (so it must be re-iterable).
        device: default CUDA when available, else CPU.
        log: called with the step's metrics every logging.log_every steps and with each validation result
            (both carry `step`; validation results have `miou`).

    Returns:
        `step`, `best_miou`, `skipped_steps`, `val` (the last validation), `val_history` (all of them, with
        `step`), `train_seconds` (training steps only) and `seconds_per_step`.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loop = TrainLoop(cfg, device)
    labeled = _forever(labeled_iter, "labeled_iter")
    unlabeled = _forever(unlabeled_iter, "unlabeled_iter") if cfg.ssl.enabled else None
    history: list[dict] = []

    def after_step(metrics: dict, due: Due) -> None:
        if log is not None and due.log:
            log(metrics)
        if due.validate:
            result = {"step": loop.step, **loop.validate(val_batches)}
            history.append(result)
            if log is not None:
                log(result)

    train_seconds = run_steps(loop, labeled, unlabeled, after_step)
    return {
        "step": loop.step,
        "best_miou": loop.best_miou,
        "skipped_steps": loop.skipped_steps,
        "val": history[-1] if history else {},
        "val_history": history,
        "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / max(loop.step, 1),
    }
