"""Shared fixtures. Ray is started once per session: starting it per test costs 2-4 s each on 2 cores."""

import os

import pytest

# Set before any Ray import so workers inherit them. Starting a worker group imports torch and timm in each worker:
# seconds on a quiet machine, minutes on a loaded 2-core CI machine, so the start timeout is generous (Ray's
# default is 60 s); a group that truly cannot start still fails.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 4 logical CPUs (2 for fractional Train workers, the rest for Ray Data), its processes set as
    `csl_ray.ray_session.init_ray` sets a job's (Ray Data's executor settings, Train's report collection)."""
    import ray

    from csl_ray.data.executor_tuning import tune_executor
    from csl_ray.ray_session import job_runtime_env

    if not ray.is_initialized():
        tune_executor()
        # address=local: never attach to a cluster `ray start` left on the machine (or another test's, see
        # test_ray_session.py), whose CPUs and state this session does not own.
        ray.init(
            address="local", num_cpus=4, include_dashboard=False, object_store_memory=150_000_000,
            log_to_driver=False, runtime_env=job_runtime_env(),
        )  # fmt: skip
    yield ray
    ray.shutdown()
