"""Builds a Config: presets, YAML files and `section.key=value` overrides merged over the schema's defaults.

Resolution order (later wins): dataclass defaults <- preset <- YAML file <- command-line overrides. A YAML file
may name its base preset with a top-level `preset:` key. Every value is checked against its annotation here, once
(a `Literal[...]` choice included), then `validate` checks ranges; the result is also written back as YAML.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from csl_ray.config.presets import PRESETS
from csl_ray.config.schema import Config, ConfigError, field_types, valid_keys
from csl_ray.config.validation import validate


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
    types_ = field_types(type(obj))
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
