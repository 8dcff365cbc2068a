"""Distributed correctness. On a real 2-process gloo group (no Ray): the confusion-matrix sum, the collective skip of
a non-finite step, the BatchNorm broadcast before validation and a validation that scores every rank's images once.
On a real 2-worker Ray Train run: the final scores equal a single-process evaluation of its checkpoint, and the
unlabelled stream gives each rank its own rows."""

import datetime
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_loop import tiny_cfg
from test_step import synthetic_batch
from test_train import small_dataset, tiny
from torch import nn

from csl_ray.evaluate import eval_options, evaluate
from csl_ray.loop import TrainLoop
from csl_ray.metrics import ConfusionMatrix
from csl_ray.offline_eval import evaluate_checkpoint
from csl_ray.tracking import RunDir
from csl_ray.train import build_trainer, fit

WORLD_SIZE = 2
# A missing collective shows as a timeout error instead of a hang; generous for a loaded 2-core machine.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=300)


def local_pairs(rank):
    """Each rank's (prediction, target) pixels: different on the two ranks, with ignored pixels."""
    g = torch.Generator().manual_seed(rank)
    target = torch.randint(0, 3, (40,), generator=g)
    target[rank::7] = 255
    return torch.randint(0, 3, (40,), generator=g), target


def val_shard(rank):
    """Each rank's own validation images: different on the two ranks, as the run's validation split gives them."""
    return [synthetic_batch(seed=200 + 10 * rank + i, batch=1)[0] for i in range(2)]


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
        # Only rank 1 sees a non-finite loss (rank 0's is finite), and only in this step: validation below is finite.
        poison = [first_conv.register_forward_hook(lambda module, inputs, output: output * math.nan)] if rank else []
        before = {k: v.clone() for k, v in loop.student.state_dict().items()}
        skipped = loop.train_step(synthetic_batch(seed=rank)[0])["skipped"]
        for hook in poison:
            hook.remove()
        unchanged = all(torch.equal(v, before[k]) for k, v in loop.student.state_dict().items())

        batch_norm = next(m for m in loop.student.modules() if isinstance(m, nn.BatchNorm2d))
        batch_norm.running_mean.fill_(float(rank))  # the ranks' statistics differ before validation
        scores = loop.validate(val_shard(rank))
        torch.save(
            {
                "confusion": matrix.mat,
                "skipped": skipped,
                "unchanged": unchanged,
                "running_mean": batch_norm.running_mean.clone(),
                "val_miou": scores["miou"],
                "val_iou": torch.tensor(scores["iou_per_class"]),
                "student": loop.student.state_dict(),  # after validation: rank 0's BatchNorm statistics on both
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


def test_validation_scores_the_images_of_every_rank_once(ranks):
    """Each rank validates its own shard; both get the score of the whole set, as one process finds it."""
    cfg = tiny_cfg("ssl.enabled=false")
    model = TrainLoop(cfg, "cpu").student
    model.load_state_dict(ranks[0]["student"])
    whole = evaluate(model, val_shard(0) + val_shard(1), **eval_options(cfg.data))
    # Guards the test: were the shards to score alike, a rank scoring only its own would pass unnoticed.
    assert evaluate(model, val_shard(0), **eval_options(cfg.data))["miou"] != pytest.approx(whole["miou"], abs=1e-3)
    for result in ranks:
        assert result["val_miou"] == pytest.approx(whole["miou"], abs=1e-6)
        torch.testing.assert_close(result["val_iou"], torch.tensor(whole["iou_per_class"]), equal_nan=True)


def test_validation_starts_from_rank_zeros_batch_norm_statistics(ranks):
    assert (ranks[0]["running_mean"] == 0).all() and (ranks[1]["running_mean"] == 0).all()


# ------------------------------------------------------------------------------------------ a 2-worker Ray Train run


@pytest.fixture(scope="module")
def two_worker_cfg(tmp_path_factory):
    """2 CPU workers, 2 iterations, validated (and checkpointed) at the end."""
    out = tmp_path_factory.mktemp("runs")
    return tiny(small_dataset(tmp_path_factory), out, "two-workers", "train.iterations=2", "train.eval_every=2")


@pytest.fixture(scope="module")
def two_worker_run(ray_session, two_worker_cfg):
    """The config and the summary of its run."""
    return two_worker_cfg, fit(two_worker_cfg)


def test_distributed_validation_equals_a_single_process_evaluation_of_the_checkpoint(two_worker_run):
    """Each rank scores its share of the validation images and the confusion matrices are summed: the run's final
    scores are those of the whole set, as one process scoring the saved checkpoint finds them."""
    cfg, summary = two_worker_run
    assert cfg.ray.num_workers == WORLD_SIZE and summary["step"] == cfg.train.iterations
    # One intra-op thread, as in the Train workers (Ray gives a worker of 0.5 CPU OMP_NUM_THREADS=1): another thread
    # count sums in another order, and a pixel whose top two logits nearly tie can then flip (a run of this test
    # once differed in the fourth decimal of mIoU that way).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = evaluate_checkpoint(summary["checkpoint"], mode=cfg.data.eval_mode)
    finally:
        torch.set_num_threads(threads)
    assert single["step"] == summary["step"]
    assert summary["miou"] == pytest.approx(single["miou"], abs=1e-6)
    expected = [None if math.isnan(v) else pytest.approx(v, abs=1e-6) for v in single["iou_per_class"]]
    assert summary["iou_per_class"] == expected


def record_unlabeled_rows(config):
    """A Train worker that reads its whole unlabelled shard and writes the (epoch, index) of every row it got."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard("unlabeled")
    rows = []
    for batch in shard.iter_batches(batch_size=16, batch_format="numpy"):
        for column in ("index", "partner_index"):  # each unlabelled row carries its CutMix partner's row
            rows.extend(zip(batch["epoch"].tolist(), batch[column].tolist(), strict=True))
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(rows))


def test_the_unlabelled_stream_gives_each_rank_its_own_rows(ray_session, two_worker_cfg, tmp_path):
    """The run's own datasets and DataConfig, read by a probe worker on each of the 2 ranks: no (epoch, row) is
    given to both, and together they cover every row of each epoch the stream plans."""
    import ray.cloudpickle
    import ray.train.torch
    from ray.train import FailureConfig, RunConfig

    production, _ = build_trainer(two_worker_cfg, "rows", RunDir(tmp_path / "run"))
    # The probe is defined here, not in the package: ship it by value (workers cannot import test modules).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    probe = ray.train.torch.TorchTrainer(
        record_unlabeled_rows,
        train_loop_config={"out": str(tmp_path)},
        scaling_config=production.scaling_config,
        run_config=RunConfig(
            name="rows",
            storage_path=str(tmp_path / "storage"),
            failure_config=FailureConfig(max_failures=0, controller_failure_limit=0),
        ),
        datasets=production.datasets,
        dataset_config=production.data_config,
    )
    probe.fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    seen = [{tuple(row) for row in rows} for rows in ranks]
    assert all(rows for rows in ranks) and len(ranks[0]) == len(ranks[1])  # equal shares keep DDP in step
    assert not seen[0] & seen[1]
    assert all(len(rows) == len(set(map(tuple, rows))) for rows in ranks)
    epochs = {epoch for epoch, _ in seen[0] | seen[1]}
    unlabeled_rows = {index for _, index in seen[0] | seen[1]}
    assert seen[0] | seen[1] == {(e, i) for e in epochs for i in unlabeled_rows}
