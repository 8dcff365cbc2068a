import math

import pytest
import torch

from csl_ray.metrics import ConfusionMatrix


def test_confusion_matrix_hand_example():
    cm = ConfusionMatrix(num_classes=4, ignore_index=255)
    pred = torch.tensor([[0, 1, 1, 2, 3]])
    target = torch.tensor([[0, 1, 2, 255, 255]])
    cm.update(pred, target)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[0, 0] = expected[1, 1] = expected[2, 1] = 1  # rows = target, columns = prediction
    assert torch.equal(cm.mat, expected)
    iou = cm.iou()
    assert iou[:3].tolist() == pytest.approx([100.0, 50.0, 0.0])
    assert math.isnan(iou[3])  # class 3 only predicted on ignore pixels: absent, not scored 0
    assert cm.miou() == pytest.approx(50.0)
    assert cm.pixel_acc() == pytest.approx(200.0 / 3)


def test_updates_accumulate_and_ignore_never_counts():
    cm = ConfusionMatrix(num_classes=3, ignore_index=255)
    target = torch.randint(0, 3, (2, 5, 6))
    target[:, :2] = 255
    for _ in range(2):
        cm.update(torch.randint(0, 3, (2, 5, 6)), target)
    assert int(cm.mat.sum()) == 2 * int((target != 255).sum())


def test_perfect_prediction_and_empty_matrix():
    cm = ConfusionMatrix(num_classes=3, ignore_index=255)
    assert math.isnan(cm.miou()) and math.isnan(cm.pixel_acc())
    target = torch.tensor([[0, 1, 2, 2]])
    cm.update(target.clone(), target)
    assert cm.miou() == 100.0 and cm.pixel_acc() == 100.0


def test_all_reduce_without_distributed_is_a_no_op():
    cm = ConfusionMatrix(num_classes=2, ignore_index=255)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    before = cm.mat.clone()
    cm.all_reduce()
    assert torch.equal(cm.mat, before)


def test_shape_mismatch_raises():
    matrix = ConfusionMatrix(num_classes=2, ignore_index=255)
    with pytest.raises(ValueError, match="shape"):
        matrix.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
