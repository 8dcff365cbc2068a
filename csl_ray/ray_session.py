"""Which Ray a job runs on: attach to a cluster that is there, or start a local one sized for the job.

A bare `ray.init()` attaches to RAY_ADDRESS (set by `ray job submit`) or, failing that, to the address that
`ray start --head` records in Ray's temp dir (`<RAY_TMPDIR or TMPDIR or /tmp>/ray/ray_current_cluster`). A job that
means to start its own Ray must pass resources (`num_cpus`), which Ray refuses once it has found a cluster; and the
address file outlives a cluster that died, so a bare `ray.init()` would then try to reach nothing. `init_ray`:

1. `ray.address` or RAY_ADDRESS given: attaches there (`ray.address=local` always starts a new local Ray instead).
2. Else a live cluster in the address file (a `ray start --head` on this machine): attaches to it.
3. Else (no file, or one whose cluster no longer answers): starts a local Ray with enough logical CPUs.

Attaching prints one line on stderr naming the cluster and its resources, and warns when they are fewer than the
job asks for (its Train workers would wait for them). Either way the job's processes start with `job_runtime_env()`:
Ray Data's executions without their idle first second or idle CPUs between tasks (`data/executor_tuning.py`), and Ray
Train's controller collecting the workers' reports often enough that `ray.train.report` never holds training up
(`TRAIN_POLL_INTERVAL_S`).
"""

from __future__ import annotations

import math
import os
import sys

import ray

from csl_ray.config import Config
from csl_ray.data.executor_tuning import RUNTIME_ENV, tune_executor
from csl_ray.data.ray_datasets import data_cpus
from csl_ray.preflight import is_listening

LOCAL = "local"
"""`ray.address=local`: start a new local Ray even when a cluster runs on this machine (Ray's own keyword)."""

TRAIN_POLL_ENV_VAR = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_INTERVAL_S = 0.2
"""Seconds between Ray Train's collections of the workers' reports (Ray 2.60's default is 2). A worker holds one
report until the controller collects it, so a second `ray.train.report` within the interval waits for it: at 2 s
and `logging.log_every=10` a run could not go faster than 5 iterations/s. A missed collection is not a failure (a
worker is declared dead after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 minutes), so a short interval is safe."""


def job_runtime_env() -> dict:
    """The runtime env of every process of a job: Ray Data's executor settings (`executor_tuning.tune_executor`) and
    Ray Train's report collection interval (a RAY_TRAIN_HEALTH_CHECK_INTERVAL_S set in this environment wins)."""
    interval = os.environ.get(TRAIN_POLL_ENV_VAR, f"{TRAIN_POLL_INTERVAL_S:g}")
    return {**RUNTIME_ENV, "env_vars": {TRAIN_POLL_ENV_VAR: interval}}


def job_cpus(cfg: Config) -> float:
    """Logical CPUs one run asks for: its Train workers' share plus its data pipelines'."""
    return max(cfg.ray.num_workers, 1) * cfg.ray.cpus_per_worker + data_cpus(cfg)


def recorded_cluster_address() -> str | None:
    """The address `ray start --head` recorded for this machine, if the file is there (the cluster may be dead).

    Read through Ray's own helper so the file's location follows Ray's rules (RAY_TMPDIR, TMPDIR, /tmp).
    """
    from ray._private.utils import read_ray_address

    return read_ray_address() or None


def _attach(address: str | None, why: str, cfg: Config) -> None:
    """Attaches to `address` (None: the cluster in the address file, found as Ray finds it) and says so."""
    ray.init(address=address, runtime_env=job_runtime_env())
    address = address or ray.get_runtime_context().gcs_address
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    line = f"csl-ray: attached to the Ray cluster at {address} ({why}; {cpus:g} CPUs, {gpus:g} GPUs)"
    if cpus < job_cpus(cfg) or (cfg.ray.use_gpu and gpus < cfg.ray.num_workers * cfg.ray.gpus_per_worker):
        line += f"; fewer than this run asks for ({job_cpus(cfg):g} CPUs for Train workers and data): it may wait"
    print(line, file=sys.stderr, flush=True)


def init_ray(cfg: Config) -> bool:
    """Attaches to the cluster named or found (see the module docstring), else starts a local Ray sized for the job.

    A local Ray gets enough logical CPUs for the fractional Train workers plus the data pipelines (`data_cpus`),
    even above the physical count: Ray Data starves, and the run hangs, when the workers reserve every CPU.

    Returns:
        True when this call started Ray (the caller shuts it down), False when it attached or Ray was already up.
    """
    if ray.is_initialized():
        return False
    tune_executor()
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address and address != LOCAL:
        _attach(address, "ray.address" if cfg.ray.address else "RAY_ADDRESS", cfg)
        return False
    recorded = recorded_cluster_address()
    if address != LOCAL and recorded and is_listening(recorded):
        # No address argument: Ray then reads the file itself and, as for any cluster it finds on its own, sends
        # the machine's auth token (~/.ray/auth_token), which `ray start` clusters require since Ray 2.59.
        _attach(None, "started with `ray start`; ray.address=local starts a private one instead", cfg)
        return False
    # address="local" makes Ray start a new instance even though an address file (stale here) exists.
    ray.init(address=LOCAL, num_cpus=max(os.cpu_count() or 1, math.ceil(job_cpus(cfg))), runtime_env=job_runtime_env())
    return True
