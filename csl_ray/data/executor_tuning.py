"""Ray Data's executor, as every process of a job runs it: how soon a new execution learns how many CPUs it may use.

Ray 2.60's streaming executor reads its resource limits (the CPUs the autoscaling coordinator grants it) at most once a
second (`ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S`), and an execution's first reading is always empty: the
coordinator answers asynchronously, so the first call returns the empty grant cached so far, and the executor keeps it
for a second, running one task at a time (its liveness rule) however many CPUs are free. Every execution pays that
second: each stream of a run once, every validation, every pass of `benchmarks/data.py`, which measures what it costs
(`benchmarks/README.md`, "Data pipeline"). Reading every LIMITS_REFRESH_S instead, the first grant arrives after one or
two scheduling rounds.

`shorten_limits_refresh()` sets it in the calling process; `RUNTIME_ENV`, given to `ray.init`, makes every worker
process of the job set it when it starts (Train workers execute the labelled streams, Ray Data's SplitCoordinator
actors the unlabelled and validation streams). A job submitted with its own `worker_process_setup_hook` must call
`shorten_limits_refresh` from it (Ray refuses two hooks). Imports nothing from csl_ray: Ray imports this module in
every worker process of the job, its own actors included, which need neither torch nor the model.
"""

from __future__ import annotations

LIMITS_REFRESH_S = 0.1
"""Seconds between readings of the executor's resource limits (Ray 2.60: 1). A reading is a non-blocking call to the
coordinator actor; 0.1 s is the executor's own wait for finished tasks, so the limits are at most a round old."""

RUNTIME_ENV = {"worker_process_setup_hook": f"{__name__}.shorten_limits_refresh"}
"""`ray.init(runtime_env=RUNTIME_ENV)`: every worker process of the job calls `shorten_limits_refresh` at start."""

_SETTING = "GLOBAL_LIMITS_UPDATE_INTERVAL_S"


def _resource_manager() -> type | None:
    """Ray Data's ResourceManager class, if this Ray has it and it has the setting (None otherwise)."""
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:
        return None
    return ResourceManager if hasattr(ResourceManager, _SETTING) else None


def limits_refresh() -> float | None:
    """Seconds between Ray Data's readings of its resource limits in this process (None: Ray has no such setting)."""
    manager = _resource_manager()
    return None if manager is None else getattr(manager, _SETTING)


def shorten_limits_refresh(seconds: float = LIMITS_REFRESH_S) -> None:
    """Makes Ray Data's executors in this process read their resource limits every `seconds`.

    A Ray without the setting (moved or renamed in a later release) is left as it is: executions then start as
    slowly as before, and tests/test_ray_session.py fails to say the setting no longer reaches Ray.
    """
    manager = _resource_manager()
    if manager is not None:
        setattr(manager, _SETTING, seconds)
