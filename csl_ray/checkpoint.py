"""The checkpoint format: one directory per checkpoint that proves itself before it is trusted.

    <checkpoint>/state.pt         TrainLoop.state_dict() (student, teacher, optimiser, step, RNG, best mIoU)
    <checkpoint>/config.yaml      the resolved config (jobs/evaluate.py rebuilds the model from it)
    <checkpoint>/checkpoint.json  {"step": N, "state_sha256": "..."}: written last, from the bytes on disk

A checkpoint verifies when its record exists and the sha256 of state.pt equals the recorded one: a state file cut
short by a crash during upload, or never finished, fails here with an error naming the file instead of failing
inside torch.load. Loads use `weights_only=True` (tensors and plain values only). No Ray here: offline evaluation
reads checkpoints without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from csl_ray.config import Config, dump_config, load_config
from csl_ray.data.shards import file_sha256
from csl_ray.model import build_model

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
RECORD_FILE = "checkpoint.json"
RESULTS_FILE = "results.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, does not verify or does not load (the message names the file)."""


def write_checkpoint(state: dict[str, Any], cfg: Config, directory: str | os.PathLike) -> Path:
    """Writes a loop state and its config into `directory` (created), the record last; returns the directory."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / STATE_FILE)
    dump_config(cfg, path / CONFIG_FILE)
    # Hashed from the file as written, so the record vouches for the bytes a later reader will see.
    record = {"step": int(state["step"]), "state_sha256": file_sha256(path / STATE_FILE)}
    (path / RECORD_FILE).write_text(json.dumps(record) + "\n")
    return path


def verify_checkpoint(directory: str | os.PathLike) -> int:
    """Checks a checkpoint directory against its record; returns the iteration it was written at.

    Raises:
        CheckpointError naming the file that is missing or whose sha256 differs from the record.
    """
    path = Path(directory)
    record_path, state_path = path / RECORD_FILE, path / STATE_FILE
    try:
        record = json.loads(record_path.read_text())
        step, expected = int(record["step"]), str(record["state_sha256"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{record_path}: no readable checkpoint record ({err})") from err
    if not state_path.is_file():
        raise CheckpointError(f"{state_path}: missing")
    actual = file_sha256(state_path)
    if actual != expected:
        size = state_path.stat().st_size
        raise CheckpointError(
            f"{state_path}: sha256 {actual[:12]}... ({size} bytes) differs from the record's {expected[:12]}... "
            "(cut short or changed after it was written)"
        )
    return step


def load_state(directory: str | os.PathLike) -> dict[str, Any]:
    """The verified loop state of a checkpoint directory, on the CPU.

    Raises:
        CheckpointError naming the file when it does not verify or does not load.
    """
    step = verify_checkpoint(directory)
    state_path = Path(directory) / STATE_FILE
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, pickle errors, EOFError... for a bad file
        raise CheckpointError(f"{state_path}: does not load ({err})") from err
    if int(state["step"]) != step:
        raise CheckpointError(f"{state_path}: holds iteration {state['step']}, its record says {step}")
    return state


def checkpoint_of(path: str | os.PathLike) -> Path:
    """A checkpoint directory itself, or the best (else latest) checkpoint named by a run directory's results.json.

    Raises:
        CheckpointError when `path` is neither.
    """
    path = Path(path)
    if (path / RESULTS_FILE).is_file():
        results = json.loads((path / RESULTS_FILE).read_text())
        path = Path(results["best_checkpoint"] or results["checkpoint"])
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"{path}: not a checkpoint directory (no {STATE_FILE}) or run directory (no {RESULTS_FILE})"
        )
    return path


def load_student(
    checkpoint: str | os.PathLike, root: str | None = None, device: str | None = None
) -> tuple[Config, torch.nn.Module, int]:
    """A checkpoint's config (with `data.root` replaced by `root` when given), its student on `device` (default
    CUDA when available, else CPU) and the iteration it was saved at."""
    path = Path(checkpoint)
    cfg = load_config(path=path / CONFIG_FILE)
    cfg.data.root = root or cfg.data.root
    state = load_state(path)
    model = build_model(cfg)
    model.load_state_dict(state["student"])
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return cfg, model, int(state["step"])
