"""Attach or start, never crash: a job attaches to a live `ray start --head` cluster on the machine and says so; with
the address file a dead cluster leaves behind, it starts its own local Ray; either way its processes, Ray's worker
processes included, run Ray Data's executions without their idle first second or idle CPUs between tasks
(`csl_ray/data/executor_tuning.py`).

Each case runs in a subprocess with its own Ray temp dir (RAY_TMPDIR), so neither the cluster started here nor its
address file is seen by this test session's Ray or by any other Ray on the machine; the cluster is stopped by its
process group, never by `ray stop` (which stops every Ray on the machine).
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from csl_ray.data.builtin import ensure_builtin_dataset
from csl_ray.data.executor_tuning import (
    LIMITS_REFRESH_S,
    METADATA_ENV_VAR,
    fetch_metadata_on_thread,
    metadata_on_thread,
    tune_executor,
)
from csl_ray.preflight import is_listening
from csl_ray.ray_session import TRAIN_POLL_ENV_VAR, TRAIN_POLL_INTERVAL_S, job_runtime_env, recorded_cluster_address

JOBS = Path(__file__).resolve().parents[1] / "jobs"
ATTACHED = "csl-ray: attached to the Ray cluster at"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_tmpdir():
    """A short private Ray temp dir (Ray's socket paths must stay under ~100 characters)."""
    path = Path(tempfile.mkdtemp(prefix="csl-ray-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def job_env(ray_tmpdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", TRAIN_POLL_ENV_VAR, METADATA_ENV_VAR)}
    return {**env, "RAY_TMPDIR": str(ray_tmpdir)}


def sessions(ray_tmpdir: Path) -> list[Path]:
    """Ray session dirs in the temp dir: one per Ray instance started there (an attached driver starts none)."""
    return sorted((ray_tmpdir / "ray").glob("session_2*"))


def run_train_job(ray_tmpdir: Path, tmp_path: Path, root: str) -> subprocess.CompletedProcess:
    """jobs/train.py for 2 iterations in Train's in-process mode: its data pipelines run on whichever Ray it found."""
    overrides = [
        f"data.root={root}",
        "data.crop_size=32",
        "data.global_batch_size=2",
        "train.iterations=2",
        "ssl.warmup_iterations=0",
        "train.eval_every=2",
        "train.checkpoint_every=2",
        "ray.num_workers=0",
        f"train.output_dir={tmp_path / 'runs'}",
        "train.name=attach",
    ]
    return subprocess.run(
        [sys.executable, str(JOBS / "train.py"), *overrides],
        env=job_env(ray_tmpdir),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture
def dataset(tmp_path_factory) -> str:
    cache = tmp_path_factory.getbasetemp() / "builtin-ray-session"
    return str(ensure_builtin_dataset(cache, num_labeled=4, num_unlabeled=8, num_val=2, size=48))


@pytest.fixture
def local_cluster(ray_tmpdir):
    """A real `ray start --head` (2 CPUs) recording its address in `ray_tmpdir`; yields the address."""
    # Free ports for the services with fixed defaults, so that another Ray on the machine cannot collide with it.
    ports = ["--port", "--ray-client-server-port", "--dashboard-agent-listen-port", "--metrics-export-port"]
    ray_cli = str(Path(sys.executable).with_name("ray"))  # the Ray CLI of this interpreter's environment
    command = [ray_cli, "start", "--head", *(f"{flag}={free_port()}" for flag in ports)]
    # A small object store: Ray's default (30% of memory) is more than a shared test machine can spare.
    command += ["--num-cpus=2", "--object-store-memory=100000000", "--include-dashboard=false", "--disable-usage-stats"]
    # Its own session: the daemons `ray start` leaves running share this process group, which teardown kills.
    starter = subprocess.Popen(
        command, env=job_env(ray_tmpdir), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        out, _ = starter.communicate(timeout=300)
        assert starter.returncode == 0, out.decode()[-2000:]
        address = (ray_tmpdir / "ray" / "ray_current_cluster").read_text().strip()
        yield address
    finally:
        try:
            os.killpg(starter.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_job_attaches_to_a_live_local_cluster_and_says_so(local_cluster, ray_tmpdir, dataset, tmp_path):
    assert len(sessions(ray_tmpdir)) == 1  # the cluster's
    run = run_train_job(ray_tmpdir, tmp_path, dataset)
    assert run.returncode == 0, run.stderr[-3000:]
    attached = [line for line in run.stderr.splitlines() if line.startswith(ATTACHED)]
    assert len(attached) == 1 and local_cluster in attached[0], run.stderr[-3000:]
    assert len(sessions(ray_tmpdir)) == 1  # no Ray of its own
    assert (tmp_path / "runs" / "attach" / "results.json").is_file()


def test_init_ray_starts_its_own_ray_when_the_recorded_cluster_is_dead(ray_tmpdir):
    # What a cluster killed without `ray stop` leaves: its address file, and nothing listening at the address. The
    # job path to init_ray is the one the attach test above runs; here init_ray alone, to keep the suite short.
    stale = f"127.0.0.1:{free_port()}"
    (ray_tmpdir / "ray").mkdir()
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(stale)
    script = (
        "import ray; from csl_ray.config import load_config; from csl_ray.ray_session import init_ray; "
        "from csl_ray.data.executor_tuning import limits_refresh, metadata_on_thread; import os; "
        "started = init_ray(load_config(preset='tiny')); "
        "worker = ray.remote(lambda: (limits_refresh(), metadata_on_thread(), "
        "os.environ.get('RAY_TRAIN_HEALTH_CHECK_INTERVAL_S'))); "
        "print(started, ray.get_runtime_context().gcs_address, ray.cluster_resources()['CPU'], "
        "limits_refresh(), metadata_on_thread(), *ray.get(worker.remote()))"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], env=job_env(ray_tmpdir), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    fields = run.stdout.split()
    started, address, cpus, driver_refresh, driver_thread, worker_refresh, worker_thread, worker_train_poll = fields
    assert started == "True" and address != stale and float(cpus) >= 2  # its own Ray, sized for the job
    # Ray Data's executions start at full speed and hand CPUs from task to task at once in the job's processes, its
    # worker processes included (a Ray that lost a setting prints None here).
    assert float(driver_refresh) == float(worker_refresh) == LIMITS_REFRESH_S
    assert driver_thread == worker_thread == "False"
    # Ray Train's controller (a worker process of the job) collects reports every TRAIN_POLL_INTERVAL_S.
    assert float(worker_train_poll) == TRAIN_POLL_INTERVAL_S
    assert ATTACHED not in run.stderr
    assert len(sessions(ray_tmpdir)) == 1


def test_the_metadata_fetch_set_in_the_environment_wins(monkeypatch):
    before = metadata_on_thread()
    try:
        monkeypatch.setenv(METADATA_ENV_VAR, "1")
        fetch_metadata_on_thread(True)
        tune_executor()
        assert metadata_on_thread() is True
        monkeypatch.delenv(METADATA_ENV_VAR)
        tune_executor()
        assert metadata_on_thread() is False
    finally:
        fetch_metadata_on_thread(before)


def test_the_train_report_interval_set_in_the_environment_wins(monkeypatch):
    monkeypatch.delenv(TRAIN_POLL_ENV_VAR, raising=False)
    assert float(job_runtime_env()["env_vars"][TRAIN_POLL_ENV_VAR]) == TRAIN_POLL_INTERVAL_S
    monkeypatch.setenv(TRAIN_POLL_ENV_VAR, "1.5")
    runtime_env = job_runtime_env()
    assert runtime_env["env_vars"][TRAIN_POLL_ENV_VAR] == "1.5"
    assert "worker_process_setup_hook" in runtime_env  # the Data setting travels with it


def test_the_recorded_address_is_read_where_ray_keeps_it(ray_tmpdir, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmpdir))
    assert recorded_cluster_address() is None
    (ray_tmpdir / "ray").mkdir()
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text("127.0.0.1:6379\n")
    assert recorded_cluster_address() == "127.0.0.1:6379"


def test_is_listening_tells_a_live_port_from_a_dead_one():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert is_listening(f"127.0.0.1:{server.getsockname()[1]}")
    assert not is_listening(f"127.0.0.1:{free_port()}")
    assert not is_listening("not-an-address")
