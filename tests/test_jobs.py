"""The job CLIs: every flag documented in --help, config resolution from the command line."""

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from csl_ray.cli import SMOKE_OVERRIDES, config_from_arguments
from csl_ray.config import load_config

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", JOBS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """Flags and positionals without a help sentence (argparse lists them in --help with nothing to say)."""
    return [action.dest for action in parser._actions if not (action.help or "").strip()]


def test_train_help_describes_the_embedded_default():
    out = subprocess.run(
        [sys.executable, str(JOBS / "train.py"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "embedded default" in out


@pytest.mark.parametrize("name", ["train", "evaluate", "tune"])
def test_every_flag_has_help(name):
    assert undocumented(job(name).build_parser()) == []


def test_config_from_arguments_order():
    parser = job("train").build_parser()
    cfg = config_from_arguments(parser.parse_args([]))
    assert cfg == load_config("tiny")  # no --config: the tiny preset
    smoke = config_from_arguments(parser.parse_args(["--smoke", "train.iterations=6", "--set", "ssl.tmp.block=4"]))
    assert smoke.train.iterations == 6  # the command line wins over --smoke
    assert smoke.ray.num_workers == 1 and smoke.ssl.tmp.block == 4
    assert f"train.eval_every={smoke.train.eval_every}" in SMOKE_OVERRIDES


def test_config_file_and_its_preset(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("preset: cityscapes\nssl:\n  tmp:\n    mask_ratio: 0.5\n")
    cfg = config_from_arguments(job("train").build_parser().parse_args(["--config", str(path), "optim.lr=0.01"]))
    assert (cfg.data.num_classes, cfg.ssl.tmp.mask_ratio, cfg.optim.lr) == (19, 0.5, 0.01)


def test_bad_override_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        job("train").main(["ssl.tmp.mask_ratio=2"])
    assert exit_info.value.code == 2
    assert "ssl.tmp.mask_ratio" in capsys.readouterr().err


@pytest.mark.slow
def test_embedded_default_finishes_with_a_result_table(tmp_path):
    """`python jobs/train.py` as a user runs it: 2 workers, the `tiny` preset's iterations, validations mid-run (a
    Ray Data configuration once hung here at the first validation), quiet worker logs."""
    run = subprocess.run(
        [sys.executable, str(JOBS / "train.py")], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "val mIoU" in run.stdout and "pseudo-label accuracy selected" in run.stdout
    assert "TrainingReport" not in out  # Ray's per-report lines are silenced in the workers
    results = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/results.json")]
    assert len(results) == 1 and results[0]["step"] == load_config(preset="tiny").train.iterations
