"""Faults from outside the training code: storage that fills up during a checkpoint, and a driver killed mid-run.

(A Train worker killed mid-run and corrupt checkpoints are in test_train.py, on its shared run.)
"""

import errno
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from ray import cloudpickle
from test_step import synthetic_batch
from test_train import small_dataset, tiny, tiny_overrides

import csl_ray.train
from csl_ray.checkpoint import write_checkpoint
from csl_ray.loop import TrainLoop
from csl_ray.resume import resume_point
from csl_ray.tracking import RunDir
from csl_ray.train import fit, resume_step, storage_path

JOBS = Path(__file__).resolve().parents[1] / "jobs"

# The filesystem below travels to the Train controller and worker inside RunConfig; they cannot import test modules,
# so Ray's cloudpickle sends its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class _CountingFile:
    """A writable file that raises ENOSPC once its filesystem has written `budget` bytes in this process."""

    def __init__(self, target, handler) -> None:
        self.target, self.handler, self.closed = target, handler, False

    def write(self, data) -> int:
        self.handler.written += len(data)
        if self.handler.written > self.handler.budget:
            raise OSError(errno.ENOSPC, "No space left on device (test filesystem full)")
        return self.target.write(data)

    def flush(self) -> None:
        self.target.flush()

    def close(self) -> None:
        self.closed = True
        self.target.close()


class FillingUpHandler(pafs.FileSystemHandler):
    """The local filesystem, except that writes fail after `budget` bytes (per process, as a full disk would)."""

    def __init__(self, budget: int) -> None:
        self.budget, self.written, self.local = budget, 0, pafs.LocalFileSystem()

    def __reduce__(self):
        return FillingUpHandler, (self.budget,)

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_CountingFile(self.local.open_output_stream(path), self), mode="w")

    def open_append_stream(self, path, metadata):
        return pa.PythonFile(_CountingFile(self.local.open_append_stream(path), self), mode="w")

    def get_type_name(self):
        return "filling-up"

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refusing to empty the root directory")

    def delete_file(self, path):
        self.local.delete_file(path)

    def move(self, src, dest):
        self.local.move(src, dest)

    def copy_file(self, src, dest):
        with self.local.open_input_stream(src) as source, self.open_output_stream(dest, None) as target:
            target.write(source.read())

    def open_input_stream(self, path):
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        return self.local.open_input_file(path)

    def normalize_path(self, path):
        return self.local.normalize_path(path)

    def equals(self, other):
        return isinstance(other, FillingUpHandler) and other.budget == self.budget


def checkpoint_bytes(cfg) -> int:
    """Bytes of one checkpoint of this config after a training step (momentum buffers and all)."""
    loop = TrainLoop(cfg, "cpu")
    loop.train_step(*synthetic_batch(seed=0))
    path = write_checkpoint(loop.state_dict(), cfg, Path(os.environ.get("TMPDIR", "/tmp")) / f"size-{os.getpid()}")
    return sum(f.stat().st_size for f in path.iterdir())


def test_storage_that_fills_up_during_a_checkpoint_keeps_the_previous_one_and_a_rerun_resumes(
    ray_session, tmp_path, tmp_path_factory, monkeypatch
):
    cfg = tiny(small_dataset(tmp_path_factory), tmp_path, "full", "ray.num_workers=1")
    budget = int(1.5 * checkpoint_bytes(cfg))  # the first checkpoint fits, the second does not
    full = pafs.PyFileSystem(FillingUpHandler(budget))
    # The test's only hook: the trainer's RunConfig gets the filling-up filesystem as its storage filesystem.
    monkeypatch.setattr(csl_ray.train, "RunConfig", functools.partial(csl_ray.train.RunConfig, storage_filesystem=full))
    with pytest.raises(Exception) as error:
        fit(cfg)
    message = str(error.value)
    assert "No space left on device" in message and "iteration 4" in message, message
    previous = resume_point(storage_path(cfg), "full")
    assert (previous.step, previous.skipped) == (2, ())  # verified: the failed write left it intact
    monkeypatch.undo()
    summary = fit(cfg)
    assert (summary["resumed_from"], summary["step"]) == (2, cfg.train.iterations)


@pytest.mark.slow
def test_a_killed_driver_resumes_from_the_latest_checkpoint_when_run_again(ray_session, tmp_path, tmp_path_factory):
    """`python jobs/train.py` attached to this session's Ray, SIGKILLed once a checkpoint is registered (its Train
    controller and workers die with it), then the same command again."""
    overrides = tiny_overrides(
        small_dataset(tmp_path_factory), tmp_path, "driver", "train.iterations=24", "train.eval_every=24"
    )
    command = [sys.executable, str(JOBS / "train.py"), *overrides]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    storage = str(tmp_path / "ray")
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while resume_step(storage, "driver") == 0 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        killed_at = resume_step(storage, "driver")
        assert driver.poll() is None and killed_at > 0, (tmp_path / "first.log").read_text()[-3000:]
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    summary = json.loads(RunDir(tmp_path / "driver").results.read_text())
    # The latest checkpoint when the driver died (or one registered while the kill was on its way).
    assert killed_at <= summary["resumed_from"] < 24 and summary["step"] == 24
    assert f"resuming from iteration {summary['resumed_from']}" in again.stdout
