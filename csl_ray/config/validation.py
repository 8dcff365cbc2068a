"""Checks a loaded config beyond its types (ranges, cross-field rules) and resolves epochs into iterations."""

from __future__ import annotations

import copy

from csl_ray.config.schema import Config, ConfigError


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
