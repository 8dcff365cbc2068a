import math

import pytest
import torch
from torch import nn

from csl_ray.evaluate import center_crop, evaluate, predict, window_starts

C = 4
STEP = 50  # the red channel of a test image holds class * STEP
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)  # deliberately not ImageNet's: the model's own buffers must be used


def with_pixel_stats(model: nn.Module) -> nn.Module:
    """Gives a test model the `pixel_mean` / `pixel_std` buffers that evaluation normalises with."""
    model.register_buffer("pixel_mean", torch.tensor(MEAN).view(3, 1, 1))
    model.register_buffer("pixel_std", torch.tensor(STD).view(3, 1, 1))
    return model


class Oracle(nn.Module):
    """Reads the class painted into the red channel and returns its one-hot logits: a perfect model."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device
        with_pixel_stats(self)

    def forward(self, x):
        red = (x[:, 0] * STD[0] + MEAN[0]) * 255
        cls = (red / STEP).round().long().clamp(0, C - 1)
        return nn.functional.one_hot(cls, C).permute(0, 3, 1, 2).float() * 10 + self.anchor


def painted(mask):
    """uint8 image [N, 3, H, W] whose red channel encodes `mask` (255 = ignore -> class 0) and others are noise."""
    image = torch.randint(0, 256, (mask.shape[0], 3, *mask.shape[1:]), dtype=torch.uint8)
    image[:, 0] = (mask.clamp(max=C - 1) * STEP).to(torch.uint8)
    return image


def batches(n=3, h=20, w=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.randint(0, C, (1, h, w), generator=g)
        out.append({"image": painted(mask), "mask": mask})
    return out


@pytest.mark.parametrize("mode", ["full", "center_crop", "sliding_window"])
def test_perfect_prediction_scores_100(mode):
    result = evaluate(Oracle(), batches(), num_classes=C, mode=mode, crop_size=12, ignore_index=255)
    assert result["miou"] == pytest.approx(100.0)
    assert result["pixel_acc"] == pytest.approx(100.0)
    assert result["iou_per_class"] == pytest.approx([100.0] * C)


def test_ignore_pixels_never_count():
    data = batches()
    for batch in data:
        batch["mask"][:, :5] = 255  # the oracle predicts class 0 there, which is wrong wherever the image says so
        batch["image"][:, 0, :5] = 3 * STEP
    result = evaluate(Oracle(), data, num_classes=C, mode="full", crop_size=12, ignore_index=255)
    assert result["miou"] == pytest.approx(100.0)


def test_absent_class_is_nan_not_zero():
    data = batches()
    for batch in data:
        batch["mask"].clamp_(max=C - 2)
        batch["image"] = painted(batch["mask"])
    result = evaluate(Oracle(), data, num_classes=C, mode="full", crop_size=12, ignore_index=255)
    assert math.isnan(result["iou_per_class"][-1])
    assert result["miou"] == pytest.approx(100.0)


def test_modes_agree_when_the_crop_covers_the_image():
    torch.manual_seed(0)
    model = with_pixel_stats(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, C, 3, padding=1))
    )
    image = torch.randint(0, 256, (2, 3, 17, 23), dtype=torch.uint8)
    full = predict(model, image, mode="full", crop_size=23)
    for mode in ("center_crop", "sliding_window"):
        assert torch.allclose(predict(model, image, mode=mode, crop_size=23), full, atol=1e-6)
    data = [{"image": image[:1], "mask": torch.randint(0, C, (1, 17, 23))}]
    scores = [
        evaluate(model, data, num_classes=C, mode=m, crop_size=30, ignore_index=255)["miou"]
        for m in ("full", "center_crop")
    ]
    assert scores[0] == pytest.approx(scores[1])


def test_sliding_window_averages_overlaps():
    # A per-pixel model is context free, so averaging overlapping windows must reproduce the full-image softmax.
    torch.manual_seed(0)
    model = with_pixel_stats(nn.Conv2d(3, C, 1))
    image = torch.randint(0, 256, (1, 3, 25, 31), dtype=torch.uint8)
    sliding = predict(model, image, mode="sliding_window", crop_size=9)
    assert torch.allclose(sliding, predict(model, image, mode="full", crop_size=9), atol=1e-6)
    assert torch.allclose(sliding.sum(1), torch.ones(1, 25, 31))


def test_window_starts_cover_the_side_like_unimatch():
    assert window_starts(1024, 801, 534) == [0, 534]
    assert window_starts(2048, 801, 534) == [0, 534, 1068, 1602]
    assert window_starts(64, 64, 42) == [0]


def test_center_crop_scores_only_the_crop():
    mask = torch.randint(0, C, (1, 20, 30))
    image = painted(mask)
    image[:, 0, :, :5] = (((mask[:, :, :5] + 1) % C) * STEP).to(torch.uint8)  # wrong outside the central 20x20
    data = [{"image": image, "mask": mask}]
    assert evaluate(Oracle(), data, num_classes=C, mode="center_crop", crop_size=20, ignore_index=255)[
        "miou"
    ] == pytest.approx(100.0)
    assert evaluate(Oracle(), data, num_classes=C, mode="full", crop_size=20, ignore_index=255)["miou"] < 100.0
    assert center_crop(mask, 20).shape == (1, 20, 20)
    assert center_crop(mask, 40).shape == (1, 20, 30)


def test_model_mode_is_restored_and_bad_mode_rejected():
    model = Oracle().train()
    evaluate(model, batches(1), num_classes=C, mode="full", crop_size=8, ignore_index=255)
    assert model.training
    with pytest.raises(ValueError, match="eval mode"):
        evaluate(model, [], num_classes=C, mode="whole", crop_size=8, ignore_index=255)


def test_pseudo_label_panels_show_selection_correctness_and_the_tmp_view():
    from csl_ray.selection import threshold_select
    from csl_ray.tracking import PSEUDO_LABEL_COLUMNS, pseudo_label_panels

    g = torch.Generator().manual_seed(1)
    predicted = torch.randint(0, C, (2, 12, 12), generator=g)
    truth = predicted.clone()
    truth[:, :3] = (predicted[:, :3] + 1) % C  # the teacher is wrong on the top rows
    valid = torch.ones(2, 12, 12, dtype=torch.bool)
    valid[:, -2:] = False  # padding: never reliable
    cells = torch.zeros(2, 12, 12, dtype=torch.bool)
    cells[:, :, :6] = True
    image = painted(predicted)
    batch = {"image_weak": image, "image_masked": image.flip(-1), "tmp_cells": cells, "valid": valid, "mask": truth}
    rows = pseudo_label_panels(
        Oracle(), batch, selector=lambda p, v: threshold_select(p, v, threshold=0.5), num_classes=C, ignore_index=255
    )
    assert len(rows) == 2 and all(list(r) == list(PSEUDO_LABEL_COLUMNS) for r in rows)
    mean_rgb = torch.tensor([round(255 * m) for m in MEAN], dtype=torch.uint8)
    for i, row in enumerate(rows):
        status, view = torch.from_numpy(row["reliable"]), torch.from_numpy(row["TMP view"])
        assert (status[:3, :][valid[i, :3]] == torch.tensor([230, 50, 50], dtype=torch.uint8)).all()  # wrong
        assert (status[3:-2] == torch.tensor([60, 200, 80], dtype=torch.uint8)).all()  # right
        assert (status[-2:] == 0).all()  # rejected (invalid)
        blanked = cells[i] & valid[i]
        assert (view[blanked] == mean_rgb).all()
        assert torch.equal(view[~blanked], batch["image_masked"][i].permute(1, 2, 0)[~blanked])
