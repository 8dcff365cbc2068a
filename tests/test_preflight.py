"""Clean errors on the CLI: every bad input a user can give the jobs ends in one `PROG: error: ...` line naming the key
(or file) and the value, exit status 2, no traceback, and nothing written: no run directory, no Ray started.

Each case runs the real job script in a subprocess, from an empty working directory and with a private Ray temp
dir, so whatever it would have created is visible.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from csl_ray.config import ConfigError, dump_config, load_config
from csl_ray.preflight import check_ray_address

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def run_job(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(cwd.parent / "ray-tmp")  # where a Ray started by the job would put its session
    return subprocess.run(
        [sys.executable, str(JOBS / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def assert_usage_error(run: subprocess.CompletedProcess, script: str, *needles: str) -> None:
    lines = run.stderr.splitlines()
    assert run.returncode == 2, run.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), run.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0]


def assert_nothing_written(workdir: Path) -> None:
    assert list(workdir.iterdir()) == []  # no runs/ (the default output dir), no run directory
    assert not (workdir.parent / "ray-tmp").exists()  # no Ray session


@pytest.fixture
def workdir(tmp_path) -> Path:
    """An empty working directory; the test's inputs live beside it, so anything inside it was written by the job."""
    path = tmp_path / "cwd"
    path.mkdir()
    return path


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    """Bad inputs built in the test: a regular file where a directory is expected, a dataset root whose manifest is
    not JSON, and a state dict that is not a backbone's."""
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("not a directory")
    garbled = tmp_path / "garbled-root"
    garbled.mkdir()
    (garbled / "manifest.json").write_text("{not json")
    wrong_layout = tmp_path / "weights.pth"
    torch.save({"head.weight": torch.zeros(2, 2)}, wrong_layout)
    with socket.socket() as probe:  # a port nothing listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        dead_address = f"127.0.0.1:{probe.getsockname()[1]}"
    return {"not_a_dir": not_a_dir, "garbled": garbled, "wrong_layout": wrong_layout, "dead_address": dead_address}


TRAIN_CASES = {
    "missing root": lambda i: (["data.root=/nonexistent/voc"], ("data.root", "/nonexistent/voc")),
    "unreadable root": lambda i: (
        [f"data.root={i['garbled']}"],
        ("data.root", str(i["garbled"]), "unreadable manifest"),
    ),
    "unknown backbone": lambda i: (["model.backbone=resnet9000"], ("model.backbone", "resnet9000", "timm.list_models")),
    "weights of another layout": lambda i: (
        [f"model.weights_file={i['wrong_layout']}", "model.backbone=resnet18", "model.packaged_weights=false"],
        ("model.weights_file", str(i["wrong_layout"]), "head.weight"),
    ),
    "missing weights": lambda i: (
        ["model.weights_file=/nonexistent/r18.pth", "model.packaged_weights=false"],
        ("model.weights_file", "/nonexistent/r18.pth"),
    ),
    "unwritable output": lambda i: (
        [f"train.output_dir={i['not_a_dir']}/runs"],
        ("train.output_dir", f"{i['not_a_dir']}/runs"),
    ),
    "unwritable storage": lambda i: (
        [f"ray.storage_path={i['not_a_dir']}/ray"],
        ("ray.storage_path", f"{i['not_a_dir']}/ray"),
    ),
    "unreachable cluster": lambda i: ([f"ray.address={i['dead_address']}"], ("ray.address", i["dead_address"])),
    "missing config file": lambda i: (["--config", "/nonexistent/exp.yaml"], ("/nonexistent/exp.yaml",)),
}
"""Case -> (inputs -> (command-line arguments, what the error line must name))."""


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_job_rejects_bad_input_in_one_line(case, inputs, workdir):
    args, needles = TRAIN_CASES[case](inputs)
    run = run_job("train.py", args, workdir)
    assert_usage_error(run, "train.py", *needles)
    assert_nothing_written(workdir)


def test_tune_job_runs_the_same_checks(inputs, workdir):
    args, needles = TRAIN_CASES["unknown backbone"](inputs)
    run = run_job("tune.py", ["--smoke", *args], workdir)
    assert_usage_error(run, "tune.py", *needles)
    assert_nothing_written(workdir)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A checkpoint directory as far as the evaluate job's checks read it (its config; the state is never loaded)."""
    path = tmp_path / "checkpoint"
    path.mkdir()
    dump_config(load_config(preset="tiny"), path / "config.yaml")
    (path / "state.pt").write_bytes(b"")
    return path


@pytest.mark.parametrize("flag", ["--root", "--json"])
def test_evaluate_job_rejects_bad_input_in_one_line(flag, checkpoint, inputs, workdir):
    value = "/nonexistent/voc" if flag == "--root" else f"{inputs['not_a_dir']}/scores.json"
    run = run_job("evaluate.py", [str(checkpoint), flag, value], workdir)
    assert_usage_error(run, "evaluate.py", "data.root" if flag == "--root" else flag, value)
    assert_nothing_written(workdir)


def test_an_unreachable_ray_address_env_is_named_and_local_or_auto_are_left_to_ray(inputs, monkeypatch):
    cfg = load_config(preset="tiny")
    monkeypatch.setenv("RAY_ADDRESS", f"ray://{inputs['dead_address']}")
    with pytest.raises(ConfigError, match=f"RAY_ADDRESS=ray://{inputs['dead_address']}: no Ray cluster answers"):
        check_ray_address(cfg)
    for address in ("local", "auto"):
        check_ray_address(load_config(preset="tiny", overrides=[f"ray.address={address}"]))
    monkeypatch.delenv("RAY_ADDRESS")
    check_ray_address(cfg)
