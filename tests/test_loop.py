import io

import pytest
import torch
from test_step import C, S, synthetic_batch
from torch import nn

from csl_ray.config import load_config
from csl_ray.loop import TrainLoop, run_local, set_rng_state
from csl_ray.optim import poly_lr
from csl_ray.step import unlabeled_scale


def tiny_cfg(*overrides):
    base = [f"data.num_classes={C}", f"data.crop_size={S}", "train.iterations=10", "optim.lr=0.01",
            "ssl.warmup_iterations=0"]  # fmt: skip
    return load_config(preset="tiny", overrides=[*base, *overrides])


def val_batches(n=2):
    batches = []
    for seed in range(n):
        labeled, _ = synthetic_batch(seed=100 + seed, batch=1)
        batches.append(labeled)
    return batches


def test_state_dict_round_trip_resumes_exactly():
    cfg = tiny_cfg("ssl.teacher.kind=ema")  # the EMA teacher has state of its own to restore
    loop = TrainLoop(cfg, "cpu")
    loop.step = 4  # EMA momentum 0.8: the teacher becomes neither the student nor its initial copy
    loop.train_step(*synthetic_batch())
    loop.best_miou = 12.5
    buffer = io.BytesIO()
    torch.save(loop.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed = TrainLoop(cfg, "cpu")
    resumed.load_state_dict(state)
    assert (resumed.step, resumed.best_miou, resumed.skipped_steps) == (5, 12.5, 0)
    assert_same_tensors(resumed.teacher.state_dict(), loop.teacher.state_dict())
    assert not torch.equal(resumed.teacher.model.classifier.weight, resumed.student.classifier.weight)
    saved, loaded = loop.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for key, value in saved["state"].items():
        assert torch.equal(value["momentum_buffer"], loaded["state"][key]["momentum_buffer"])

    # The RNG is process-wide: building `resumed` moved it, so rewind before each continuation.
    batch = synthetic_batch(seed=1)
    after_resume = resumed.train_step(*batch)
    set_rng_state(state["rng"], torch.device("cpu"))
    after_original = loop.train_step(*batch)
    assert after_resume == after_original
    assert_same_tensors(loop.student.state_dict(), resumed.student.state_dict())
    assert_same_tensors(loop.teacher.state_dict(), resumed.teacher.state_dict())


def assert_same_tensors(first, second):
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


def test_ema_teacher_moves_by_the_configured_momentum_and_not_on_a_skipped_step():
    loop = TrainLoop(tiny_cfg("ssl.teacher.kind=ema", "ssl.teacher.momentum=0.6", "train.iterations=100"), "cpu")
    loop.step = 10  # past the ramp: ema_momentum(10, 0.6) = min(1 - 1/11, 0.6) = the configured 0.6
    before = [p.clone() for p in loop.teacher.model.parameters()]
    loop.train_step(*synthetic_batch())
    moved = False
    for old, student, teacher in zip(before, loop.student.parameters(), loop.teacher.model.parameters(), strict=True):
        torch.testing.assert_close(teacher, 0.6 * old + 0.4 * student)
        moved |= not torch.equal(teacher, old)
    assert moved
    assert_same_tensors(dict(loop.teacher.model.named_buffers()), dict(loop.student.named_buffers()))

    teacher_state = {k: v.clone() for k, v in loop.teacher.state_dict().items()}
    first_conv = next(m for m in loop.student.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    assert loop.train_step(*synthetic_batch(seed=1))["skipped"] == 1.0
    assert_same_tensors(loop.teacher.state_dict(), teacher_state)


def test_poly_lr_is_applied_per_iteration():
    cfg = tiny_cfg("ssl.enabled=false")
    loop = TrainLoop(cfg, "cpu")
    labeled, _ = synthetic_batch()
    for step in range(3):
        metrics = loop.train_step(labeled)
        assert metrics["lr"] == pytest.approx(poly_lr(step, 10, 0.01, cfg.optim.poly_power))
        backbone, head = loop.optimizer.param_groups
        assert head["lr"] == pytest.approx(cfg.optim.lr_multi * backbone["lr"])
    assert set(metrics) == {"loss", "loss_x", "lr", "step", "skipped"} and loop.step == 3


def test_non_finite_loss_is_skipped_counted_and_leaves_no_trace():
    loop = TrainLoop(tiny_cfg(), "cpu")
    first_conv_name, first_conv = next((n, m) for n, m in loop.student.named_modules() if isinstance(m, nn.Conv2d))
    hook = first_conv.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    before = {k: v.clone() for k, v in loop.student.state_dict().items()}
    metrics = loop.train_step(*synthetic_batch())
    assert metrics["skipped"] == 1.0 and loop.skipped_steps == 1 and loop.step == 1
    for key, value in loop.student.state_dict().items():  # weights and BatchNorm statistics untouched
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in loop.student.parameters())
    hook.remove()
    metrics = loop.train_step(*synthetic_batch())
    assert metrics["skipped"] == 0.0 and loop.skipped_steps == 1
    assert not torch.equal(first_conv.weight, before[f"{first_conv_name}.weight"])


def test_validate_tracks_the_best_miou():
    loop = TrainLoop(tiny_cfg(), "cpu")
    result = loop.validate(val_batches())
    assert {"miou", "iou_per_class", "pixel_acc", "best_miou"} <= set(result)
    assert result["best_miou"] == loop.best_miou == max(result["miou"], 0.0)
    loop.best_miou = 101.0
    assert loop.validate(val_batches())["best_miou"] == 101.0


def test_run_local_supervised_only():
    cfg = tiny_cfg("ssl.enabled=false", "train.iterations=3", "train.eval_every=2", "logging.log_every=1")
    logged = []
    labeled, _ = synthetic_batch()
    result = run_local(cfg, [labeled], None, val_batches(), log=logged.append)
    assert result["step"] == 3 and [v["step"] for v in result["val_history"]] == [2, 3]
    assert result["val"] == result["val_history"][-1] and result["skipped_steps"] == 0
    assert sum("miou" in entry for entry in logged) == 2 and sum("loss" in entry for entry in logged) == 3


def test_run_local_semi_supervised_cycles_its_sources():
    cfg = tiny_cfg("train.iterations=2", "train.eval_every=2")
    labeled, unlabeled = synthetic_batch()
    result = run_local(cfg, [labeled], [unlabeled], val_batches(1))
    assert result["step"] == 2 and len(result["val_history"]) == 1 and result["seconds_per_step"] > 0


def test_an_exhausted_one_shot_source_is_an_error():
    cfg = tiny_cfg("ssl.enabled=false")
    with pytest.raises(ValueError, match="labeled_iter yielded no batches"):
        run_local(cfg, iter([]), None, [])


def count_forwards(module):
    calls = []
    module.register_forward_hook(lambda m, inputs, output: calls.append(len(inputs[0])))
    return calls


def test_warm_up_steps_run_the_labelled_pass_alone_then_the_ramp_up_starts():
    cfg = tiny_cfg("ssl.warmup_iterations=2", "ssl.rampup_iterations=2")
    loop = TrainLoop(cfg, "cpu")
    forwards = count_forwards(loop.student)
    labeled, unlabeled = synthetic_batch()
    for _ in range(2):
        metrics = loop.train_step(labeled, unlabeled)
        assert forwards == [len(labeled["image"])]  # one pass over the labelled rows: no teacher, no unlabelled views
        assert set(metrics) == {"loss", "loss_x", "lr", "step", "skipped", "unlabeled_scale"}
        assert metrics["unlabeled_scale"] == 0.0 and metrics["loss"] == pytest.approx(metrics["loss_x"] / 2)
        forwards.clear()
    scales = [loop.train_step(labeled, unlabeled)["unlabeled_scale"] for _ in range(3)]
    assert scales == pytest.approx([unlabeled_scale(step, 2, 2) for step in range(2, 5)])
    assert 0 < scales[0] < scales[1] < scales[2] == 1.0
    assert len(forwards) == 3 * 3  # the partner's teacher pass, [x_l; x_w], then [x_s; x_m]


def test_the_warm_up_needs_no_unlabelled_batch():
    loop = TrainLoop(tiny_cfg("ssl.warmup_iterations=1"), "cpu")
    labeled, _ = synthetic_batch()
    assert loop.train_step(labeled)["unlabeled_scale"] == 0.0
    with pytest.raises(ValueError, match="no unlabelled batch"):
        loop.train_step(labeled)


def _ddp_rank(rank, init_file, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        loop = TrainLoop(tiny_cfg("ssl.warmup_iterations=1", "ray.num_workers=2"), "cpu", rank=rank, world_size=2)
        loop.wrap_ddp()
        for step in range(2):
            labeled, unlabeled = synthetic_batch(seed=10 * step + rank)  # each rank its own data
            loop.train_step(labeled, unlabeled)
        results[rank] = [p.detach().clone() for p in loop.student.parameters()]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_stay_in_step_through_the_warm_up(tmp_path):
    import torch.multiprocessing as mp

    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.spawn(_ddp_rank, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    for a, b in zip(results[0], results[1], strict=True):  # gradients were all-reduced at every step
        assert torch.equal(a, b)
