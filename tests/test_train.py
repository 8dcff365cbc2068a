"""The Ray Train driver: real 2-worker runs on the built-in dataset, a worker killed mid-run, resume, W&B, run
directory. Every test that changes a run works on its own run or its own copy of one."""

import json
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from test_step import synthetic_batch

from csl_ray.bookkeeping import RunningMeans
from csl_ray.checkpoint import STATE_FILE, CheckpointError, load_state, verify_checkpoint
from csl_ray.cli import format_summary
from csl_ray.config import load_config
from csl_ray.data.builtin import ensure_builtin_dataset
from csl_ray.loop import TrainLoop
from csl_ray.monitor import RunMonitor
from csl_ray.offline_eval import draw_pseudo_labels, evaluate_checkpoint
from csl_ray.tracking import RunDir, wandb_mode
from csl_ray.train import _save_checkpoint, fit, restore, resume_step, storage_path

SECRET = "wandb-test-secret-0123456789abcdef0123456789"


def small_dataset(tmp_path_factory) -> str:
    """A built-in dataset of 16 labelled, 64 unlabelled and 8 val images of 48 px, drawn once per test session."""
    cache = tmp_path_factory.getbasetemp() / "builtin"
    return str(ensure_builtin_dataset(cache, num_labeled=16, num_unlabeled=64, num_val=8, size=48))


def tiny_overrides(root: str, out: Path, name: str, *overrides: str) -> list[str]:
    """The tiny preset shrunk to seconds: 32 px crops, 2 images per worker, 4 iterations."""
    return [
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
    ]


def tiny(root: str, out: Path, name: str, *overrides: str):
    return load_config(preset="tiny", overrides=tiny_overrides(root, out, name, *overrides))


