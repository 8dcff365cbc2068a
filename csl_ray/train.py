"""The Ray Train driver: CSL on a `TorchTrainer` (Ray Train v2), with checkpoints, resume, W&B and a run directory.

    python jobs/train.py                                        # embedded default: tiny preset, built-in data
    python jobs/train.py --config exp.yaml ssl.tmp.mask_ratio=0.5 ray.num_workers=4 ray.use_gpu=true
    summary = train(load_config(preset="tiny"))                 # from Python

What runs where:
- The driver (`train`) attaches to `ray.address` / `RAY_ADDRESS` (set by `ray job submit`) or to a cluster started
  on this machine, or starts a local Ray sized for the job (csl_ray/ray_session.py), writes the run directory
  (`<train.output_dir>/<name>/`, see csl_ray/tracking.py), builds the Ray Data pipelines, fits the trainer and
  prints the result table.
- Each Train worker runs `train_worker`: a `TrainLoop` on its device, wrapped in DDP when there are several
  workers; labelled batches of B = global_batch_size / num_workers from the whole labelled set (every rank sees
  all of it, in its own order) and B unlabelled rows, each with its CutMix partner, per iteration from this rank's
  share of the unlabelled stream (`streaming_split(equal=True)`, so every rank runs the same number of steps). The
  schedule is per iteration, so the recipe does not depend on the worker count; the global batch is B x num_workers.
- Validation every `train.eval_every` iterations and at the end: the validation stream is split across the ranks
  before decoding (each image to one rank, `RunDataConfig`) and `evaluate` all-reduces the confusion matrix, so the
  mIoU is exactly the whole-set mIoU at 1/world_size of the decoding and forward passes.
- Checkpoints every `train.checkpoint_every` iterations and at every validation: rank 0 writes the loop state and
  the resolved config with a sha256 record (csl_ray/checkpoint.py) to a temp dir, and every rank calls
  `ray.train.report` (a barrier). Ray keeps the `ray.num_to_keep` best by mIoU plus the latest under
  `<ray.storage_path>/<name>/`. A worker failure restarts the group (up to `ray.max_failures` times), and
  re-running with the same `train.name` and storage resumes, from the newest checkpoint that verifies
  (csl_ray/resume.py; newer ones that do not are skipped and named); the data streams are re-planned from that
  iteration. (`ray.num_workers=0`, Train's in-process local mode for tests and debugging, keeps its latest
  checkpoint in the run directory and does not resume.)
- The controller-side `RunMonitor` (csl_ray/monitor.py) appends each report to metrics.jsonl and prints a one-line
  status.

Cluster use (`ray job submit`): the job's working dir is this checkout; Ray puts it first on PYTHONPATH of the
driver and of every worker on every node, so `csl_ray` is importable without installing it. Its dependencies must
be on the nodes: cluster.yaml's setup_commands install them (with the project); elsewhere list them in the
runtime_env's `pip`. Keep data and outputs out of the upload (`working_dir` honours .gitignore, which excludes
`data/` and `runs/`; the upload is capped at 512 MiB):

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env-json '{"pip": ["timm>=1.0", "wandb>=0.17", "matplotlib>=3.8"]}' \\
        -- python jobs/train.py --config exp.yaml data.root=s3://bucket/pascal ray.storage_path=s3://bucket/runs \\
           train.output_dir=/home/ubuntu/runs

Use an absolute `train.output_dir`: a relative one lands in the job's temporary working-dir copy. For online W&B
put WANDB_API_KEY in the job's environment (e.g. the runtime_env's `env_vars`); it is read from the environment
only and never written into the config, the run directory or the checkpoints.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
    UserCallback,
)

from csl_ray.bookkeeping import RunningMeans, remember_first, step_images
from csl_ray.cadence import Due, run_steps
from csl_ray.checkpoint import CheckpointError, load_state, write_checkpoint
from csl_ray.cli import format_summary
from csl_ray.config import Config, config_from_dict, config_to_dict, resolve_iterations
from csl_ray.data.ray_datasets import (
    RunDataConfig,
    RunDatasets,
    labeled_batches,
    unlabeled_batches,
    val_batches,
)
from csl_ray.data.shards import read_manifest
from csl_ray.data.streams import dataset_root
from csl_ray.loop import TrainLoop
from csl_ray.monitor import RunMonitor, quiet_worker_logs
from csl_ray.ray_session import init_ray
from csl_ray.resume import ResumePoint, require_resumable, resume_point
from csl_ray.tracking import RunDir, WandbRun, wandb_mode

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ the worker side


def _save_checkpoint(loop: TrainLoop, local_dir: str | None) -> ray.train.Checkpoint:
    """Rank 0's checkpoint (csl_ray/checkpoint.py's format) as a Ray Train checkpoint.

    Written to a fresh temp dir that Ray copies to storage and deletes; in local mode (no storage) to
    `local_dir`, replacing the previous checkpoint.
    """
    path = write_checkpoint(loop.state_dict(), loop.cfg, tempfile.mkdtemp(prefix="csl-ckpt-"))
    if local_dir is not None:
        shutil.rmtree(local_dir, ignore_errors=True)
        shutil.move(path, local_dir)
        path = Path(local_dir)
    return ray.train.Checkpoint.from_directory(str(path))


def restore(loop: TrainLoop, checkpoint: ray.train.Checkpoint | None) -> int:
    """Loads a checkpoint into the loop, if there is one; returns the iteration training continues from."""
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            loop.load_state_dict(load_state(path))
    return loop.step


class _Reporter:
    """The worker's bookkeeping after each step: running means, validation, checkpoints, W&B, `ray.train.report`.

    Reports happen every `logging.log_every` iterations, at every validation (`train.eval_every` and the last
    iteration) and at every checkpoint; every rank reports at the same iterations (`report` is a barrier).
    """

    def __init__(self, loop: TrainLoop, config: dict[str, Any], val_shard: Any, rank: int, world_size: int) -> None:
        self.loop, self.cfg, self.val_shard = loop, loop.cfg, val_shard
        self.rank, self.world_size = rank, world_size
        self.local_dir, self.storage = config["local_checkpoint_dir"], config["storage"]
        self.tracker = (  # W&B on world rank 0 only
            WandbRun.start(loop.cfg, config["wandb_mode"], config["name"], config["run_dir"], config["class_names"])
            if rank == 0
            else None
        )
        self.since_report, self.since_eval = RunningMeans(), RunningMeans()
        self.first_val: list[dict[str, torch.Tensor]] = []
        self.result: dict[str, Any] | None = None
        self.window: dict[str, float] = {}

    def validate(self) -> dict[str, Any]:
        batches = val_batches(self.val_shard)
        self.result = self.loop.validate(remember_first(batches, self.first_val))
        self.window = self.since_eval.pop()
        if self.tracker is not None:
            self.tracker.log_eval(self.loop.step, self.result)
        return self.result

    def after_step(self, metrics: dict[str, float], due: Due) -> None:
        step, log_cfg = self.loop.step, self.cfg.logging
        metrics = {k: v for k, v in metrics.items() if k != "step"}  # a counter, not a quantity to average
        self.since_report.add(metrics)
        self.since_eval.add(metrics)
        if not (due.log or due.checkpoint):  # a checkpoint travels with a report
            return
        report: dict[str, Any] = {**self.since_report.pop(), "step": step}
        if self.tracker is not None:
            self.tracker.log_scalars(step, report)
        if due.validate:
            report.update(self.validate())
        if due.checkpoint:
            # The checkpoint ranking key: its own val mIoU, or -1 (below every evaluated checkpoint) between
            # validations. Never NaN: Ray stores checkpoint metrics as JSON, where NaN comes back as null.
            miou = report.get("miou", math.nan)
            report["score"] = miou if math.isfinite(miou) else -1.0
        if self.tracker is not None and log_cfg.image_every and step % log_cfg.image_every == 0:
            self.tracker.log_images(step, step_images(self.loop, self.first_val[0] if self.first_val else None))
        checkpoint = _save_checkpoint(self.loop, self.local_dir) if due.checkpoint and self.rank == 0 else None
        try:
            ray.train.report(report, checkpoint=checkpoint, delete_local_checkpoint_after_upload=self.local_dir is None)
        except OSError as err:  # the upload to storage: a full disk, a lost bucket; only rank 0 uploads
            if checkpoint is None:
                raise
            raise CheckpointError(
                f"iteration {step}: writing the checkpoint to {self.storage} failed ({err}); the checkpoints before "
                "it are intact, and a re-run with the same train.name resumes from the newest"
            ) from err

    def finish(self, resumed: ResumePoint) -> dict[str, Any]:
        """The run's summary (what rank 0 returns to the driver), with the checkpoint this attempt started from."""
        result = self.result or self.validate()  # resumed at the end: score the final weights once more
        if self.tracker is not None:
            self.tracker.finish()
        return {
            "step": self.loop.step,
            "resumed_from": resumed.step,
            "resumed_checkpoint": resumed.checkpoint.path if resumed.checkpoint is not None else None,
            "skipped_checkpoints": list(resumed.skipped),
            "miou": result["miou"],
            "pixel_acc": result["pixel_acc"],
            "iou_per_class": result["iou_per_class"],
            "best_miou": self.loop.best_miou,
            "skipped_steps": self.loop.skipped_steps,
            "train": self.window,
        }


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The per-worker function of the TorchTrainer; returns (on rank 0) the run's final summary."""
    quiet_worker_logs()
    cfg = config_from_dict(config["cfg"], source="train_loop_config")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    loop = TrainLoop(cfg, ray.train.torch.get_device(), rank=rank, world_size=world_size)
    # A restarted group, or a re-run of the same name: Ray offers its latest checkpoint, the newest that verifies
    # is taken (the same choice the driver and the data planning made).
    resumed = resume_point(config["storage"], config["name"]) if ray.train.get_checkpoint() else ResumePoint(None, 0)
    require_resumable(resumed, config["name"])
    for reason in resumed.skipped if rank == 0 else ():
        log.warning("skipped a checkpoint that does not verify: %s", reason)
    restore(loop, resumed.checkpoint)
    if world_size > 1:
        loop.wrap_ddp()
    labeled = labeled_batches(ray.train.get_dataset_shard("labeled"), cfg, rank=rank)
    unlabeled = unlabeled_batches(ray.train.get_dataset_shard("unlabeled"), cfg) if cfg.ssl.enabled else None
    reporter = _Reporter(loop, config, ray.train.get_dataset_shard("val"), rank, world_size)
    run_steps(loop, labeled, unlabeled, reporter.after_step)
    return reporter.finish(resumed)


