"""Self and EMA teachers: shared weights, modes, no grad, the EMA update math and the momentum schedule."""

import pytest
import torch
from torch import nn

from csl_ray.config import load_config
from csl_ray.teacher import EmaTeacher, SelfTeacher, build_teacher, ema_momentum

NUM_CLASSES = 4


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout2d(0.5), nn.Conv2d(8, NUM_CLASSES, 1)
    )


def images() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_ema_momentum_schedule():
    assert ema_momentum(0, 0.999) == 0.0
    assert ema_momentum(1, 0.999) == pytest.approx(0.5)
    assert ema_momentum(9, 0.999) == pytest.approx(0.9)
    assert ema_momentum(100_000, 0.999) == 0.999
    values = [ema_momentum(s, 0.99) for s in range(500)]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    assert max(values) == 0.99


def test_self_teacher_shares_weights_and_restores_train_mode():
    student = tiny_net().train()
    teacher = SelfTeacher(student, "eval")
    assert teacher.kind == "self"
    assert teacher.student is student
    assert all(a is b for a, b in zip(teacher.student.parameters(), student.parameters(), strict=True))
    running_mean = student[1].running_mean.clone()
    x = images()
    probs = teacher.predict(x)
    assert student.training and all(m.training for m in student.modules())
    torch.testing.assert_close(student[1].running_mean, running_mean)  # eval mode: statistics untouched
    assert not probs.requires_grad
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 8, 8))
    with torch.no_grad():
        expected = student.eval()(x).softmax(1)  # eval mode: deterministic (no dropout), running BN statistics
    torch.testing.assert_close(probs, expected)
    student.eval()
    teacher.predict(x)
    assert not student.training
    teacher.update(student, 10)  # a no-op
    assert teacher.state_dict() == {}
    teacher.load_state_dict({})


def test_self_teacher_in_train_mode_uses_batch_statistics_and_keeps_the_running_ones():
    student = tiny_net()
    with torch.no_grad():
        student[1].running_mean.fill_(3.0)  # far from the batch's statistics
    before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher = SelfTeacher(student, "train")
    student.eval()
    x = images()
    torch.manual_seed(4)
    probs = teacher.predict(x)
    assert not student.training  # the caller's mode is restored
    for key, value in student.state_dict().items():
        assert torch.equal(value, before[key]), key  # running statistics and batch counter put back
    torch.manual_seed(4)  # the same Dropout2d draw: training mode is training mode
    with torch.no_grad():
        expected = student.train()(x).softmax(1)
    torch.testing.assert_close(probs, expected)
    assert not torch.allclose(probs, SelfTeacher(student, "eval").predict(x), atol=1e-3)  # running statistics


def test_self_teacher_unwraps_data_parallel():
    student = tiny_net()
    assert SelfTeacher(nn.DataParallel(student), "eval").student is student


def test_ema_teacher_is_a_frozen_eval_copy():
    student = tiny_net().train()
    teacher = EmaTeacher(nn.DataParallel(student), momentum=0.99)
    assert teacher.kind == "ema"
    assert not isinstance(teacher.model, nn.DataParallel)
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    assert all(p is not q for p, q in zip(teacher.model.parameters(), student.parameters(), strict=True))
    x = images()
    probs = teacher.predict(x)
    assert not probs.requires_grad
    torch.testing.assert_close(probs, teacher.predict(x))  # eval mode: no dropout
    student.train()
    assert not teacher.model.training


def test_ema_update_matches_hand_computation():
    student = tiny_net()
    teacher = EmaTeacher(student, momentum=0.99)
    before = [p.clone() for p in teacher.model.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()(images())  # moves the BN running statistics and num_batches_tracked
    teacher.update(student, step=9)  # momentum = min(1 - 1/10, 0.99) = 0.9
    for old, new, ema in zip(before, student.parameters(), teacher.model.parameters(), strict=True):
        torch.testing.assert_close(ema, 0.9 * old + 0.1 * new)
    for ema_buffer, buffer in zip(teacher.model.buffers(), student.buffers(), strict=True):
        assert torch.equal(ema_buffer, buffer)
    teacher.update(student, step=0)  # momentum 0: a plain copy
    for new, ema in zip(student.parameters(), teacher.model.parameters(), strict=True):
        torch.testing.assert_close(ema, new)
    assert all(not p.requires_grad for p in teacher.model.parameters())


def test_ema_state_dict_round_trip():
    teacher = EmaTeacher(tiny_net(), momentum=0.99)
    other = EmaTeacher(nn.Sequential(*tiny_net()), momentum=0.99)
    with torch.no_grad():
        for p in other.model.parameters():
            p.zero_()
    other.load_state_dict(teacher.state_dict())
    for p, q in zip(teacher.model.parameters(), other.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_build_teacher():
    student = tiny_net()
    cfg = load_config(overrides=["ssl.teacher.kind=ema", "ssl.teacher.momentum=0.9"])
    teacher = build_teacher(cfg, student)
    assert isinstance(teacher, EmaTeacher) and teacher.momentum == 0.9
    released = build_teacher(load_config(), student)
    assert isinstance(released, SelfTeacher) and released.partner_pass == "train"
    assert build_teacher(load_config(overrides=["ssl.teacher.partner_pass=eval"]), student).partner_pass == "eval"
