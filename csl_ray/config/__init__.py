"""Typed configuration: one source of defaults, presets, YAML files and `section.key=value` overrides.

    cfg = load_config(preset="tiny", path="exp.yaml", overrides=["ssl.tmp.mask_ratio=0.5"])
    dump_config(cfg, "run/config.yaml")

The package by concern: `schema` (the dataclasses and their defaults), `presets`, `loader` (merging, type checks,
YAML in and out), `validation` (ranges, epochs -> iterations), `reference` (the generated key reference). Callers
import from `csl_ray.config`.
"""

from csl_ray.config.loader import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_override,
)
from csl_ray.config.presets import PRESETS
from csl_ray.config.reference import field_docs, reference_markdown, reference_text
from csl_ray.config.schema import (
    Config,
    ConfigError,
    DataConfig,
    EvalMode,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    RayConfig,
    SelectorConfig,
    SSLConfig,
    TeacherConfig,
    TMPConfig,
    TrainConfig,
    per_worker_batch_size,
    valid_keys,
)
from csl_ray.config.validation import epoch_iterations, resolve_iterations, validate

__all__ = [
    "PRESETS",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalMode",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "RayConfig",
    "SSLConfig",
    "SelectorConfig",
    "TMPConfig",
    "TeacherConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "epoch_iterations",
    "field_docs",
    "load_config",
    "parse_override",
    "per_worker_batch_size",
    "reference_markdown",
    "reference_text",
    "resolve_iterations",
    "valid_keys",
    "validate",
]
