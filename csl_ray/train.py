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
- Checkpoints every `train.checkpoint_every` iterations and at every validation: rank 0 writes the loop state
  (student, teacher, optimiser, step, RNG, best mIoU) and the resolved config to a temp dir, and every rank calls
  `ray.train.report` (a barrier). Ray keeps the `ray.num_to_keep` best by mIoU plus the latest under
  `<ray.storage_path>/<name>/`. A worker failure restarts the group from the latest checkpoint (up to
  `ray.max_failures` times); re-running with the same `train.name` and storage resumes the same way, and the data
  streams are re-planned from the resumed iteration. (`ray.num_workers=0`, Train's in-process local mode for
  tests and debugging, keeps its latest checkpoint in the run directory and does not resume.)
- The controller-side `RunMonitor` appends each report to metrics.jsonl and prints a one-line status.

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

Fault injection for tests: with `CSL_RAY_FAIL_AT_STEP=N` in the driver's environment, rank 0 raises once after
iteration N; a marker file in the run's storage makes the restarted group pass N without raising again.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
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

from csl_ray.config import (
    PRESETS,
    Config,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    resolve_iterations,
)
from csl_ray.data.ray_datasets import (
    RunDataConfig,
    RunDatasets,
    labeled_batches,
    unlabeled_batches,
    val_batches,
)
from csl_ray.data.reader import iter_local
from csl_ray.data.shards import read_manifest
from csl_ray.data.streams import dataset_root
from csl_ray.evaluate import eval_options, evaluate
from csl_ray.loop import TrainLoop
from csl_ray.model import build_model
from csl_ray.ray_session import init_ray
from csl_ray.selection import build_selector
from csl_ray.tracking import (
    RunDir,
    WandbRun,
    chw_to_hwc,
    label_rgb,
    overlay,
    pseudo_label_panels,
    val_panels,
    wandb_mode,
    weight_rgb,
    write_overlays,
    write_pseudo_label_figure,
)

FAIL_AT_STEP_ENV = "CSL_RAY_FAIL_AT_STEP"
CHECKPOINT_FILE = "state.pt"
SMOKE_OVERRIDES = [
    "train.iterations=4",
    "ssl.warmup_iterations=2",
    "train.eval_every=4",
    "train.checkpoint_every=2",
    "ray.num_workers=1",
    "data.global_batch_size=2",
    "logging.log_every=1",
]
"""`--smoke`: a few iterations on one worker (applied before the command line's own overrides)."""
PROGRESS_KEYS = ("loss", "loss_x", "selected_ratio", "pseudo_acc_selected")
"""Training means shown on the driver's status line."""


# ---------------------------------------------------------------------------------------------------------- CLI


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The config flags shared by jobs/train.py and jobs/tune.py."""
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides applied last, e.g. ssl.tmp.mask_ratio=0.5 ray.num_workers=4 (values parsed as YAML); "
        "train.iterations wins over train.epochs when both are given; every key is listed below",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML config (any subset of the sections; may name a preset)")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="base preset; default: the config file's own `preset:` key, or `tiny` when no --config is given",
    )
    parser.add_argument(
        "--set",
        dest="set_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="same as a positional override; repeatable",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"a few iterations on 1 worker to check a setup end to end ({' '.join(SMOKE_OVERRIDES)})",
    )


def config_from_arguments(args: argparse.Namespace) -> Config:
    """defaults <- preset (tiny without --config) <- --config file <- --smoke <- overrides."""
    preset = args.preset or (None if args.config else "tiny")
    overrides = (SMOKE_OVERRIDES if args.smoke else []) + list(args.overrides) + list(args.set_overrides)
    return load_config(preset=preset, path=args.config, overrides=overrides)


# ------------------------------------------------------------------------------------------------ the worker side


class RunningMeans:
    """Means of the step metrics since the last reset (reports carry the means over their interval)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> dict[str, float]:
        means = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return means


def _remember_first(batches: Iterator[dict[str, torch.Tensor]], first: list) -> Iterator[dict[str, torch.Tensor]]:
    """Passes batches through, keeping the first one in `first` when it is empty (the W&B prediction image)."""
    for batch in batches:
        if not first:
            first.append(batch)
        yield batch


def _maybe_fail(step: int, rank: int) -> None:
    """The fault-injection hook (CSL_RAY_FAIL_AT_STEP): raise once on rank 0 after iteration N."""
    at = os.environ.get(FAIL_AT_STEP_ENV)
    if not at or rank != 0 or step != int(at):
        return
    import pyarrow.fs as pafs

    storage = ray.train.get_context().get_storage()
    fs, marker = storage.storage_filesystem, f"{storage.experiment_fs_path}/.injected_failure_at_{at}"
    if fs.get_file_info(marker).type != pafs.FileType.NotFound:
        return
    with fs.open_output_stream(marker) as f:
        f.write(b"injected\n")
    raise RuntimeError(f"{FAIL_AT_STEP_ENV}={at}: injected failure on rank 0 after iteration {step}")