# ------------------------------------------------------------------------------------------------ the driver side


def run_name(cfg: Config) -> str:
    """`train.name`, else `csl-<backbone>-<timestamp>`; the name is the resume key in storage."""
    if cfg.train.name:
        if not re.fullmatch(r"[A-Za-z0-9_.=+-]+", cfg.train.name):
            raise ValueError(f"train.name {cfg.train.name!r}: use letters, digits and _ . = + - only")
        return cfg.train.name
    return f"csl-{cfg.model.backbone}-{datetime.now():%Y%m%d-%H%M%S}"


def storage_path(cfg: Config) -> str:
    """`ray.storage_path` (local dir or s3:// / gs:// URI), else `<train.output_dir>/ray`, made absolute."""
    path = cfg.ray.storage_path or str(Path(cfg.train.output_dir) / "ray")
    return path if "://" in path else str(Path(path).expanduser().resolve())


def resume_step(storage: str, name: str) -> int:
    """The iteration the run's workers resume at (0 for a new run): that of its newest registered checkpoint that
    verifies (csl_ray/resume.py), never a half-uploaded or corrupt one."""
    return resume_point(storage, name).step


def scaling_config(cfg: Config) -> ScalingConfig:
    """Workers and their resources; `ray.num_workers=0` is Train's in-process local mode (tests, debugging)."""
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    return ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources)


