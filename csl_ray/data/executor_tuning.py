"""Ray Data's executor, as every process of a job runs it: how soon a new execution learns how many CPUs it may use,
and how soon a finished task's CPU goes to the next one.

Ray 2.60's streaming executor reads its resource limits (the CPUs the autoscaling coordinator grants it) at most once a
second (`ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S`), and an execution's first reading is always empty: the
coordinator answers asynchronously, so the first call returns the empty grant cached so far, and the executor keeps it
for a second, running one task at a time (its liveness rule) however many CPUs are free. Every execution pays that
second: each stream of a run once, every validation, every pass of `benchmarks/data.py`, which measures what it costs
(`benchmarks/README.md`, "Data pipeline"). Reading every LIMITS_REFRESH_S instead, the first grant arrives after one or
two scheduling rounds.

By default Ray 2.60 also fetches each output block's metadata on a background thread, and a task's CPU is handed back
only once that thread has passed on the task's last block: the thread and the scheduling loop each wait up to 0.1 s
for news, so a CPU idles at every block boundary until both have looked. Fetched on the scheduling loop instead (Ray's
`RAY_DATA_METADATA_PREFETCH_ON_THREAD=0`, a `ray.get` of a small object per block), the loop hands the CPU on as it
sees the task end. `benchmarks/data.py --ablate` measures the difference: none since short streams run one round
of tasks (`benchmarks/README.md`, "Data pipeline"). A job whose environment sets that variable keeps what it says.

`tune_executor()` makes both settings in the calling process; `RUNTIME_ENV`, given to `ray.init`, makes every worker
process of the job call it when it starts (Train workers execute the labelled streams, Ray Data's SplitCoordinator
actors the unlabelled and validation streams). A job submitted with its own `worker_process_setup_hook` must call
`tune_executor` from it (Ray refuses two hooks). Imports nothing from csl_ray: Ray imports this module in every worker
process of the job, its own actors included, which need neither torch nor the model.
"""

from __future__ import annotations

import os
from types import ModuleType

LIMITS_REFRESH_S = 0.1
"""Seconds between readings of the executor's resource limits (Ray 2.60: 1). A reading is a non-blocking call to the
coordinator actor; 0.1 s is the executor's own wait for finished tasks, so the limits are at most a round old."""

METADATA_ENV_VAR = "RAY_DATA_METADATA_PREFETCH_ON_THREAD"
"""Ray's switch between fetching block metadata on a thread (its default) and on the scheduling loop; set, it wins."""

RUNTIME_ENV = {"worker_process_setup_hook": f"{__name__}.tune_executor"}
"""`ray.init(runtime_env=RUNTIME_ENV)`: every worker process of the job calls `tune_executor` at start."""

_LIMITS_SETTING = "GLOBAL_LIMITS_UPDATE_INTERVAL_S"
_METADATA_SETTING = "_PREFETCH_ON_THREAD"


def _resource_manager() -> type | None:
    """Ray Data's ResourceManager class, if this Ray has it and it has the setting (None otherwise)."""
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:
        return None
    return ResourceManager if hasattr(ResourceManager, _LIMITS_SETTING) else None


def _metadata_fetcher() -> ModuleType | None:
    """Ray Data's metadata-fetcher module, if this Ray has it and it has the setting (None otherwise)."""
    try:
        from ray.data._internal.execution import metadata_fetcher
    except ImportError:
        return None
    return metadata_fetcher if hasattr(metadata_fetcher, _METADATA_SETTING) else None


def limits_refresh() -> float | None:
    """Seconds between Ray Data's readings of its resource limits in this process (None: Ray has no such setting)."""
    manager = _resource_manager()
    return None if manager is None else getattr(manager, _LIMITS_SETTING)


def shorten_limits_refresh(seconds: float = LIMITS_REFRESH_S) -> None:
    """Makes Ray Data's executors in this process read their resource limits every `seconds`.

    A Ray without the setting (moved or renamed in a later release) is left as it is: executions then start as
    slowly as before, and tests/test_ray_session.py fails to say the setting no longer reaches Ray.
    """
    manager = _resource_manager()
    if manager is not None:
        setattr(manager, _LIMITS_SETTING, seconds)


def metadata_on_thread() -> bool | None:
    """Whether Ray Data's executors in this process fetch block metadata on a thread (None: Ray has no such setting)."""
    module = _metadata_fetcher()
    return None if module is None else bool(getattr(module, _METADATA_SETTING))


def fetch_metadata_on_thread(on_thread: bool) -> None:
    """Makes Ray Data's executions started from now on in this process fetch block metadata on a thread or not (a
    Ray without the setting is left as it is; tests/test_ray_session.py then fails)."""
    module = _metadata_fetcher()
    if module is not None:
        setattr(module, _METADATA_SETTING, on_thread)


def tune_executor() -> None:
    """Both settings of the module docstring in this process (the metadata one unless METADATA_ENV_VAR is set)."""
    shorten_limits_refresh()
    if METADATA_ENV_VAR not in os.environ:
        fetch_metadata_on_thread(False)
