"""The Ray Train driver: real 2-worker runs on the built-in dataset, fault recovery, resume, W&B, run directory."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from test_step import synthetic_batch

from csl_ray.config import load_config
from csl_ray.data.builtin import ensure_builtin_dataset
from csl_ray.loop import TrainLoop
from csl_ray.tracking import RunDir, wandb_mode
from csl_ray.train import (
    CHECKPOINT_FILE,
    FAIL_AT_STEP_ENV,
    RunMonitor,
    RunningMeans,
    _save_checkpoint,
    draw_pseudo_labels,
    evaluate_checkpoint,
    fit,
    format_summary,
    restore,
    resume_step,
    storage_path,
)

SECRET = "wandb-test-secret-0123456789abcdef0123456789"


def small_dataset(tmp_path_factory) -> str:
    """A built-in dataset of 16 labelled, 64 unlabelled and 8 val images of 48 px, drawn once per test session."""
    cache = tmp_path_factory.getbasetemp() / "builtin"
    return str(ensure_builtin_dataset(cache, num_labeled=16, num_unlabeled=64, num_val=8, size=48))


def tiny(root: str, out: Path, name: str, *overrides: str):
    """The tiny preset shrunk to seconds: 32 px crops, resnet18, 2 images per worker, 4 iterations."""
    return load_config(
        preset="tiny",
        overrides=[
            f"data.root={root}",
            "data.crop_size=32",
            "data.global_batch_size=4",
            "train.iterations=4",
            "ssl.warmup_iterations=0",
            "train.eval_every=4",
            "train.checkpoint_every=2",
            "logging.log_every=1",
            "logging.image_every=0",
            "ray.max_failures=0",
            f"train.output_dir={out}",
            f"train.name={name}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def recovered_run(ray_session, tmp_path_factory):
    """2 CPU workers, 4 iterations; rank 0 raises once after iteration 3, so the group restarts from iteration 2."""
    out = tmp_path_factory.mktemp("runs")
    cfg = tiny(small_dataset(tmp_path_factory), out, "recover", "ray.max_failures=1")
    os.environ[FAIL_AT_STEP_ENV] = "3"
    try:
        summary = fit(cfg)
    finally:
        del os.environ[FAIL_AT_STEP_ENV]
    return cfg, summary


def test_two_workers_recover_from_a_failure_and_finish_every_iteration(recovered_run):
    cfg, summary = recovered_run
    assert summary["step"] == cfg.train.iterations
    assert summary["resumed_from"] == 2  # the last attempt started from the checkpoint before the failure
    assert (Path(storage_path(cfg)) / "recover" / ".injected_failure_at_3").exists()
    assert math.isfinite(summary["miou"]) and 0 <= summary["miou"] <= 100
    assert len(summary["iou_per_class"]) == cfg.data.num_classes == len(summary["class_names"])
    assert 0 <= summary["train"]["selected_ratio"] <= 1 and math.isfinite(summary["train"]["loss"])
    assert (Path(summary["checkpoint"]) / CHECKPOINT_FILE).is_file()
    assert (Path(summary["best_checkpoint"]) / "config.yaml").is_file()


def test_run_directory_holds_config_metrics_results_and_curves(recovered_run):
    cfg, summary = recovered_run
    run = RunDir(summary["run_dir"])
    assert load_config(path=run.config).ssl.tmp.mask_ratio == cfg.ssl.tmp.mask_ratio
    rows = run.read_metrics()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # step 3 was reported twice (before and after the restart)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert math.isfinite(rows[-1]["miou"])
    assert json.loads(run.results.read_text())["step"] == 4
    assert (run.path / "miou.png").is_file() and (run.path / "selected_ratio.png").is_file()
    assert "pseudo-label accuracy selected" in format_summary(summary)


def test_rerun_with_the_same_name_resumes_at_the_saved_iteration(recovered_run, ray_session):
    cfg, _ = recovered_run
    assert resume_step(storage_path(cfg), "recover") == 4
    more = tiny(cfg.data.root, Path(cfg.train.output_dir), "recover", "train.iterations=6", "train.eval_every=6")
    summary = fit(more)
    assert (summary["resumed_from"], summary["step"]) == (4, 6)
    rows = RunDir(summary["run_dir"]).read_metrics()
    assert [r["step"] for r in rows][-2:] == [5, 6]


def test_evaluate_checkpoint_scores_and_draws_overlays_and_pseudo_labels(recovered_run, tmp_path):
    _, summary = recovered_run
    result = evaluate_checkpoint(summary["checkpoint"], mode="center_crop", overlays=tmp_path, num_overlays=2)
    assert result["step"] == 4 and result["mode"] == "center_crop"
    assert math.isfinite(result["miou"])
    assert len(list(tmp_path.glob("*.png"))) == 2
    figure = draw_pseudo_labels(summary["checkpoint"], tmp_path / "figure" / "pseudo.png", num_images=3)
    assert figure.is_file() and figure.stat().st_size > 0


def test_checkpoint_restores_step_and_optimizer_state(tmp_path):
    cfg = load_config(preset="tiny", overrides=["data.num_classes=3", "data.crop_size=32"])
    loop = TrainLoop(cfg, "cpu")
    for seed in range(2):
        loop.train_step(*synthetic_batch(seed=seed))
    _save_checkpoint(TrainLoop(cfg, "cpu"), str(tmp_path / "checkpoint"))
    checkpoint = _save_checkpoint(loop, str(tmp_path / "checkpoint"))  # local mode: replaces the previous one
    assert sorted(p.name for p in Path(checkpoint.path).iterdir()) == ["config.yaml", CHECKPOINT_FILE]
    assert load_config(path=Path(checkpoint.path) / "config.yaml") == cfg
    resumed = TrainLoop(cfg, "cpu")
    assert restore(resumed, checkpoint) == 2 and restore(TrainLoop(cfg, "cpu"), None) == 0
    saved, loaded = loop.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for key, value in saved["state"].items():
        assert torch.equal(value["momentum_buffer"], loaded["state"][key]["momentum_buffer"])


def test_wandb_offline_writes_a_run_and_never_the_key(ray_session, tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny(
        small_dataset(tmp_path_factory),
        tmp_path,
        "wandb",
        "ray.num_workers=0",  # Train's local mode: this process is the worker, so it sees the patched env
        "train.iterations=2",
        "train.eval_every=2",
        "logging.wandb=true",
        "logging.mode=offline",
        "logging.image_every=2",
    )
    summary = fit(cfg)
    assert summary["step"] == 2 and isinstance(summary["checkpoint"], str)
    runs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert list(runs[0].glob("files/media/images/*")), "images were logged"
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_wandb_mode_resolution():
    on = load_config(overrides=["logging.wandb=true"]).logging
    assert wandb_mode(on, {}) == "offline"
    assert wandb_mode(on, {"WANDB_API_KEY": SECRET}) == "online"
    assert wandb_mode(on, {"WANDB_API_KEY": SECRET, "WANDB_MODE": "disabled"}) == "disabled"
    assert wandb_mode(load_config(overrides=["logging.mode=offline"]).logging, {"WANDB_API_KEY": SECRET}) == "offline"
    assert wandb_mode(load_config(overrides=["logging.wandb=false"]).logging, {"WANDB_API_KEY": SECRET}) == "disabled"


def test_running_means_and_monitor_rows(tmp_path, capsys):
    means = RunningMeans()
    means.add({"loss": 1.0, "selected_ratio": 0.5})
    means.add({"loss": 3.0})
    assert means.pop() == {"loss": 2.0, "selected_ratio": 0.5} and means.pop() == {}
    monitor = RunMonitor(str(tmp_path), "run", total=10)
    monitor.after_report(None, [{"step": 2, "loss": 1.5}], None)
    monitor.after_report(None, [{"step": 4, "loss": 1.0, "miou": 40.0, "best_miou": 40.0}], None)
    rows = RunDir(tmp_path).read_metrics()
    assert [r["step"] for r in rows] == [2, 4] and rows[1]["miou"] == 40.0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[run] step 2/10 | loss 1.500") and "val mIoU 40.00" in out[1] and "eta" in out[1]