def build_trainer(
    cfg: Config, name: str, run: RunDir, callbacks: Sequence[UserCallback] = ()
) -> tuple[ray.train.torch.TorchTrainer, RunDatasets]:
    """The TorchTrainer of one run (also what each Tune trial fits) and its datasets (which log corrupt rows)."""
    local = cfg.ray.num_workers == 0
    storage = storage_path(cfg)
    datasets = RunDatasets(cfg, start_iteration=partial(resume_step, storage, name))
    loop_config = {
        "cfg": config_to_dict(cfg),
        "name": name,
        "storage": storage,
        "run_dir": str(run.path),
        "class_names": list(read_manifest(dataset_root(cfg))["class_names"]),
        "wandb_mode": wandb_mode(cfg.logging),
        "local_checkpoint_dir": str(run.path / "checkpoint") if local else None,
    }
    run_config = RunConfig(
        name=name,
        storage_path=storage,
        failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=cfg.ray.num_to_keep, checkpoint_score_attribute="score", checkpoint_score_order="max"
        ),
        callbacks=[RunMonitor(str(run.path), name, cfg.train.iterations), *callbacks],
        # The controller's INFO lines (worker-group starts, snapshots) would bury RunMonitor's status line.
        logging_config=LoggingConfig(log_level="WARNING"),
    )
    trainer = ray.train.torch.TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=scaling_config(cfg),
        run_config=run_config,
        datasets=datasets.for_trainer(),
        dataset_config=RunDataConfig(),
    )
    return trainer, datasets


