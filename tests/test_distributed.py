"""torch.distributed on a real 2-process gloo group (no Ray): the confusion-matrix sum, the collective skip of a
non-finite step and the BatchNorm broadcast before validation."""

import datetime
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_loop import tiny_cfg, val_batches
from test_step import synthetic_batch
from torch import nn

from csl_ray.loop import TrainLoop
from csl_ray.metrics import ConfusionMatrix

WORLD_SIZE = 2
# A missing collective shows as a timeout error instead of a hang; generous for a loaded 2-core machine.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=300)


def local_pairs(rank):
    """Each rank's (prediction, target) pixels: different on the two ranks, with ignored pixels."""
    g = torch.Generator().manual_seed(rank)
    target = torch.randint(0, 3, (40,), generator=g)
    target[rank::7] = 255
    return torch.randint(0, 3, (40,), generator=g), target


def rank_worker(rank, rendezvous, results):
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD_SIZE, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        matrix = ConfusionMatrix(num_classes=3, ignore_index=255)
        matrix.update(*local_pairs(rank))
        matrix.all_reduce()

        loop = TrainLoop(tiny_cfg("ssl.enabled=false"), "cpu", rank=rank, world_size=WORLD_SIZE)
        loop.wrap_ddp()
        first_conv = next(m for m in loop.student.modules() if isinstance(m, nn.Conv2d))
        if rank == 1:  # only rank 1 sees a non-finite loss; rank 0's is finite
            first_conv.register_forward_hook(lambda module, inputs, output: output * math.nan)
        before = {k: v.clone() for k, v in loop.student.state_dict().items()}
        skipped = loop.train_step(synthetic_batch(seed=rank)[0])["skipped"]
        unchanged = all(torch.equal(v, before[k]) for k, v in loop.student.state_dict().items())

        batch_norm = next(m for m in loop.student.modules() if isinstance(m, nn.BatchNorm2d))
        batch_norm.running_mean.fill_(float(rank))  # the ranks' statistics differ before validation
        loop.validate(val_batches(1))
        torch.save(
            {
                "confusion": matrix.mat,
                "skipped": skipped,
                "unchanged": unchanged,
                "running_mean": batch_norm.running_mean.clone(),
            },
            f"{results}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two ranks saw, by rank."""
    folder = tmp_path_factory.mktemp("gloo")
    mp.start_processes(rank_worker, args=(folder / "rendezvous", folder), nprocs=WORLD_SIZE, start_method="spawn")
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def test_confusion_matrix_all_reduce_sums_the_ranks(ranks):
    expected = ConfusionMatrix(num_classes=3, ignore_index=255)
    for rank in range(WORLD_SIZE):
        expected.update(*local_pairs(rank))
    for result in ranks:
        assert torch.equal(result["confusion"], expected.mat)


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(ranks):
    assert [(r["skipped"], r["unchanged"]) for r in ranks] == [(1.0, True), (1.0, True)]


def test_validation_starts_from_rank_zeros_batch_norm_statistics(ranks):
    assert (ranks[0]["running_mean"] == 0).all() and (ranks[1]["running_mean"] == 0).all()