def _save_checkpoint(loop: TrainLoop, local_dir: str | None) -> ray.train.Checkpoint:
    """Rank 0's checkpoint: the loop state and the resolved config (jobs/evaluate.py rebuilds the model from it).

    Written to a fresh temp dir that Ray copies to storage and deletes; in local mode (no storage) to
    `local_dir`, replacing the previous checkpoint.
    """
    path = Path(tempfile.mkdtemp(prefix="csl-ckpt-"))
    torch.save(loop.state_dict(), path / CHECKPOINT_FILE)
    dump_config(loop.cfg, path / "config.yaml")
    if local_dir is not None:
        shutil.rmtree(local_dir, ignore_errors=True)
        shutil.move(path, local_dir)
        path = Path(local_dir)
    return ray.train.Checkpoint.from_directory(str(path))


def load_checkpoint_state(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The loop state saved in a checkpoint directory (`weights_only`: tensors and plain values only)."""
    return torch.load(Path(checkpoint_dir) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def restore(loop: TrainLoop, checkpoint: ray.train.Checkpoint | None) -> int:
    """Loads a checkpoint into the loop, if there is one; returns the iteration training continues from."""
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            loop.load_state_dict(load_checkpoint_state(path))
    return loop.step


def load_student(
    checkpoint: str | os.PathLike, root: str | None = None, device: str | None = None
) -> tuple[Config, torch.nn.Module, int]:
    """A checkpoint's config (with `data.root` replaced by `root` when given), its student on `device` (default
    CUDA when available, else CPU) and the iteration it was saved at."""
    path = Path(checkpoint)
    cfg = load_config(path=path / "config.yaml")
    cfg.data.root = root or cfg.data.root
    state = load_checkpoint_state(path)
    model = build_model(cfg)
    model.load_state_dict(state["student"])
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return cfg, model, int(state["step"])


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    root: str | None = None,
    mode: str | None = None,
    device: str | None = None,
    overlays: str | os.PathLike | None = None,
    num_overlays: int = 8,
) -> dict[str, Any]:
    """Scores a checkpoint's student on a dataset root's validation split, in this process (no Ray).

    Args:
        checkpoint: a checkpoint directory (state.pt + config.yaml), e.g. results.json's `best_checkpoint`.
        root: dataset root; default the checkpoint config's data.root (None = the built-in dataset).
        mode: full | center_crop | sliding_window; default the config's data.eval_mode.
        device: default CUDA when available, else CPU.
        overlays: write PNG panels (image, ground truth, prediction, CSL weight map) of the first images here.
        num_overlays: how many.

    Returns:
        evaluate()'s `miou`, `iou_per_class`, `pixel_acc`, plus `class_names`, `mode`, `step`, `checkpoint`.
    """
    cfg, model, step = load_student(checkpoint, root, device)
    root = dataset_root(cfg)
    batches = iter_local(cfg, "val", root)
    options = eval_options(cfg.data, mode)
    result = evaluate(model, batches, **options)
    if overlays is not None:
        selector = build_selector(cfg.ssl.selector)
        write_overlays(model, batches, overlays, selector=selector, limit=num_overlays, **options)
    names = list(read_manifest(root)["class_names"])
    return {**result, "class_names": names, "mode": options["mode"], "step": step, "checkpoint": str(checkpoint)}


def draw_pseudo_labels(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    root: str | None = None,
    device: str | None = None,
    num_images: int = 4,
) -> Path:
    """The pseudo-label diagnostics figure of a checkpoint: for the first unlabelled training rows of the run's
    stream (training augmentation, TMP cells and all), the weak view, its ground truth, the checkpoint's prediction
    as teacher, the selector's weight map, the reliable pixels and the TMP view, as one PNG (see
    tracking.pseudo_label_panels). Same arguments as `evaluate_checkpoint`; returns the PNG's path."""
    cfg, model, step = load_student(checkpoint, root, device)
    batch = next(iter(iter_local(cfg, "unlabeled", dataset_root(cfg), batch_size=num_images)))
    rows = pseudo_label_panels(
        model,
        batch,
        selector=build_selector(cfg.ssl.selector),
        num_classes=cfg.data.num_classes,
        ignore_index=cfg.data.ignore_index,
    )
    tmp = cfg.ssl.tmp
    title = f"iteration {step}; selector {cfg.ssl.selector.kind}; TMP mask ratio {tmp.mask_ratio}, block {tmp.block}"
    return write_pseudo_label_figure(rows, out, title=title)


