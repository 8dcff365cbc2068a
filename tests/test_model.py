"""DeepLabV3+ on timm backbones: shapes, NaNs, gradients, the feature-perturbation branch, weights, param groups."""

import pytest
import timm
import torch

from csl_ray.config import load_config
from csl_ray.model import ASPP_RATES, DeepLabV3Plus, WeightsLayoutError, backbone_weights, build_model, unwrap

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return DeepLabV3Plus("resnet18", NUM_CLASSES, output_stride=16)


@pytest.mark.parametrize(
    ("backbone", "output_stride"),
    [
        ("resnet18", 8),
        ("resnet18", 16),
        ("efficientnet_b0", 8),
        ("mobilenetv3_large_100", 16),
        ("convnext_atto", 16),  # no stride-2 feature: the low-level feature is index 0, not 1
    ],
)
def test_output_shape_and_finite(backbone, output_stride):
    torch.manual_seed(0)
    model = DeepLabV3Plus(backbone, NUM_CLASSES, output_stride=output_stride).eval()
    x = torch.randn(2, 3, 66, 62)  # not a multiple of the stride: the output must still match the input
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, NUM_CLASSES, 66, 62)
    assert torch.isfinite(logits).all()
    reductions = model.backbone.feature_info.reduction()
    assert reductions == [4, output_stride]
    assert model.head.branches[1][0].dilation == (ASPP_RATES[output_stride][0],) * 2


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_b0"])
def test_channels_come_from_feature_info(backbone):
    model = DeepLabV3Plus(backbone, NUM_CLASSES, output_stride=16)
    low, high = model.backbone.feature_info.channels()
    full = timm.create_model(backbone, features_only=True, output_stride=16)
    reductions = full.feature_info.reduction()
    assert low == full.feature_info.channels()[reductions.index(4)]
    assert high == full.feature_info.channels()[-1]
    assert model.reduce[0].in_channels == low
    assert all(branch[0].in_channels == high for branch in model.head.branches[:4])


def test_need_fp_branches(resnet18):
    x = torch.randn(2, 3, 64, 64)
    resnet18.eval()  # running BN statistics: the clean half must equal a plain forward
    with torch.no_grad():
        logits, logits_fp = resnet18(x, need_fp=True)
        plain = resnet18(x)
    assert logits.shape == logits_fp.shape == (2, NUM_CLASSES, 64, 64)
    torch.testing.assert_close(logits, plain, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits, logits_fp)  # the perturbation is on even in eval mode, as in UniMatch


def test_every_parameter_gets_a_gradient(resnet18):
    resnet18.train().zero_grad(set_to_none=True)
    torch.manual_seed(1)
    logits, logits_fp = resnet18(torch.randn(2, 3, 64, 64), need_fp=True)
    target = torch.randint(NUM_CLASSES, (2, 64, 64))
    loss = torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits_fp, target)
    loss.backward()
    for name, param in resnet18.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        # timm zero-initialises each residual block's last BN scale, so backbone gradients inside the residual
        # branches are legitimately 0 at init; the head's must not be.
        if not name.startswith("backbone."):
            assert param.grad.abs().sum() > 0, name


def test_param_groups_cover_every_parameter_once(resnet18):
    groups = resnet18.param_groups(lr=0.01, lr_multi=10.0)
    assert [g["lr"] for g in groups] == [0.01, pytest.approx(0.1)]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in resnet18.parameters()}
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in resnet18.backbone.parameters()}


def test_local_weights_file_round_trip(tmp_path):
    torch.manual_seed(123)
    reference = timm.create_model("resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    loaded = DeepLabV3Plus("resnet18", NUM_CLASSES, output_stride=16, weights_file=path)
    torch.testing.assert_close(loaded.backbone.conv1.weight, reference.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(loaded.backbone.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    torch.manual_seed(7)
    fresh = DeepLabV3Plus("resnet18", NUM_CLASSES, output_stride=16)
    assert not torch.equal(fresh.backbone.conv1.weight, reference.conv1.weight)


def test_missing_weights_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        DeepLabV3Plus("resnet18", NUM_CLASSES, weights_file=missing)


def test_unsupported_backbone_and_stride_errors():
    with pytest.raises(ValueError, match="densenet121.*output_stride"):
        DeepLabV3Plus("densenet121", NUM_CLASSES, output_stride=8)
    with pytest.raises(ValueError, match="output_stride"):
        DeepLabV3Plus("resnet18", NUM_CLASSES, output_stride=32)


def test_build_model_reads_config():
    cfg = load_config(preset="tiny")
    model = build_model(cfg)
    assert model.classifier.out_channels == cfg.data.num_classes
    assert model.backbone.feature_info.reduction()[-1] == cfg.model.output_stride
    assert model.fp_dropout == cfg.model.fp_dropout


def test_unwrap(resnet18):
    assert unwrap(torch.nn.DataParallel(resnet18)) is resnet18
    assert unwrap(resnet18) is resnet18


def test_resnet101s_is_the_released_deep_stem_backbone():
    with torch.device("meta"):
        backbone = timm.create_model("resnet101s", features_only=True, output_stride=8)
    assert backbone.feature_info.channels() == [128, 256, 512, 1024, 2048]
    assert backbone.feature_info.reduction() == [2, 4, 8, 8, 8]
    assert [backbone.conv1[i].out_channels for i in (0, 3, 6)] == [64, 64, 128]


def test_released_layout_file_loads_strictly_into_the_deep_stem_model(tmp_path):
    torch.manual_seed(5)
    reference = timm.create_model("resnet101s").state_dict()
    # The released file's layout: no classifier, and (files older than PyTorch 0.4.1) no BatchNorm batch counters.
    released = {k: v for k, v in reference.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert {"conv1.0.weight", "conv1.1.running_var", "conv1.6.weight", "bn1.weight"} <= set(released)
    path = tmp_path / "resnet101.pth"
    torch.save(released, path)
    model = DeepLabV3Plus("resnet101s", NUM_CLASSES, output_stride=8, weights_file=path)
    loaded = model.backbone.state_dict()
    assert set(released) <= set(loaded)
    for key, value in released.items():
        assert torch.equal(loaded[key], value), key


def test_a_file_of_another_layout_lists_missing_and_unexpected_keys():
    with torch.device("meta"):
        torchvision_layout = timm.create_model("resnet101").state_dict()  # one 7x7 conv1
        backbone = timm.create_model("resnet101s", features_only=True, output_stride=8)
    with pytest.raises(WeightsLayoutError) as err:
        backbone_weights(torchvision_layout, backbone, "resnet101s", "w.pth")
    message = str(err.value)
    assert message.startswith("w.pth: not a state dict of timm 'resnet101s'")
    assert "missing" in message and "conv1.0.weight" in message
    assert "unexpected 1 keys: conv1.weight" in message


def test_a_file_with_other_shapes_or_keys_is_refused_with_its_path(tmp_path):
    torch.manual_seed(0)
    state = timm.create_model("resnet18").state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(WeightsLayoutError, match=r"odd.pth: shapes differ .*conv1.weight \(64, 3, 3, 3\)"):
        DeepLabV3Plus("resnet18", NUM_CLASSES, output_stride=16, weights_file=path)
    state["conv1.weight"] = torch.zeros(64, 3, 7, 7)
    state["head.extra"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(WeightsLayoutError, match="odd.pth: .*unexpected 1 keys: head.extra"):
        DeepLabV3Plus("resnet18", NUM_CLASSES, output_stride=16, weights_file=path)
