"""The driver's view of a running fit: each report appended to metrics.jsonl and shown as one status line, which
the workers' own log lines must not bury."""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.train import UserCallback

from csl_ray.cli import format_duration
from csl_ray.tracking import RunDir

PROGRESS_KEYS = ("loss", "loss_x", "selected_ratio", "pseudo_acc_selected")
"""Training means shown on the driver's status line."""


class RunMonitor(UserCallback):
    """Runs in the Train controller (on the driver's node): appends every report to metrics.jsonl and prints a
    one-line status per report (every `logging.log_every` iterations and at validations)."""

    def __init__(self, run_dir: str, name: str, total: int) -> None:
        self.run, self.name, self.total = RunDir(run_dir), name, total
        self.clock: tuple[float, int] | None = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        row = {"time": time.time(), **metrics[0]}
        self.run.append_metrics(row)
        step, now = int(row["step"]), time.monotonic()
        if self.clock is None or step <= self.clock[1]:  # first report, or restarted from a checkpoint
            self.clock = (now, step)
        parts = [f"[{self.name}] step {step}/{self.total}"]
        parts += [f"{k} {row[k]:.3f}" for k in PROGRESS_KEYS if k in row]
        if "miou" in row:
            parts.append(f"val mIoU {row['miou']:.2f} (best {row['best_miou']:.2f})")
        if step > self.clock[1]:
            rate = (step - self.clock[1]) / max(now - self.clock[0], 1e-9)
            parts.append(f"{rate:.2f} it/s, eta {format_duration((self.total - step) / rate)}")
        print(" | ".join(parts), flush=True)

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for rank, error in worker_exceptions.items():
            print(
                f"[{self.name}] worker {rank} failed: {error!r} (restarts from the newest checkpoint that verifies "
                "while ray.max_failures allows)",
                flush=True,
            )


def quiet_worker_logs() -> None:
    """Drops Ray's per-report and per-dataset INFO lines in this worker, keeping warnings and errors.

    Ray 2.60 logs every `ray.train.report` call, metrics dict included, at INFO from a logger named by its source
    file's path, so `LoggingConfig(log_level=...)`, which filters loggers named `ray.train.*`, misses it; with a
    report every `logging.log_every` iterations on every rank those lines bury the driver's status line.
    """
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