def with_iterations(cfg: Config) -> Config:
    """`cfg` with train.iterations set, from train.epochs and the dataset's unlabelled rows when it is unset."""
    return resolve_iterations(cfg, read_manifest(dataset_root(cfg))["splits"].get("unlabeled", 0))


def fit(cfg: Config, callbacks: Sequence[UserCallback] = ()) -> dict[str, Any]:
    """Fits one run on the Ray cluster this process is connected to; writes and returns its summary.

    Args:
        cfg: the resolved config.
        callbacks: extra Train callbacks (Tune trials add TuneReportCallback).

    Returns:
        results.json's content: final `miou`, `pixel_acc`, `iou_per_class`, `class_names`, `best_miou`, `train`
        (means of the step metrics over the last validation interval: selected_ratio, pseudo_acc_*, losses),
        `step`, `resumed_from` (the iteration the last worker group started at), `resumed_checkpoint` (its
        checkpoint), `skipped_checkpoints` (newer ones that did not verify, with why), `run_dir`, `checkpoint`,
        `best_checkpoint`, `wall_time_s`.
    """
    cfg = with_iterations(cfg)
    name = run_name(cfg)
    run = RunDir(Path(cfg.train.output_dir).expanduser().resolve() / name)  # absolute: Ray processes have other cwds
    run.write_config(cfg)
    started = time.monotonic()
    # Checked before any worker starts: a run whose checkpoints all fail to verify stops here, in seconds, instead
    # of failing (and being retried) in every worker group.
    resumed = resume_point(storage_path(cfg), name)
    require_resumable(resumed, name)
    for reason in resumed.skipped:
        print(f"[{name}] skipping a checkpoint that does not verify: {reason}", file=sys.stderr, flush=True)
    if resumed.checkpoint is not None:
        print(f"[{name}] resuming from iteration {resumed.step} ({resumed.checkpoint.path})", flush=True)
    trainer, datasets = build_trainer(cfg, name, run, callbacks)
    result = trainer.fit()
    best = result.get_best_checkpoint("score", "max") if result.best_checkpoints else None
    summary = {
        **result.return_value,
        "class_names": trainer.train_loop_config["class_names"],
        "run_dir": str(run.path),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "best_checkpoint": best.path if best else None,
        "wall_time_s": time.monotonic() - started,
        "corrupt_rows": datasets.corrupt.rows(),
    }
    summary["iou_per_class"] = [None if math.isnan(v) else v for v in summary["iou_per_class"]]
    run.write_results(summary)
    run.plot()
    return summary


def train(cfg: Config) -> dict[str, Any]:
    """The whole job: Ray up (or attached), fit, results table on stdout; returns the summary."""
    started_here = init_ray(cfg)
    try:
        summary = fit(cfg)
    finally:
        if started_here:
            ray.shutdown()
    print(format_summary(summary), file=sys.stdout, flush=True)
    return summary
