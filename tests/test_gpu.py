"""The CUDA path: bf16 autocast in the step, SyncBatchNorm under DDP, the selector on CUDA vs CPU.

Marked `gpu` and skipped without CUDA. On a GPU machine without Ray: `python -m pytest -m gpu tests/test_gpu.py`
(naming the file keeps pytest from importing the Ray tests; benchmarks/README.md, "GPU check").
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_step import C, S, synthetic_batch
from torch import nn

from benchmarks.selector import CSL, THRESHOLD, make_inputs
from csl_ray.config import load_config
from csl_ray.loop import TrainLoop

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def small_cfg(*overrides):
    """The pascal recipe on a small ResNet-18 (named here, not taken from the changing `tiny` preset)."""
    base = [
        "model.backbone=resnet18",
        "model.output_stride=16",
        "model.decoder_channels=32",
        f"data.num_classes={C}",
        f"data.crop_size={S}",
        "data.global_batch_size=2",
        "ssl.tmp.block=8",
        "train.iterations=10",
        "optim.lr=0.01",
    ]
    return load_config(preset="pascal", overrides=[*base, *overrides])


def to_cuda(batch):
    return {k: v.cuda() for k, v in batch.items()}


@pytest.fixture
def process_group(tmp_path):
    """A 1-rank nccl process group, as a Ray Train worker on one GPU has."""
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_bf16_autocast_step_gives_a_finite_loss_and_changes_the_weights():
    loop = TrainLoop(small_cfg("train.precision=bf16"), "cuda")
    assert loop.autocast
    dtypes = []
    loop.student.classifier.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    before = [p.detach().clone() for p in loop.student.parameters()]
    labeled, unlabeled = synthetic_batch()
    for _ in range(2):
        metrics = loop.train_step(to_cuda(labeled), to_cuda(unlabeled))
        assert metrics["skipped"] == 0.0
        assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert set(dtypes) == {torch.bfloat16}  # every forward of the step ran under autocast
    after = list(loop.student.parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in after)  # master weights stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_wrap_ddp_converts_batchnorm_to_syncbatchnorm_in_place(process_group):
    loop = TrainLoop(small_cfg(), "cuda")
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in loop.student.modules())
    params = {id(p) for p in loop.student.parameters()}
    loop.wrap_ddp()
    assert isinstance(loop.model, nn.parallel.DistributedDataParallel)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in loop.student.modules()) == batchnorms > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loop.student.modules())
    # The optimiser and the self teacher still hold the student's own tensors.
    assert {id(p) for group in loop.optimizer.param_groups for p in group["params"]} == params
    assert loop.teacher.student is loop.student
    sync_bn = next(m for m in loop.student.modules() if isinstance(m, nn.SyncBatchNorm))
    running_mean = sync_bn.running_mean.clone()
    labeled, unlabeled = synthetic_batch()
    metrics = loop.train_step(to_cuda(labeled), to_cuda(unlabeled))
    assert metrics["skipped"] == 0.0
    assert not torch.equal(sync_bn.running_mean, running_mean)


def test_syncbatchnorm_cross_process_path_matches_batchnorm(process_group):
    """The path that syncs statistics (batch_norm_stats, an NCCL all-gather, gather_stats_with_counts and the
    matching backward) on one rank equals plain BatchNorm. nn.SyncBatchNorm skips that path when the group has one
    rank, so it is called directly here; a cluster run takes it with every rank."""
    from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFunction

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 8, 6, 5, generator=gen) * 3 + 1).cuda().requires_grad_()
    weight = torch.rand(8, generator=gen).cuda().requires_grad_()
    bias = torch.randn(8, generator=gen).cuda().requires_grad_()
    upstream = torch.randn(4, 8, 6, 5, generator=gen).cuda()
    stats_sync, stats_plain = (
        [torch.zeros(8).cuda(), torch.ones(8).cuda()],
        [torch.zeros(8).cuda(), torch.ones(8).cuda()],
    )

    synced = SyncBatchNormFunction.apply(x, weight, bias, *stats_sync, 1e-5, 0.1, process_group, 1)
    grads_sync = torch.autograd.grad(synced, (x, weight, bias), upstream)
    plain = F.batch_norm(x, *stats_plain, weight, bias, training=True, momentum=0.1, eps=1e-5)
    grads_plain = torch.autograd.grad(plain, (x, weight, bias), upstream)

    # Different kernels reduce in different orders: float32 agreement, not bitwise.
    for a, b in zip([synced, *grads_sync, *stats_sync], [plain, *grads_plain, *stats_plain], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_csl_select_on_cuda_matches_cpu(dtype):
    probs, valid = make_inputs(4, 21, 97, "cpu")
    probs = probs.to(dtype)
    on_cpu = CSL(probs, valid)  # the csl selector with the config's defaults
    on_cuda = CSL(probs.cuda(), valid.cuda())
    assert torch.equal(on_cuda.labels.cpu(), on_cpu.labels)
    assert torch.equal(on_cuda.confidence.cpu(), on_cpu.confidence)
    diff = (on_cuda.weights.cpu() - on_cpu.weights).abs()
    if dtype == torch.float64:
        assert torch.equal(on_cuda.stats["cluster_sizes"].cpu(), on_cpu.stats["cluster_sizes"])
        assert diff.max() <= 1e-5
    else:
        # float32 features: sums in another order can move a pixel sitting on a cluster boundary or on z = 0
        # (tests/test_selection.py explains both); such pixels are rare on random maps.
        assert (diff > 1e-5).float().mean() <= 1e-4
    assert torch.equal(on_cuda.reliable.cpu(), on_cuda.weights.cpu() == 1.0)


def test_threshold_select_on_cuda_matches_cpu():
    probs, valid = make_inputs(2, 19, 64, "cpu", seed=1)
    on_cpu, on_cuda = THRESHOLD(probs, valid), THRESHOLD(probs.cuda(), valid.cuda())
    assert torch.equal(on_cuda.weights.cpu(), on_cpu.weights)
    assert torch.equal(on_cuda.labels.cpu(), on_cpu.labels)
