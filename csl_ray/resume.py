"""Which checkpoint a run resumes from: the newest one Ray Train registered for it that verifies.

Ray Train hands the workers the latest registered checkpoint, whatever happened to its files since. A state file
cut short (a crash during upload, a disk that filled) would fail every restart of the worker group the same way,
so the driver, the data planning and each worker all choose through `resume_point`: newer checkpoints that fail
`checkpoint.verify_checkpoint` are skipped, each with the reason naming its file.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray.train

from csl_ray.checkpoint import CheckpointError, verify_checkpoint


@dataclass(frozen=True)
class ResumePoint:
    """Where a run continues: `checkpoint` (None: from iteration 0), its `step`, and `skipped`, one
    "<file>: <reason>" line per newer checkpoint that did not verify."""

    checkpoint: ray.train.Checkpoint | None
    step: int
    skipped: tuple[str, ...] = ()


def registered_checkpoints(storage: str, name: str) -> list[ray.train.Checkpoint]:
    """The run's checkpoints from Ray Train's snapshot (never a half-uploaded one), newest first; [] for a new run."""
    try:
        result = ray.train.Result.from_path(f"{storage}/{name}")
    except RuntimeError:  # no experiment folder or no snapshot yet
        return []
    checkpoints = {c.path: c for c, _ in result.best_checkpoints}
    if result.checkpoint is not None:
        checkpoints[result.checkpoint.path] = result.checkpoint
    # Ray names them checkpoint_<YYYY-mm-dd_HH-MM-SS.ffffff>, so the name orders them by when they were reported.
    return sorted(checkpoints.values(), key=lambda c: c.path.rstrip("/").rsplit("/", 1)[-1], reverse=True)


def resume_point(storage: str, name: str) -> ResumePoint:
    """The newest registered checkpoint of run `name` under `storage` that verifies (see module docstring)."""
    skipped: list[str] = []
    for checkpoint in registered_checkpoints(storage, name):
        try:
            with checkpoint.as_directory() as path:
                step = verify_checkpoint(path)
        except CheckpointError as err:
            skipped.append(str(err))
            continue
        return ResumePoint(checkpoint, step, tuple(skipped))
    return ResumePoint(None, 0, tuple(skipped))


def require_resumable(point: ResumePoint, name: str) -> None:
    """Raises CheckpointError naming every file when the run has checkpoints and none of them verifies: starting
    over would silently discard the run, and retrying would fail on the same files."""
    if point.checkpoint is None and point.skipped:
        raise CheckpointError(
            f"run {name!r}: no checkpoint verifies, so it cannot resume ({'; '.join(point.skipped)}); "
            "move the run's storage folder away to start it over, or pick another train.name"
        )
