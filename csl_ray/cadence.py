"""When a training run logs, validates and checkpoints: one rule and one step driver for the plain single-process
loop (`loop.run_local`) and the Ray Train worker (`train.train_worker`).

    def after_step(metrics, due):              # due.log / due.validate / due.checkpoint for loop.step
        ...
    seconds = run_steps(loop, labeled, unlabeled, after_step)

The last iteration always logs and validates (so every run ends with a score), and every validation checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from csl_ray.config import Config


@dataclass(frozen=True)
class Due:
    """What is due after an iteration."""

    log: bool
    validate: bool
    checkpoint: bool


def due_at(step: int, cfg: Config) -> Due:
    """What is due after `step` completed iterations: `logging.log_every`, `train.eval_every`,
    `train.checkpoint_every`, and everything but the checkpoint-only interval at the last iteration."""
    last = step == cfg.train.iterations
    validate = step % cfg.train.eval_every == 0 or last
    return Due(
        log=step % cfg.logging.log_every == 0 or last,
        validate=validate,
        checkpoint=validate or step % cfg.train.checkpoint_every == 0,
    )


class Steppable(Protocol):
    """What `run_steps` needs of a loop (csl_ray.loop.TrainLoop)."""

    cfg: Config
    step: int

    def train_step(self, labeled: Any, unlabeled: Any = None) -> dict[str, float]: ...


def run_steps(
    loop: Steppable,
    labeled: Iterator[Any],
    unlabeled: Iterator[Any] | None,
    after_step: Callable[[dict[str, float], Due], None],
) -> float:
    """Steps `loop` from its current iteration to `train.iterations`, calling `after_step(metrics, due)` after each.

    The unlabelled batch is drawn even when the step does not use it (warm-up), so the streams stay at the
    iteration they were planned from. Returns the seconds spent in `train_step` (training only, no bookkeeping).
    """
    seconds = 0.0
    while loop.step < loop.cfg.train.iterations:
        started = time.perf_counter()
        metrics = loop.train_step(next(labeled), next(unlabeled) if unlabeled is not None else None)
        seconds += time.perf_counter() - started
        after_step(metrics, due_at(loop.step, loop.cfg))
    return seconds
