"""Checks a job's inputs before anything starts: the bad value becomes one usage line, never a traceback mid-run.

The jobs/ scripts call these after loading the config and before Ray starts or a run directory is written, so a bad
dataset root, backbone, weights file or output path costs a second and leaves nothing behind. Each check raises
ConfigError naming the key (or flag) and its value; `usage_error` prints it as argparse does and exits 2.

    try:
        cfg = config_from_arguments(args)
        check_run(cfg)
    except ConfigError as err:
        usage_error(parser, err)
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from pathlib import Path
from typing import NoReturn

import timm
import torch

from csl_ray.config import Config, ConfigError
from csl_ray.data.shards import ShardError
from csl_ray.data.streams import dataset_root
from csl_ray.model import DeepLabV3Plus, WeightsLayoutError, read_backbone_file

LIST_BACKBONES = "python -c \"import timm; print(timm.list_models('resnet*'))\""
"""How to list valid backbone names (any pattern works), quoted in the unknown-backbone error."""


def usage_error(parser: argparse.ArgumentParser, error: Exception) -> NoReturn:
    """argparse's error line (`train.py: error: ...`) and exit status 2, without the usage block: the flags were
    fine, one value was not."""
    message = " ".join(str(error).split())  # one line, whatever the underlying error spelled over several
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def check_dataset(cfg: Config) -> None:
    """`data.root` holds a readable dataset whose classes match the config; `data.labeled_list` exists. The built-in
    dataset (no root) is drawn on first use and needs no check."""
    if cfg.data.labeled_list is not None and not Path(cfg.data.labeled_list).expanduser().is_file():
        raise ConfigError(f"data.labeled_list={cfg.data.labeled_list}: no such file")
    if cfg.data.root is None:
        return
    try:
        dataset_root(cfg)
    except ShardError as err:
        raise ConfigError(f"data.root={cfg.data.root}: {err}") from err


def check_model(cfg: Config) -> None:
    """`model.backbone` is a timm model DeepLabV3+ can use at `model.output_stride`, and `model.weights_file` holds
    its weights. The model is built on the meta device: no memory and no weights, only names and shapes."""
    name = cfg.model.backbone
    if not timm.is_model(name):
        raise ConfigError(f"model.backbone={name}: not a timm model; list valid names with {LIST_BACKBONES}")
    try:
        with torch.device("meta"):
            model = DeepLabV3Plus(name, cfg.data.num_classes, output_stride=cfg.model.output_stride)
    except ValueError as err:
        raise ConfigError(f"model.backbone={name}: {err}") from err
    if cfg.model.weights_file is None:
        return
    try:
        read_backbone_file(model.backbone, name, cfg.model.weights_file)
    except FileNotFoundError as err:
        raise ConfigError(f"model.weights_file={cfg.model.weights_file}: no such file") from err
    except WeightsLayoutError as err:
        raise ConfigError(f"model.weights_file={cfg.model.weights_file}: {err}") from err
    except Exception as err:  # whatever torch / safetensors raise for a file that is not a state dict at all
        reason = f"{type(err).__name__}: {err}"
        raise ConfigError(f"model.weights_file={cfg.model.weights_file}: unreadable ({reason})") from err


def check_writable(key: str, path: str | os.PathLike | None, *, is_file: bool = False) -> None:
    """A local output path (a directory, or with `is_file` a file) can be created and written; remote URIs
    (s3://, gs://) are left to their filesystem.

    Nothing is created: the nearest existing ancestor must be a directory in which a temporary file can be made
    (and is removed at once). Permission bits alone do not decide it, since jobs often run as root.
    """
    if path is None or "://" in str(path):
        return
    target = Path(path).expanduser().resolve()
    directory = target.parent if is_file else target
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key}={path}: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(f"{key}={path}: cannot write in {existing} ({err.strerror or err})") from err


def is_listening(address: str, timeout_s: float = 2.0) -> bool:
    """Whether something accepts TCP connections at `host:port` (a cluster's GCS answers at its address)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def check_ray_address(cfg: Config) -> None:
    """The cluster named by `ray.address` (or RAY_ADDRESS) answers. Ray itself would retry an address where nothing
    listens for about a minute and end in a ConnectionError traceback. `local`, `auto` and unset are Ray's to
    resolve (see ray_session.init_ray)."""
    key, address = (
        ("ray.address", cfg.ray.address) if cfg.ray.address else ("RAY_ADDRESS", os.environ.get("RAY_ADDRESS"))
    )
    if not address or address in ("local", "auto"):
        return
    host_port = address.split("://", 1)[-1].rstrip("/")  # ray://host:10001 (Ray Client) or host:port (the GCS)
    if not is_listening(host_port):
        raise ConfigError(
            f"{key}={address}: no Ray cluster answers there (is it up? `ray status --address {host_port}`; "
            "ray.address=local starts a private local Ray instead)"
        )


def check_run(cfg: Config) -> None:
    """Everything a training run or sweep reads or writes before its first iteration (jobs/train.py, jobs/tune.py)."""
    check_ray_address(cfg)
    check_writable("train.output_dir", cfg.train.output_dir)
    check_writable("ray.storage_path", cfg.ray.storage_path)
    check_dataset(cfg)
    check_model(cfg)
