"""A run's log of the corrupt rows its Ray Data decode tasks skipped, each counted once.

A Ray actor of its own module, which imports nothing but Ray: the actor's process loads this module to run it, and
keeping torch out of it keeps that process small (about 0.1 GB instead of 0.4 GB).
"""

from __future__ import annotations

import ray


class _CorruptRows:
    """The actor behind CorruptRowLog: skipped rows by key ("shard row N"), so a row reported again (another epoch,
    another rank's labelled stream, a retried task) is still one row."""

    def __init__(self) -> None:
        self.rows: dict[str, str] = {}

    def add(self, rows: dict[str, str]) -> None:
        self.rows.update(rows)

    def get(self) -> dict[str, str]:
        return self.rows


class CorruptRowLog:
    """The corrupt rows a run's decode tasks skipped, each once; also the tasks' `SkipReport` (it pickles as a
    handle to the same actor).

    The actor lives as long as the process that created this object keeps it (the driver, for the whole run).
    """

    def __init__(self) -> None:
        self.actor = ray.remote(num_cpus=0)(_CorruptRows).remote()

    def __call__(self, skipped: dict[str, str]) -> None:
        ray.get(self.actor.add.remote(skipped))

    def rows(self) -> list[str]:
        """The message ("shard row N (id ...): corrupt: error") of every distinct row skipped so far, sorted."""
        return sorted(ray.get(self.actor.get.remote()).values())
