import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from csl_ray.config import load_config
from csl_ray.masking import cutmix_box, tmp_cells
from csl_ray.model import DeepLabV3Plus, normalize_input
from csl_ray.selection import Selection, build_selector, none_select, threshold_select
from csl_ray.step import (
    LossWeights,
    floor_weights,
    in_warmup,
    semi_supervised_step,
    sigmoid_rampup,
    supervised_step,
    unlabeled_scale,
)
from csl_ray.teacher import EmaTeacher, SelfTeacher

C, S, B = 3, 32, 2
COLOURS = torch.tensor([[40, 40, 40], [220, 40, 40], [40, 200, 60]], dtype=torch.uint8)  # one colour per class
UNLABELED_METRICS = {"loss", "loss_x", "loss_u_s", "loss_u_m", "loss_u_fp", "selected_ratio", "mean_weight"}
GT_METRICS = {"pseudo_acc", "pseudo_acc_selected", "pseudo_acc_rejected"}
RELEASED = load_config().ssl
WEIGHTS = LossWeights(RELEASED.weight_strong, RELEASED.weight_masked, RELEASED.weight_fp)


def blobs(n, generator, size=S):
    """Colour-coded scenes: a background and two rectangles of other classes, plus pixel noise."""
    mask = torch.zeros(n, size, size, dtype=torch.int64)
    for row in range(n):
        for cls in (1, 2):
            h, w = (int(v) for v in torch.randint(size // 4, size // 2, (2,), generator=generator))
            top, left = (int(v) for v in torch.randint(0, size - size // 2, (2,), generator=generator))
            mask[row, top : top + h, left : left + w] = cls
    image = COLOURS[mask].permute(0, 3, 1, 2).int()
    image = image + torch.randint(-25, 26, image.shape, generator=generator)
    return image.clamp(0, 255).to(torch.uint8), mask


def synthetic_batch(seed=0, batch=B, size=S, cutmix_prob=1.0):
    """(labelled batch, unlabelled batch) of `batch` rows each in the step's schema (each unlabelled row with its
    CutMix partner's columns)."""
    g = torch.Generator().manual_seed(seed)
    image, mask = blobs(batch, g, size)
    labeled = {"image": image, "mask": mask}
    n = 2 * batch
    image_u, mask_u = blobs(n, g, size)
    strong = (image_u.float() * 0.8 + 20).to(torch.uint8)  # a fixed photometric change
    valid = torch.ones(n, size, size, dtype=torch.bool)
    valid[:, -3:] = False  # padding rows
    image_u[:, :, -3:] = 0
    mask_u[:, -3:] = 255
    unlabeled = {
        "image_weak": image_u,
        "image_strong": strong,
        "image_masked": image_u.clone(),
        "tmp_cells": torch.stack([tmp_cells(size, 8, 0.7, g) for _ in range(n)]),
        "cutmix_box": torch.stack([cutmix_box(size, cutmix_prob, g) for _ in range(n)]),
        "valid": valid,
        "mask": mask_u,
    }
    return labeled, paired({k: v[:batch] for k, v in unlabeled.items()}, {k: v[batch:] for k, v in unlabeled.items()})


PARTNER_COLUMNS = {"partner_weak": "image_weak", "partner_strong": "image_strong", "partner_valid": "valid"}


def paired(main, partner):
    """The step's unlabelled batch: the main crops' columns and their partners' under `partner_*` names."""
    return {**main, **{name: partner[column] for name, column in PARTNER_COLUMNS.items()}}


def halves(batch):
    """(the main crops' columns, the partners' under the main crops' names) of an unlabelled batch."""
    main = {k: v for k, v in batch.items() if k not in PARTNER_COLUMNS}
    return main, {column: batch[name] for name, column in PARTNER_COLUMNS.items()}


def tiny_model():
    torch.manual_seed(0)
    return DeepLabV3Plus("resnet18", C, output_stride=16)


class Spy(nn.Module):
    """A per-pixel linear model that records every input it is called on (and can emit NaN logits)."""

    def __init__(self, nan=False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, C, 1)
        self.register_buffer("pixel_mean", torch.tensor([0.4, 0.5, 0.6]).view(3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1))
        self.nan = nan
        self.calls = []

    def forward(self, x, need_fp=False):
        self.calls.append((x.detach().clone(), need_fp, self.training))
        logits = self.conv(x) * (math.nan if self.nan else 1.0)
        if need_fp:
            return logits, self.conv(F.dropout2d(x, 0.5, training=True))
        return logits


class TinySegNet(nn.Module):
    """conv-BN-ReLU features and a 1x1 classifier, with the model's `need_fp` contract (Dropout2d on features)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.classifier = nn.Conv2d(16, C, 1)
        self.register_buffer("pixel_mean", torch.tensor([0.4, 0.5, 0.6]).view(3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1))

    def forward(self, x, need_fp=False):
        features = self.features(x)
        if need_fp:
            return self.classifier(torch.cat((features, F.dropout2d(features, 0.5, training=True)))).chunk(2)
        return self.classifier(features)


class RecordingSelector:
    """Wraps a selector and keeps its inputs and output."""

    def __init__(self, select):
        self.select = select

    def __call__(self, probs, valid):
        self.probs, self.valid = probs, valid
        self.out = self.select(probs, valid)
        return self.out


def run_step(
    student,
    teacher=None,
    selector=none_select,
    tmp_enabled=True,
    unlabeled=None,
    labeled=None,
    weight_floor=0.0,
    bn_stats=RELEASED.bn_stats,
):
    default_labeled, default_unlabeled = synthetic_batch()
    return semi_supervised_step(
        student,
        teacher if teacher is not None else SelfTeacher(student, RELEASED.teacher.partner_pass),
        selector,
        nn.CrossEntropyLoss(ignore_index=255),
        labeled if labeled is not None else default_labeled,
        unlabeled if unlabeled is not None else default_unlabeled,
        weights=WEIGHTS,
        weight_floor=weight_floor,
        tmp_enabled=tmp_enabled,
        bn_stats=bn_stats,
        ignore_index=255,
    )


def test_step_gives_a_finite_loss_and_every_metric():
    student = tiny_model().train()
    out = run_step(student, selector=lambda p, v: threshold_select(p, v, threshold=0.4))
    assert out.loss.requires_grad and torch.isfinite(out.loss)
    assert set(out.metrics) == UNLABELED_METRICS | GT_METRICS
    for name, value in out.metrics.items():
        assert value.dim() == 0 and not value.requires_grad, name
        assert torch.isfinite(value) or name in GT_METRICS, name
    parts = out.metrics  # the total and each loss against a reference: test_cutmix_step_equals_a_reference_computation
    assert 0 <= parts["selected_ratio"] <= 1 and 0 <= parts["mean_weight"] <= 1
    assert out.visuals["pseudo_label"].shape == (S, S) and out.visuals["image_masked"].shape == (3, S, S)
    out.loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_gt_metrics_need_the_mask_column_and_split_by_reliability():
    student = Spy()
    labeled, unlabeled = synthetic_batch()
    selector = RecordingSelector(none_select)  # every valid pixel reliable: nothing rejected
    out = run_step(student, selector=selector, unlabeled=unlabeled)
    assert torch.isnan(out.metrics["pseudo_acc_rejected"])
    assert out.metrics["pseudo_acc_selected"] == out.metrics["pseudo_acc"]
    main, _ = halves(unlabeled)
    known = main["valid"] & (main["mask"] != 255)
    labels = selector.out.labels[:B]
    assert out.metrics["pseudo_acc"] == pytest.approx(float((labels == main["mask"])[known].float().mean()))
    del unlabeled["mask"]
    assert not set(run_step(student, unlabeled=unlabeled).metrics) & GT_METRICS


def test_tmp_zeroes_only_reliable_on_cell_pixels():
    student = Spy()
    labeled, unlabeled = synthetic_batch()
    selector = RecordingSelector(lambda p, v: threshold_select(p, v, threshold=float(p.amax(1).median())))
    run_step(student, selector=selector, unlabeled=unlabeled)
    (strong_and_masked, need_fp, _) = student.calls[-1]
    assert not need_fp
    x_m = strong_and_masked[B:]
    main, _ = halves(unlabeled)
    reliable = selector.out.reliable[:B]
    zeroed = main["tmp_cells"] & reliable
    assert zeroed.any() and (main["tmp_cells"] & ~reliable).any()  # the test exercises both cases
    assert (x_m.permute(1, 0, 2, 3)[:, zeroed] == 0).all()
    untouched = normalize_input(student, main["image_masked"])
    assert torch.equal(x_m.permute(1, 0, 2, 3)[:, ~zeroed], untouched.permute(1, 0, 2, 3)[:, ~zeroed])


def test_strong_view_is_cutmixed_with_the_partner():
    student = Spy()
    labeled, unlabeled = synthetic_batch()
    run_step(student, unlabeled=unlabeled)
    x_s = student.calls[-1][0][:B]
    main, mix = halves(unlabeled)
    expected = torch.where(
        main["cutmix_box"][:, None],
        normalize_input(student, mix["image_strong"]),
        normalize_input(student, main["image_strong"]),
    )
    assert main["cutmix_box"].any() and torch.equal(x_s, expected)


@pytest.mark.parametrize("partner_pass", ["train", "eval"])
def test_self_teacher_uses_the_training_forward_and_predicts_the_partner_in_its_mode(partner_pass):
    student = Spy().train()
    labeled, unlabeled = synthetic_batch()
    selector = RecordingSelector(none_select)
    run_step(student, teacher=SelfTeacher(student, partner_pass), selector=selector, unlabeled=unlabeled)
    (mix_input, mix_fp, mix_training), (joint, joint_fp, joint_training) = student.calls[:2]
    main, mix = halves(unlabeled)
    assert torch.equal(mix_input, normalize_input(student, mix["image_weak"])) and not mix_fp
    assert mix_training == (partner_pass == "train")
    assert joint_fp and joint_training and torch.equal(joint[B:], normalize_input(student, main["image_weak"]))
    with torch.no_grad():
        weak_probs = student.conv(normalize_input(student, main["image_weak"])).softmax(1)
    assert torch.allclose(selector.probs[:B], weak_probs, atol=1e-6)


def test_ema_teacher_gives_both_predictions():
    student = TinySegNet().train()
    teacher = EmaTeacher(student, momentum=0.99)
    with torch.no_grad():
        teacher.model.classifier.bias.add_(1.0)  # make the teacher differ from the student
    labeled, unlabeled = synthetic_batch()
    selector = RecordingSelector(none_select)
    out = run_step(student, teacher=teacher, selector=selector, unlabeled=unlabeled)
    assert torch.isfinite(out.loss)
    main, mix = halves(unlabeled)
    expected = teacher.predict(normalize_input(student, torch.cat((main["image_weak"], mix["image_weak"]))))
    assert torch.allclose(selector.probs, expected, atol=1e-5)


class TwoHeads(nn.Module):
    """Per-pixel linear logits, and a second linear map as the feature-perturbation branch: deterministic, and
    different from the main branch, so a reference can recompute every loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.conv_fp = nn.Conv2d(3, C, 1), nn.Conv2d(3, C, 1)
        self.register_buffer("pixel_mean", torch.tensor([0.4, 0.5, 0.6]).view(3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1))

    def forward(self, x, need_fp=False):
        return (self.conv(x), self.conv_fp(x)) if need_fp else self.conv(x)


# Each unlabelled row is told apart by its padding: main crops pad bottom rows, partners right columns, each row a
# different amount. The selector stub looks a row up by its padding and gives it a constant label and weight.
MAIN_PADDING, PARTNER_PADDING = ((3, 0), (5, 0)), ((0, 4), (0, 6))  # (bottom rows, right columns) per row
ROW_LABEL_WEIGHT = {(3, 0): (1, 1.0), (5, 0): (2, 0.4), (0, 4): (0, 0.7), (0, 6): (2, 1.0)}


def padding_of(valid):
    """(fully invalid bottom rows, fully invalid right columns) of one bool [H, W] valid mask."""
    return int((~valid).all(1).sum()), int((~valid).all(0).sum())


def row_constant_selector(probs, valid):
    """A Selection with each row's constant label and weight (0 on invalid pixels, as the Selection contract)."""
    labels, weights = zip(*(ROW_LABEL_WEIGHT[padding_of(v)] for v in valid), strict=True)
    label_map = torch.tensor(labels)[:, None, None].expand_as(valid).clone()
    weight_map = torch.tensor(weights)[:, None, None] * valid
    return Selection(weights=weight_map, labels=label_map, reliable=(weight_map == 1) & valid, confidence=weight_map)


def cutmix_rows(seed=7):
    """One labelled row and two unlabelled main rows with two partners (n_l != n_u), every row CutMixed.

    The boxes overlap the main crops' and the partners' padding, in different amounts.
    """
    g = torch.Generator().manual_seed(seed)
    labeled = dict(zip(("image", "mask"), blobs(1, g), strict=True))
    rows = {}
    for name, paddings in (("main", MAIN_PADDING), ("partner", PARTNER_PADDING)):
        weak, _ = blobs(2, g)
        valid = torch.ones(2, S, S, dtype=torch.bool)
        for row, (bottom, right) in enumerate(paddings):
            valid[row, S - bottom :] = False
            valid[row, :, S - right :] = False
        weak = weak * valid[:, None]
        rows[name] = {
            "image_weak": weak,
            "image_strong": (weak.float() * 0.7 + 30 * valid[:, None]).to(torch.uint8),
            "image_masked": (weak.float() * 0.9).to(torch.uint8),
            "tmp_cells": torch.stack([tmp_cells(S, 8, 0.5, g) for _ in range(2)]),
            "cutmix_box": torch.zeros(2, S, S, dtype=torch.bool),
            "valid": valid,
        }
    box = rows["main"]["cutmix_box"]
    box[0, S // 2 :, S // 2 :] = True  # the bottom-right quadrant: both paddings of row 0
    box[1, 4:, S - 10 :] = True  # a right band: the partner's padding and part of the main crop's
    return labeled, rows["main"], rows["partner"]


def reference_losses(model, labeled, main, partner):
    """L_x, L_s, L_m, L_fp recomputed from docs/method.md ("The step", item 6) without the step's helpers (but its
    normalisation)."""

    def constant_maps(rows):
        labels, weights = zip(*(ROW_LABEL_WEIGHT[padding_of(v)] for v in rows["valid"]), strict=True)
        shape = rows["valid"].shape
        return torch.tensor(labels)[:, None, None].expand(shape), torch.tensor(weights)[:, None, None] * rows["valid"]

    def weighted(logits, labels, weights, valid):
        ce = F.cross_entropy(logits, labels, reduction="none")
        return (weights * ce * valid).sum() / valid.sum()

    def norm(images):
        return (images.float() / 255 - model.pixel_mean) / model.pixel_std

    labels, weights = constant_maps(main)
    labels_mix, weights_mix = constant_maps(partner)
    box = main["cutmix_box"]
    with torch.no_grad():
        x_s = torch.where(box[:, None], norm(partner["image_strong"]), norm(main["image_strong"]))
        loss_s = weighted(
            model.conv(x_s),
            torch.where(box, labels_mix, labels),
            torch.where(box, weights_mix, weights),
            torch.where(box, partner["valid"], main["valid"]),
        )
        loss_fp = weighted(model.conv_fp(norm(main["image_weak"])), labels, weights, main["valid"])
        hidden = main["tmp_cells"] & (weights == 1)
        x_m = norm(main["image_masked"]) * ~hidden[:, None]
        loss_m = weighted(model.conv(x_m), labels, weights, main["valid"])
        loss_x = F.cross_entropy(model.conv(norm(labeled["image"])), labeled["mask"])
    num_valid = main["valid"].sum()
    return {
        "loss_x": loss_x,
        "loss_u_s": loss_s,
        "loss_u_m": loss_m,
        "loss_u_fp": loss_fp,
        "mean_weight": weights.sum() / num_valid,
        "selected_ratio": (weights == 1).sum() / num_valid,
    }


@pytest.mark.parametrize("tmp_enabled", [True, False])
def test_cutmix_step_equals_a_reference_computation(tmp_enabled):
    model = TwoHeads()
    labeled, main, partner = cutmix_rows()
    weights = LossWeights(strong=0.1, masked=0.3, fp=0.7)  # distinct, so a swapped weight shows
    out = semi_supervised_step(
        model,
        SelfTeacher(model, RELEASED.teacher.partner_pass),
        row_constant_selector,
        nn.CrossEntropyLoss(ignore_index=255),
        labeled,
        paired(main, partner),
        weights=weights,
        weight_floor=0.0,
        tmp_enabled=tmp_enabled,
        ignore_index=255,
        bn_stats=RELEASED.bn_stats,
    )
    expected = reference_losses(model, labeled, main, partner)
    if not tmp_enabled:
        expected["loss_u_m"] = torch.tensor(0.0)
    for name, value in expected.items():
        assert float(out.metrics[name]) == pytest.approx(float(value), rel=1e-5), name
    total = (
        expected["loss_x"]
        + weights.strong * expected["loss_u_s"]
        + weights.masked * expected["loss_u_m"]
        + weights.fp * expected["loss_u_fp"]
    ) / 2
    assert float(out.loss.detach()) == pytest.approx(float(total), rel=1e-5)


def test_unlabeled_losses_divide_by_valid_pixels():
    student = Spy()
    labeled, unlabeled = synthetic_batch(cutmix_prob=0.0)
    top = torch.zeros(S, S, dtype=torch.bool)
    top[: S // 2] = True

    def top_half(probs, valid):
        base = none_select(probs, valid)
        weights = (base.weights * top).float()
        return Selection(weights=weights, labels=base.labels, reliable=weights == 1, confidence=base.confidence)

    out = run_step(student, selector=top_half, unlabeled=unlabeled)
    main, _ = halves(unlabeled)
    x_m = student.calls[-1][0][B:]
    with torch.no_grad():
        logits = student.conv(x_m)
        labels = student.conv(normalize_input(student, main["image_weak"])).argmax(
            1
        )  # pseudo-labels come from the weak view
    ce = F.cross_entropy(logits, labels, reduction="none")
    valid = main["valid"]
    expected = ce[valid & top].sum() / valid.sum()
    assert out.metrics["loss_u_m"] == pytest.approx(float(expected), rel=1e-5)
    assert out.metrics["mean_weight"] == pytest.approx(float((valid & top).sum() / valid.sum()))


def test_tmp_disabled_skips_the_masked_branch():
    student = Spy()
    out = run_step(student, tmp_enabled=False)
    assert out.metrics["loss_u_m"] == 0
    assert len(student.calls[-1][0]) == B  # the last pass holds the strong view only


def test_supervised_step():
    student = tiny_model().train()
    labeled, _ = synthetic_batch()
    out = supervised_step(student, nn.CrossEntropyLoss(ignore_index=255), labeled, labeled_weight=1.0)
    assert set(out.metrics) == {"loss", "loss_x"} and torch.isfinite(out.loss) and out.loss.requires_grad
    halved = supervised_step(student, nn.CrossEntropyLoss(ignore_index=255), labeled, labeled_weight=0.5)
    assert torch.allclose(halved.loss, out.metrics["loss_x"] / 2) and torch.allclose(halved.metrics["loss_x"], out.loss)


def test_sigmoid_rampup_is_mean_teachers_curve():
    assert sigmoid_rampup(0.0) == pytest.approx(math.exp(-5)) and sigmoid_rampup(1.0) == 1.0
    assert sigmoid_rampup(-3.0) == sigmoid_rampup(0.0) and sigmoid_rampup(7.0) == 1.0
    assert sigmoid_rampup(0.5) == pytest.approx(math.exp(-1.25))
    curve = [sigmoid_rampup(t / 10) for t in range(11)]
    assert curve == sorted(curve) and len(set(curve)) == 11


def test_unlabeled_scale_is_off_then_ramps_from_the_end_of_the_warm_up():
    assert [unlabeled_scale(step, 0, 0) for step in range(3)] == [1.0, 1.0, 1.0]  # the released recipe
    assert [unlabeled_scale(step, 3, 0) for step in range(5)] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert [in_warmup(step, 3) for step in range(5)] == [True, True, True, False, False]
    ramp = [unlabeled_scale(step, 2, 4) for step in range(8)]
    assert ramp[:2] == [0.0, 0.0]
    assert ramp[2:] == pytest.approx([sigmoid_rampup(t / 4) for t in range(6)])
    assert ramp[6:] == [1.0, 1.0]


def test_floor_weights_zeroes_only_weights_below_the_floor():
    weights = torch.tensor([[[0.0, 0.2, 0.5, 0.7, 1.0]]])
    assert torch.equal(floor_weights(weights, 0.5), torch.tensor([[[0.0, 0.0, 0.5, 0.7, 1.0]]]))
    assert floor_weights(weights, 0.0) is weights
    hard = threshold_select(
        torch.tensor([[[[0.9]], [[0.1]]]]).expand(1, 2, 2, 2).contiguous(), torch.ones(1, 2, 2).bool(), threshold=0.5
    )
    assert torch.equal(floor_weights(hard.weights, 1.0), hard.weights)  # 0/1 weights pass any floor <= 1


def test_the_step_floors_the_selector_weights_of_crops_and_partners():
    labeled, unlabeled = synthetic_batch(cutmix_prob=1.0)
    soft = torch.linspace(0.05, 0.95, S * S).reshape(S, S)

    def graded(probs, valid):
        base = none_select(probs, valid)
        weights = base.weights * soft
        return Selection(weights=weights, labels=base.labels, reliable=weights == 1, confidence=base.confidence)

    def floored(probs, valid):
        base = graded(probs, valid)
        weights = torch.where(base.weights < 0.5, 0.0, base.weights)
        return Selection(weights=weights, labels=base.labels, reliable=base.reliable, confidence=base.confidence)

    outputs = []
    for selector, floor in ((graded, 0.5), (floored, 0.0), (graded, 0.0)):
        torch.manual_seed(0)  # the same feature-perturbation dropout in each run
        outputs.append(run_step(Spy(), selector=selector, unlabeled=unlabeled, labeled=labeled, weight_floor=floor))
    with_floor, by_hand, without = outputs
    for key in ("loss", "loss_u_s", "loss_u_m", "loss_u_fp", "mean_weight"):
        assert torch.equal(with_floor.metrics[key], by_hand.metrics[key]), key
    assert with_floor.metrics["mean_weight"] < without.metrics["mean_weight"]


def test_nan_logits_give_a_nan_loss_not_an_error():
    out = run_step(Spy(nan=True))
    assert torch.isnan(out.loss)


def test_a_few_dozen_steps_lower_the_loss():
    torch.manual_seed(0)
    student = TinySegNet().train()
    teacher = SelfTeacher(student, RELEASED.teacher.partner_pass)
    selector = build_selector(load_config().ssl.selector)  # CSL with the paper's defaults
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(40):
        labeled, unlabeled = synthetic_batch(seed=step % 8)
        out = semi_supervised_step(
            student,
            teacher,
            selector,
            nn.CrossEntropyLoss(ignore_index=255),
            labeled,
            unlabeled,
            weights=WEIGHTS,
            weight_floor=0.0,
            tmp_enabled=True,
            bn_stats=RELEASED.bn_stats,
            ignore_index=255,
        )
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.metrics["loss"]))
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.5 * first, losses


def running_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("partner_pass", ["train", "eval"])
def test_released_bn_stats_change_only_through_the_labelled_and_weak_pass(partner_pass):
    labeled, unlabeled = synthetic_batch()
    main, _ = halves(unlabeled)
    student = TinySegNet().train()
    twin = copy.deepcopy(student)
    run_step(student, teacher=SelfTeacher(student, partner_pass), labeled=labeled, unlabeled=unlabeled)
    with torch.no_grad():
        twin(
            torch.cat((normalize_input(student, labeled["image"]), normalize_input(student, main["image_weak"]))),
            need_fp=True,
        )
    after, expected = running_stats(student), running_stats(twin)
    assert all(torch.equal(after[k], expected[k]) for k in expected)

    every_pass = copy.deepcopy(twin)  # `all`: the strong + masked pass updates them too
    run_step(every_pass, labeled=labeled, unlabeled=unlabeled, bn_stats="all")
    assert running_stats(every_pass)["features.1.num_batches_tracked"] == 2 + expected["features.1.num_batches_tracked"]
    assert not torch.allclose(running_stats(every_pass)["features.1.running_mean"], expected["features.1.running_mean"])


def test_partner_pass_mode_changes_the_partner_probabilities_and_nothing_else():
    labeled, unlabeled = synthetic_batch(cutmix_prob=1.0)
    base = TinySegNet().train()
    results = {}
    for mode in ("train", "eval"):
        student = copy.deepcopy(base)
        selector = RecordingSelector(none_select)
        torch.manual_seed(0)  # the same feature-perturbation dropout in both runs
        out = run_step(
            student, teacher=SelfTeacher(student, mode), selector=selector, labeled=labeled, unlabeled=unlabeled
        )
        results[mode] = (selector.probs, out.metrics, running_stats(student), student.training)
    (probs_t, metrics_t, stats_t, training_t), (probs_e, metrics_e, stats_e, training_e) = results.values()
    assert torch.equal(probs_t[:B], probs_e[:B])  # the main crops' pseudo-labels come from the training forward
    assert not torch.allclose(probs_t[B:], probs_e[B:], atol=1e-3)  # batch vs running statistics
    assert all(torch.equal(stats_t[k], stats_e[k]) for k in stats_t) and training_t and training_e
    for key in ("loss_x", "loss_u_m", "loss_u_fp", "selected_ratio", "mean_weight"):
        assert torch.equal(metrics_t[key], metrics_e[key]), key
    assert not torch.equal(metrics_t["loss_u_s"], metrics_e["loss_u_s"])  # the CutMix boxes carry partner labels
