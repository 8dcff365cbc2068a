"""DeepLabV3+ on a timm CNN backbone with the feature-perturbation branch (docs/method.md, Model and optimisation).

The backbone is `timm.create_model(name, features_only=True, out_indices=(low, last), output_stride=...)`; the
low-level feature is the stride-4 one and all channel counts come from `feature_info`, so ResNets, EfficientNets
and MobileNets work without literals. The head follows UniMatch's `model/semseg/deeplabv3plus.py`.

    model = DeepLabV3Plus("resnet18", num_classes=21, output_stride=16)
    logits = model(images)                          # [N, 21, H, W]
    logits, logits_fp = model(images, need_fp=True)  # clean and Dropout2d-perturbed features, one decoder pass
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from csl_ray.augment import normalize
from csl_ray.config import Config
from csl_ray.weights import backbone_normalization, packaged_weights_file

ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}
LOW_LEVEL_CHANNELS = 48
LOW_LEVEL_REDUCTION = 4


class WeightsLayoutError(ValueError):
    """A backbone weights file whose keys or shapes are not those of the configured timm backbone."""


def _preview(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def backbone_weights(
    state_dict: Mapping[str, torch.Tensor], backbone: nn.Module, name: str, source: str
) -> dict[str, torch.Tensor]:
    """The entries of a full-model state dict that a `features_only` backbone holds, checked strictly.

    The file may hold timm's full model `name` with or without its classifier (`fc.*` for ResNets), which the
    features-only backbone does not have. The UniMatch / CSL released ResNet-101 file is in timm's `resnet101s`
    layout (deep stem `conv1.0/1/3/4/6`, `bn1`, `layerN.M...`, `downsample.0/1`) under the same names, usually
    without `fc`, so it needs no renaming. BatchNorm `num_batches_tracked` counters may be absent (files saved
    before PyTorch 0.4.1): the backbone keeps its own.

    Args:
        state_dict: parameter and buffer tensors by name (a `module.` prefix already stripped).
        backbone: the timm `features_only` model the weights are for.
        name: its timm model name (the full model's keys bound what the file may hold).
        source: the file (or other source) named in errors.

    Returns:
        Exactly the backbone's state-dict keys, ready for `backbone.load_state_dict(..., strict=True)`.

    Raises:
        WeightsLayoutError listing the missing and unexpected keys, or the shape mismatches.
    """
    wanted = backbone.state_dict()
    with torch.device("meta"):
        full_keys = set(timm.create_model(name, pretrained=False).state_dict())
    missing = sorted(k for k in wanted if k not in state_dict and not k.endswith(".num_batches_tracked"))
    unexpected = sorted(k for k in state_dict if k not in full_keys)
    if missing or unexpected:
        raise WeightsLayoutError(
            f"{source}: not a state dict of timm {name!r}"
            + (f"; missing {len(missing)} keys: {_preview(missing)}" if missing else "")
            + (f"; unexpected {len(unexpected)} keys: {_preview(unexpected)}" if unexpected else "")
            + " (the UniMatch / CSL deep-stem ResNet-101 file fits model.backbone=resnet101s)"
        )
    weights = {k: state_dict.get(k, value) for k, value in wanted.items()}
    wrong = [
        f"{k} {tuple(weights[k].shape)} != {tuple(v.shape)}" for k, v in wanted.items() if weights[k].shape != v.shape
    ]
    if wrong:
        raise WeightsLayoutError(f"{source}: shapes differ from timm {name!r}: {_preview(wrong)}")
    return weights


def read_backbone_file(backbone: nn.Module, name: str, path: str | Path) -> dict[str, torch.Tensor]:
    """Local backbone weights (.pth / .bin / .safetensors, possibly wrapped in `state_dict` / `model` and prefixed by
    `module.`; read by timm), checked against a `features_only` backbone by `backbone_weights` (which may live on the
    meta device: only its keys and shapes are read)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    state_dict = timm.models.load_state_dict(str(path), weights_only=True)
    return backbone_weights(state_dict, backbone, name, str(path))


def load_backbone_file(backbone: nn.Module, name: str, path: str | Path) -> None:
    """Loads local backbone weights (see `read_backbone_file`) into a `features_only` backbone, strictly."""
    backbone.load_state_dict(read_backbone_file(backbone, name, path), strict=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper, or `model` itself."""
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        return model.module
    return model


@contextmanager
def running_stats_kept(model: nn.Module) -> Iterator[None]:
    """Runs the block, then puts the model's buffers (BatchNorm running statistics and batch counters) back.

    The released CSL code's way of keeping a forward pass out of the running statistics while it still normalises
    with its own batch statistics (training mode).
    """
    buffers = list(unwrap(model).buffers())
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        if buffers:
            # Through `.data`, which has its own version counter: training-mode batch norm saves the running
            # statistics for backward (unread there), and a tracked in-place copy would fail that backward.
            torch._foreach_copy_([buffer.data for buffer in buffers], saved)


def normalize_input(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, 3, H, W] -> the model's float input on the model's device, normalised with the model's own
    `pixel_mean` / `pixel_std` buffers (so the statistics travel with every checkpoint of it)."""
    inner = unwrap(model)
    return normalize(images.to(inner.pixel_mean.device, non_blocking=True), inner.pixel_mean, inner.pixel_std)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ASPPPooling(nn.Module):
    """Image-level branch: global average pool, 1x1 conv + BN + ReLU, bilinear upsample back."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), _conv_bn_relu(in_channels, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.gap(x), size=x.shape[-2:], mode="bilinear", align_corners=True)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3, image pooling; concatenated and projected by 1x1.

    The projection has no dropout: UniMatch's (and so the released CSL code's) ASPPModule has none, and with the
    self teacher the weak-view pseudo-labels come from a training-mode pass that a dropout would perturb.
    """

    def __init__(self, in_channels: int, rates: tuple[int, int, int], out_channels: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, out_channels)]
            + [_conv_bn_relu(in_channels, out_channels, 3, rate) for rate in rates]
            + [ASPPPooling(in_channels, out_channels)]
        )
        self.project = _conv_bn_relu(len(self.branches) * out_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


def _feature_indices(backbone: str, output_stride: int) -> tuple[int, int]:
    """(stride-4 feature index, last feature index) of a timm backbone, read from its feature_info.

    The probe is built on the meta device: no memory, no weights, only the feature metadata.
    """
    try:
        with torch.device("meta"):
            probe = timm.create_model(backbone, features_only=True, output_stride=output_stride, pretrained=False)
    except (TypeError, AssertionError, NotImplementedError) as err:
        # timm raises TypeError (e.g. densenet: unexpected keyword 'output_stride') or a bare AssertionError
        # (e.g. vgg) for backbones that cannot dilate their last stages.
        raise ValueError(
            f"timm backbone {backbone!r} cannot be built with features_only=True and output_stride={output_stride} "
            f"({type(err).__name__}: {err}); choose a backbone that supports output_stride (resnet*, efficientnet_*, "
            "mobilenetv3_*, convnext_*, regnet*, ...)"
        ) from err
    reductions = [info["reduction"] for info in probe.feature_info.info]
    if reductions[-1] != output_stride:
        raise ValueError(
            f"timm backbone {backbone!r} ignores output_stride={output_stride}: its feature reductions are {reductions}"
        )
    if LOW_LEVEL_REDUCTION not in reductions:
        raise ValueError(
            f"timm backbone {backbone!r} has no stride-{LOW_LEVEL_REDUCTION} feature for the DeepLabV3+ low-level "
            f"branch: its feature reductions are {reductions}"
        )
    return reductions.index(LOW_LEVEL_REDUCTION), len(reductions) - 1


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ segmentation model on a timm `features_only` backbone.

    Args:
        backbone: timm model name (resnet18/50/101, efficientnet_b0, mobilenetv3_large_100, ...).
        num_classes: output channels of the classifier.
        output_stride: 8 (ASPP rates 12/24/36) or 16 (6/12/18).
        pretrained: load ImageNet weights through timm's hub (needs network access).
        weights_file: local backbone weights (a state dict of the full timm model with or without its classifier,
            or the UniMatch / CSL release layout of `resnet101s`; see `backbone_weights`); loads them without any
            download and takes precedence over `pretrained`.
        fp_dropout: Dropout2d probability of the feature-perturbation branch (`need_fp=True`).
        decoder_channels: width of the ASPP output and the two fuse convs (256 in the paper; the decoder runs at
            stride 4, so it dominates the cost of small backbones and the CPU-sized preset narrows it).

    Buffers `pixel_mean`, `pixel_std` [3, 1, 1] hold the input normalisation the backbone's pretrained weights
    expect (timm's pretrained config of `backbone`); `normalize_input` applies them.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        output_stride: int = 8,
        pretrained: bool = False,
        weights_file: str | Path | None = None,
        fp_dropout: float = 0.5,
        decoder_channels: int = 256,
    ) -> None:
        super().__init__()
        if output_stride not in ASPP_RATES:
            raise ValueError(f"output_stride must be one of {sorted(ASPP_RATES)}, got {output_stride}")
        low, last = _feature_indices(backbone, output_stride)
        self.backbone = timm.create_model(
            backbone,
            features_only=True,
            out_indices=(low, last),
            output_stride=output_stride,
            pretrained=pretrained and weights_file is None,
        )
        if weights_file is not None:
            load_backbone_file(self.backbone, backbone, weights_file)
        mean, std = backbone_normalization(backbone)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(std).view(3, 1, 1))
        low_channels, high_channels = self.backbone.feature_info.channels()
        self.fp_dropout = fp_dropout
        self.head = ASPP(high_channels, ASPP_RATES[output_stride], decoder_channels)
        self.reduce = _conv_bn_relu(low_channels, LOW_LEVEL_CHANNELS)
        self.fuse = nn.Sequential(
            _conv_bn_relu(decoder_channels + LOW_LEVEL_CHANNELS, decoder_channels, 3),
            _conv_bn_relu(decoder_channels, decoder_channels, 3),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def forward(self, x: torch.Tensor, need_fp: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits at the input resolution.

        Args:
            x: normalised images [N, 3, H, W].
            need_fp: also decode Dropout2d-perturbed low- and high-level features.

        Returns:
            logits [N, C, H, W]; with `need_fp`, (logits, logits_fp), both [N, C, H, W].
        """
        size = x.shape[-2:]
        low, high = self.backbone(x)
        if need_fp:
            # One decoder pass over [clean; perturbed] as UniMatch does, so the decoder's BatchNorm sees both halves.
            # training=True always: the perturbation is the point of this branch (UniMatch builds a fresh Dropout2d).
            low = torch.cat((low, F.dropout2d(low, self.fp_dropout, training=True)))
            high = torch.cat((high, F.dropout2d(high, self.fp_dropout, training=True)))
            logits, logits_fp = self._upsample(self._decode(low, high), size).chunk(2)
            return logits, logits_fp
        return self._upsample(self._decode(low, high), size)

    def _decode(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        high = F.interpolate(self.head(high), size=low.shape[-2:], mode="bilinear", align_corners=True)
        return self.classifier(self.fuse(torch.cat((self.reduce(low), high), dim=1)))

    @staticmethod
    def _upsample(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)

    def param_groups(self, lr: float, lr_multi: float) -> list[dict]:
        """SGD parameter groups: the backbone at `lr`, the decoder head at `lr * lr_multi`."""
        head = [p for name, p in self.named_parameters() if not name.startswith("backbone.")]
        return [
            {"name": "backbone", "params": list(self.backbone.parameters()), "lr": lr},
            {"name": "head", "params": head, "lr": lr * lr_multi},
        ]


def build_model(cfg: Config) -> DeepLabV3Plus:
    """The student model described by `cfg.model` with `cfg.data.num_classes` outputs."""
    weights_file = cfg.model.weights_file
    if cfg.model.packaged_weights:
        weights_file = packaged_weights_file(cfg.model.backbone, cfg.model.weights_cache)
    return DeepLabV3Plus(
        cfg.model.backbone,
        cfg.data.num_classes,
        output_stride=cfg.model.output_stride,
        pretrained=cfg.model.pretrained,
        weights_file=weights_file,
        fp_dropout=cfg.model.fp_dropout,
        decoder_channels=cfg.model.decoder_channels,
    )