def _images(loop: TrainLoop, val_batch: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """Images for W&B: the latest step's pseudo-label and weight map, and a prediction on a validation image."""
    data = loop.cfg.data
    visuals = loop.last_visuals
    images = {}
    if visuals:
        pseudo = label_rgb(visuals["pseudo_label"].cpu().numpy(), data.num_classes, data.ignore_index)
        images["pseudo_label"] = overlay(chw_to_hwc(visuals["image_weak"]), pseudo)
        images["weight"] = weight_rgb(visuals["weight"].float().cpu().numpy())
    if val_batch is not None:
        panels = val_panels(loop.student, val_batch, selector=loop.selector, **eval_options(data))
        images["prediction"] = panels["prediction"]
    return images


class _Reporter:
    """The worker's bookkeeping after each step: running means, validation, checkpoints, W&B, `ray.train.report`.

    Reports happen every `logging.log_every` iterations, at every validation (`train.eval_every` and the last
    iteration) and at every checkpoint; every rank reports at the same iterations (`report` is a barrier).
    """

    def __init__(self, loop: TrainLoop, config: dict[str, Any], val_shard: Any, rank: int, world_size: int) -> None:
        self.loop, self.cfg, self.val_shard = loop, loop.cfg, val_shard
        self.rank, self.world_size = rank, world_size
        self.local_dir = config["local_checkpoint_dir"]
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
        self.result = self.loop.validate(_remember_first(batches, self.first_val))
        self.window = self.since_eval.pop()
        if self.tracker is not None:
            self.tracker.log_eval(self.loop.step, self.result)
        return self.result

    def after_step(self, metrics: dict[str, float]) -> None:
        step, train_cfg, log_cfg = self.loop.step, self.cfg.train, self.cfg.logging
        metrics = {k: v for k, v in metrics.items() if k != "step"}  # a counter, not a quantity to average
        self.since_report.add(metrics)
        self.since_eval.add(metrics)
        evaluate_now = step % train_cfg.eval_every == 0 or step == train_cfg.iterations
        checkpoint_now = evaluate_now or step % train_cfg.checkpoint_every == 0
        if not (checkpoint_now or step % log_cfg.log_every == 0):
            return
        report: dict[str, Any] = {**self.since_report.pop(), "step": step}
        if self.tracker is not None:
            self.tracker.log_scalars(step, report)
        if evaluate_now:
            report.update(self.validate())
        if checkpoint_now:
            # The checkpoint ranking key: its own val mIoU, or -1 (below every evaluated checkpoint) between
            # validations. Never NaN: Ray stores checkpoint metrics as JSON, where NaN comes back as null.
            miou = report.get("miou", math.nan)
            report["score"] = miou if math.isfinite(miou) else -1.0
        if self.tracker is not None and log_cfg.image_every and step % log_cfg.image_every == 0:
            self.tracker.log_images(step, _images(self.loop, self.first_val[0] if self.first_val else None))
        checkpoint = _save_checkpoint(self.loop, self.local_dir) if checkpoint_now and self.rank == 0 else None
        ray.train.report(report, checkpoint=checkpoint, delete_local_checkpoint_after_upload=self.local_dir is None)

    def finish(self, resumed_from: int) -> dict[str, Any]:
        """The run's summary (what rank 0 returns to the driver)."""
        result = self.result or self.validate()  # resumed at the end: score the final weights once more
        if self.tracker is not None:
            self.tracker.finish()
        return {
            "step": self.loop.step,
            "resumed_from": resumed_from,
            "miou": result["miou"],
            "pixel_acc": result["pixel_acc"],
            "iou_per_class": result["iou_per_class"],
            "best_miou": self.loop.best_miou,
            "skipped_steps": self.loop.skipped_steps,
            "train": self.window,
        }


def _quiet_worker_logs() -> None:
    """Drops Ray's per-report and per-dataset INFO lines in this worker, keeping warnings and errors.

    Ray 2.60 logs every `ray.train.report` call, metrics dict included, at INFO from a logger named by its source
    file's path, so `LoggingConfig(log_level=...)`, which filters loggers named `ray.train.*`, misses it; with a
    report every `logging.log_every` iterations on every rank those lines bury the driver's status line.
    """
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The per-worker function of the TorchTrainer; returns (on rank 0) the run's final summary."""
    _quiet_worker_logs()
    cfg = config_from_dict(config["cfg"], source="train_loop_config")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    loop = TrainLoop(cfg, ray.train.torch.get_device(), rank=rank, world_size=world_size)
    start = restore(loop, ray.train.get_checkpoint())  # a restarted group, or a re-run of the same name
    if world_size > 1:
        loop.wrap_ddp()
    labeled = labeled_batches(ray.train.get_dataset_shard("labeled"), cfg, rank=rank)
    unlabeled = unlabeled_batches(ray.train.get_dataset_shard("unlabeled"), cfg) if cfg.ssl.enabled else None
    reporter = _Reporter(loop, config, ray.train.get_dataset_shard("val"), rank, world_size)
    while loop.step < cfg.train.iterations:
        metrics = loop.train_step(next(labeled), next(unlabeled) if unlabeled is not None else None)
        _maybe_fail(loop.step, rank)
        reporter.after_step(metrics)
    return reporter.finish(start)


# ------------------------------------------------------------------------------------------------ the driver side


class RunMonitor(UserCallback):
    """Runs in the Train controller (on the driver's node): appends every report to metrics.jsonl and prints a
    one-line status per report (every `logging.log_every` iterations and at validations)."""

    def __init__(self, run_dir: str, name: str, total: int) -> None:
        self.run, self.name, self.total = RunDir(run_dir), name, total
        self.clock: tuple[float, int] | None = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        row = {"time": time.time(), **metrics[0]}
        self.run.append_metrics(row)
        step, now = int(row["step"]), time.monotonic()
        if self.clock is None or step <= self.clock[1]:  # first report, or restarted from a checkpoint
            self.clock = (now, step)
        parts = [f"[{self.name}] step {step}/{self.total}"]
        parts += [f"{k} {row[k]:.3f}" for k in PROGRESS_KEYS if k in row]
        if "miou" in row:
            parts.append(f"val mIoU {row['miou']:.2f} (best {row['best_miou']:.2f})")
        if step > self.clock[1]:
            rate = (step - self.clock[1]) / max(now - self.clock[0], 1e-9)
            parts.append(f"{rate:.2f} it/s, eta {_duration((self.total - step) / rate)}")
        print(" | ".join(parts), flush=True)

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for rank, error in worker_exceptions.items():
            print(
                f"[{self.name}] worker {rank} failed: {error!r} (restarts from the latest checkpoint while "
                "ray.max_failures allows)",
                flush=True,
            )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


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
    """The iteration of the run's latest registered checkpoint in storage (0 for a new run).

    Read from Ray Train's checkpoint-manager snapshot, so it is the checkpoint `get_checkpoint()` will hand the
    workers, never a half-uploaded one.
    """
    try:
        latest = ray.train.Result.from_path(f"{storage}/{name}")
    except RuntimeError:  # no experiment folder or no snapshot yet
        return 0
    return int(latest.metrics["step"]) if latest.metrics else 0


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
    env = {FAIL_AT_STEP_ENV: os.environ[FAIL_AT_STEP_ENV]} if os.environ.get(FAIL_AT_STEP_ENV) else {}
    loop_config = {
        "cfg": config_to_dict(cfg),
        "name": name,
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
        worker_runtime_env={"env_vars": env} if env else None,
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
        `step`, `resumed_from`, `run_dir`, `checkpoint`, `best_checkpoint`, `wall_time_s`.
    """
    cfg = with_iterations(cfg)
    name = run_name(cfg)
    run = RunDir(Path(cfg.train.output_dir).expanduser().resolve() / name)  # absolute: Ray processes have other cwds
    run.write_config(cfg)
    started = time.monotonic()
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


def format_iou_table(class_names: Sequence[str], iou_per_class: Sequence[float | None]) -> list[str]:
    """Lines of a per-class IoU table ('-' for a class absent from both prediction and ground truth)."""
    lines = [f"{'class':<24}{'IoU':>8}"]
    for name, iou in zip(class_names, iou_per_class, strict=True):
        missing = iou is None or math.isnan(iou)
        lines.append(f"{name:<24}{'-' if missing else f'{iou:.2f}':>8}")
    return lines


def format_summary(summary: Mapping[str, Any]) -> str:
    """The result table printed at the end of a run."""
    train = summary.get("train", {})
    lines = [
        f"run directory  {summary['run_dir']}",
        f"iterations     {summary['step']} (resumed from {summary['resumed_from']})"
        f" in {_duration(summary['wall_time_s'])}",
        f"val mIoU       {summary['miou']:.2f}   (best {summary['best_miou']:.2f},"
        f" pixel accuracy {summary['pixel_acc']:.2f})",
        "",
        *format_iou_table(summary["class_names"], summary["iou_per_class"]),
        "",
    ]
    if "selected_ratio" in train:
        lines.append(f"selected ratio                 {train['selected_ratio']:.3f}")
    for key, label in (("pseudo_acc_selected", "selected"), ("pseudo_acc_rejected", "rejected")):
        if key in train:
            lines.append(f"pseudo-label accuracy {label:<9}{train[key]:.3f}")
    lines.append(f"corrupt rows   {len(summary['corrupt_rows'])} skipped (listed in results.json)")
    lines.append(f"checkpoint     {summary['checkpoint']}")
    return "\n".join(lines)


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