def train_worker_pids() -> list[int]:
    """Process ids of this Ray session's live Train workers (GCS actor table: needs no dashboard, and sees only
    the cluster this process is connected to, never another Ray on the machine)."""
    from ray._private import state

    actors = state.actors().values()
    return [a["Pid"] for a in actors if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"]


class KillAfterCheckpoint(threading.Thread):
    """SIGKILLs one Train worker process once the run has registered a checkpoint; records the iteration then."""

    def __init__(self, storage: str, name: str, timeout_s: float = 600) -> None:
        super().__init__(daemon=True)
        self.storage, self.name, self.timeout_s = storage, name, timeout_s
        self.killed_at: int | None = None  # the latest registered checkpoint's iteration when the worker died
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            step = resume_step(self.storage, self.name)
            pids = train_worker_pids()
            if step > 0 and pids:
                os.kill(pids[-1], signal.SIGKILL)
                self.killed_at = step
                return
            time.sleep(0.1)


@pytest.fixture(scope="module")
def recovered_run(ray_session, tmp_path_factory):
    """2 CPU workers, 24 iterations with a checkpoint every 2; one worker process is SIGKILLed from outside
    after the first registered checkpoint, so the group restarts from the latest checkpoint."""
    out = tmp_path_factory.mktemp("runs")
    cfg = tiny(
        small_dataset(tmp_path_factory), out, "recover", "train.iterations=24", "train.eval_every=24",
        "ray.max_failures=1",
    )  # fmt: skip
    killer = KillAfterCheckpoint(storage_path(cfg), "recover")
    killer.start()
    try:
        summary = fit(cfg)
    finally:
        killer.stop.set()
        killer.join()
    return cfg, summary, killer.killed_at


def test_a_killed_worker_process_restarts_the_group_from_the_last_checkpoint(recovered_run):
    cfg, summary, killed_at = recovered_run
    assert killed_at is not None, "the run finished before a worker could be killed"
    assert summary["step"] == cfg.train.iterations
    # A fresh run name: the last attempt started from a checkpoint only because the group restarted, and from the
    # one registered when the worker died (or a later one, registered while the kill was on its way).
    assert 0 < killed_at <= summary["resumed_from"] < cfg.train.iterations
    assert summary["resumed_from"] % cfg.train.checkpoint_every == 0
    rows = RunDir(summary["run_dir"]).read_metrics()
    steps = [r["step"] for r in rows]
    assert steps[-1] == cfg.train.iterations and set(steps) == set(range(1, cfg.train.iterations + 1))
    # Nothing up to the checkpoint was reported twice (read_metrics keeps one row per step, so read every row): the
    # new group continued from the checkpoint, not from the start.
    reported = [json.loads(line)["step"] for line in RunDir(summary["run_dir"]).metrics.read_text().splitlines()]
    assert all(reported.count(step) == 1 for step in range(1, summary["resumed_from"] + 1)), reported
    assert math.isfinite(summary["miou"]) and 0 <= summary["miou"] <= 100
    assert len(summary["iou_per_class"]) == cfg.data.num_classes == len(summary["class_names"])
    assert 0 <= summary["train"]["selected_ratio"] <= 1 and math.isfinite(summary["train"]["loss"])
    assert verify_checkpoint(summary["checkpoint"]) == cfg.train.iterations
    assert (Path(summary["best_checkpoint"]) / "config.yaml").is_file()


def test_run_directory_holds_config_metrics_results_and_curves(recovered_run):
    cfg, summary, _ = recovered_run
    run = RunDir(summary["run_dir"])
    assert load_config(path=run.config).ssl.tmp.mask_ratio == cfg.ssl.tmp.mask_ratio
    rows = run.read_metrics()
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert math.isfinite(rows[-1]["miou"])
    assert json.loads(run.results.read_text())["step"] == cfg.train.iterations
    assert (run.path / "miou.png").is_file() and (run.path / "selected_ratio.png").is_file()
    assert "pseudo-label accuracy selected" in format_summary(summary)


def copy_run(cfg, name: str, out: Path) -> None:
    """Copies a finished run's storage folder and run directory under `out`, so a test can extend it alone."""
    shutil.copytree(Path(storage_path(cfg)) / name, out / "ray" / name)
    shutil.copytree(Path(cfg.train.output_dir) / name, out / name)


def test_rerun_with_the_same_name_resumes_at_the_saved_iteration(recovered_run, ray_session, tmp_path):
    cfg, _, _ = recovered_run
    copy_run(cfg, "recover", tmp_path)
    assert resume_step(str(tmp_path / "ray"), "recover") == cfg.train.iterations
    total = cfg.train.iterations + 2
    more = tiny(cfg.data.root, tmp_path, "recover", f"train.iterations={total}", f"train.eval_every={total}")
    summary = fit(more)
    assert (summary["resumed_from"], summary["step"]) == (cfg.train.iterations, total)
    rows = RunDir(summary["run_dir"]).read_metrics()
    assert [r["step"] for r in rows][-2:] == [total - 1, total]


def checkpoints_newest_first(storage: Path, name: str) -> list[Path]:
    return sorted((p for p in (storage / name).glob("checkpoint_*") if p.is_dir()), reverse=True)


def test_rerun_skips_a_truncated_latest_checkpoint_and_resumes_from_the_one_before(
    recovered_run, ray_session, tmp_path, capfd
):
    """The issue's case: the latest state.pt cut to 1,000 bytes (a crash during upload), then the same name with
    more iterations: resumes from the newest checkpoint that verifies, names the one it skipped, and finishes."""
    cfg, _, _ = recovered_run
    copy_run(cfg, "recover", tmp_path)
    latest, earlier = checkpoints_newest_first(tmp_path / "ray", "recover")[:2]
    earlier_step = verify_checkpoint(earlier)
    with open(latest / STATE_FILE, "r+b") as f:
        f.truncate(1000)
    total = cfg.train.iterations + 2
    more = tiny(cfg.data.root, tmp_path, "recover", f"train.iterations={total}", f"train.eval_every={total}")
    summary = fit(more)
    assert (summary["resumed_from"], summary["step"]) == (earlier_step, total)
    assert Path(summary["resumed_checkpoint"]) == earlier
    assert [str(latest / STATE_FILE) in reason for reason in summary["skipped_checkpoints"]] == [True]
    assert f"skipping a checkpoint that does not verify: {latest / STATE_FILE}" in capfd.readouterr().err


def test_a_run_whose_checkpoints_all_fail_to_verify_stops_at_once_naming_them(recovered_run, ray_session, tmp_path):
    cfg, _, _ = recovered_run
    copy_run(cfg, "recover", tmp_path)
    checkpoints = checkpoints_newest_first(tmp_path / "ray", "recover")
    for checkpoint in checkpoints:
        with open(checkpoint / STATE_FILE, "r+b") as f:
            f.truncate(1000)
    more = tiny(cfg.data.root, tmp_path, "recover", f"train.iterations={cfg.train.iterations + 2}")
    started = time.monotonic()
    with pytest.raises(CheckpointError) as error:
        fit(more)
    assert time.monotonic() - started < 60
    assert all(str(c / STATE_FILE) in str(error.value) for c in checkpoints) and len(checkpoints) >= 2


def test_evaluate_checkpoint_scores_and_draws_overlays_and_pseudo_labels(recovered_run, tmp_path):
    cfg, summary, _ = recovered_run
    result = evaluate_checkpoint(summary["checkpoint"], mode="center_crop", overlays=tmp_path, num_overlays=2)
    assert result["step"] == cfg.train.iterations and result["mode"] == "center_crop"
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
    assert sorted(p.name for p in Path(checkpoint.path).iterdir()) == ["checkpoint.json", "config.yaml", STATE_FILE]
    assert load_config(path=Path(checkpoint.path) / "config.yaml") == cfg
    assert verify_checkpoint(checkpoint.path) == 2 and load_state(checkpoint.path)["step"] == 2
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
