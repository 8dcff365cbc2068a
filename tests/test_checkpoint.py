"""The checkpoint format: a record that proves the state file, errors that name the file, and offline evaluation
that reads checkpoints without importing Ray."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from csl_ray.checkpoint import (
    RECORD_FILE,
    STATE_FILE,
    CheckpointError,
    checkpoint_of,
    load_state,
    load_student,
    verify_checkpoint,
    write_checkpoint,
)
from csl_ray.config import load_config
from csl_ray.data.builtin import ensure_builtin_dataset
from csl_ray.loop import TrainLoop

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def toy_state(step: int) -> dict:
    return {"step": step, "student": {"w": torch.arange(4.0)}}


def test_a_written_checkpoint_verifies_and_loads(tmp_path):
    cfg = load_config(preset="tiny")
    path = write_checkpoint(toy_state(7), cfg, tmp_path / "ckpt")
    assert json.loads((path / RECORD_FILE).read_text())["step"] == 7
    assert verify_checkpoint(path) == 7
    state = load_state(path)
    assert state["step"] == 7 and torch.equal(state["student"]["w"], torch.arange(4.0))
    assert load_config(path=path / "config.yaml") == cfg


def test_a_truncated_state_file_fails_to_verify_naming_the_file(tmp_path):
    path = write_checkpoint(toy_state(3), load_config(preset="tiny"), tmp_path / "ckpt")
    data = (path / STATE_FILE).read_bytes()
    (path / STATE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path / STATE_FILE)):
        verify_checkpoint(path)
    with pytest.raises(CheckpointError, match="sha256"):
        load_state(path)


def test_a_checkpoint_without_its_record_or_state_file_fails_naming_the_file(tmp_path):
    path = write_checkpoint(toy_state(3), load_config(preset="tiny"), tmp_path / "ckpt")
    (path / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{path / STATE_FILE}: missing"):
        load_state(path)
    (path / RECORD_FILE).unlink()
    with pytest.raises(CheckpointError, match=str(path / RECORD_FILE)):
        verify_checkpoint(path)


def test_a_state_file_that_verifies_but_holds_another_iteration_is_rejected(tmp_path):
    path = write_checkpoint(toy_state(3), load_config(preset="tiny"), tmp_path / "ckpt")
    record = json.loads((path / RECORD_FILE).read_text())
    (path / RECORD_FILE).write_text(json.dumps({**record, "step": 5}))
    with pytest.raises(CheckpointError, match="holds iteration 3, its record says 5"):
        load_state(path)


def test_checkpoint_of_a_run_directory_is_its_best_checkpoint(tmp_path):
    best = write_checkpoint(toy_state(2), load_config(preset="tiny"), tmp_path / "best")
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"best_checkpoint": str(best), "checkpoint": "elsewhere"}))
    assert checkpoint_of(run) == best and checkpoint_of(best) == best
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        checkpoint_of(tmp_path)


def test_evaluate_job_scores_a_checkpoint_without_importing_ray(tmp_path):
    """jobs/evaluate.py end to end in a fresh interpreter (score, overlays, pseudo-label figure); Ray never loads."""
    root = ensure_builtin_dataset(tmp_path / "data", num_labeled=4, num_unlabeled=4, num_val=2, size=32)
    overrides = [f"data.root={root}", "data.crop_size=32", "model.packaged_weights=false"]
    cfg = load_config(preset="tiny", overrides=overrides)
    checkpoint = write_checkpoint(TrainLoop(cfg, "cpu").state_dict(), cfg, tmp_path / "ckpt")
    assert load_student(checkpoint, device="cpu")[2] == 0
    argv = [str(JOBS / "evaluate.py"), str(checkpoint), "--device", "cpu", "--overlays", str(tmp_path / "ov")]
    argv += ["--num-overlays", "1", "--pseudo-labels", str(tmp_path / "pl.png"), "--num-pseudo-labels", "2"]
    script = (
        "import runpy, sys\n"
        f"sys.argv = {argv!r}\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))[:5]\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "mIoU" in run.stdout and (tmp_path / "pl.png").is_file() and list((tmp_path / "ov").glob("*.png"))
