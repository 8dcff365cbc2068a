"""The Ray Data pipeline: streams (`streams.py`) as lazy Ray Datasets, how a run hands them to Ray Train, the decode
tuning and the batches a Train worker iterates (skipped corrupt rows go to a `corrupt_log.CorruptRowLog`).

A stream runs as `ray.data.range(num_blocks)` (one row per block: a run of neighbouring output rows,
`streams.block_bounds`) -> `map_batches` (`reader.StreamReader`: read the row groups, decode, augment), so one pass
over the dataset is the whole run, augmentation is fresh every epoch (nothing is materialised), and every row's views
are a pure function of (seed, epoch, row id), the same after a task retry. A union of per-epoch `read_parquet`
datasets would say the same, but a labelled split of 92 images cycled for 80k iterations needs thousands of passes,
and a union of thousands of read operators is not something Ray Data plans or schedules well.

- `labeled`: every worker reads the whole (subset of the) labelled split, repeated for the run; workers see it in
  different orders through a rank-seeded local shuffle (`labeled_batches(..., rank=)`).
- `unlabeled`: split across workers in equal shares (`RunDataConfig`); each row carries all its views and its
  CutMix partner's (two rows of the stream per row of the batch).
- `val`: one pass, no random aug, full-size images, batch size 1, split across workers before decoding, each row
  to exactly one rank, so an all-reduced confusion matrix counts each image once.

In a Ray Train run (csl_ray/train.py):

    run_data = RunDatasets(cfg, start_iteration=lambda: resume_step(...))   # driver
    TorchTrainer(..., datasets=run_data.for_trainer(), dataset_config=RunDataConfig())
    labeled = labeled_batches(train.get_dataset_shard("labeled"), cfg, rank=rank)     # worker
    unlabeled = unlabeled_batches(train.get_dataset_shard("unlabeled"), cfg)
    loop.validate(val_batches(train.get_dataset_shard("val")))
    run_data.corrupt.rows()                                                  # driver, after fit
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import ray
import torch
from ray.train import DataConfig

from csl_ray.config import Config, per_worker_batch_size
from csl_ray.data.corrupt_log import CorruptRowLog
from csl_ray.data.reader import StreamReader, block_bytes
from csl_ray.data.shards import SPLITS
from csl_ray.data.streams import Stream, block_bounds, block_count, dataset_root, plan_streams
from csl_ray.data.views import TORCH_DTYPES, ViewParams, view_params

DECODE_CPUS = 1.0
"""Logical CPUs each decode task or actor reserves. Tasks must match the range read's default of 1 to be fused
with it; on a small machine give Ray more logical CPUs than cores rather than less per task."""


def ray_dataset(
    stream: Stream,
    params: ViewParams,
    *,
    strict: bool,
    decode_workers: int,
    report: CorruptRowLog | None = None,
    batch_rows: int = 1,
) -> ray.data.Dataset:
    """A stream as a lazy Ray Dataset: range(num_blocks) -> map_batches(StreamReader) on CPU.

    With tasks, Ray Data fuses the range read into the map (one task per block, 1 CPU each) and reuses its
    worker processes, so later epochs and evaluations start at once. An actor pool starts its actors with every
    execution (each evaluation, each rank's labelled stream), which costs seconds per execution on a small machine.

    Args:
        decode_workers: 0 = Ray tasks, as many as the CPUs allow; n > 0 = an actor pool of n.
        report: where the tasks report the rows they skip as corrupt.
        batch_rows: rows a consumer takes per batch: each block holds whole batches (`reader.block_bytes`).
    """
    # Each block is a run of consecutive rows: one task per block, streaming its rows out as it goes, so the tasks in
    # flight work on neighbouring items (the stream stays close to epoch order). batch_size=None hands the
    # whole block to the map, which keeps the range read fused into it.
    cpus = max(int(ray.cluster_resources().get("CPU", 1)), 1) if ray.is_initialized() else 1
    num_blocks = block_count(stream, params.crop_size, cpus)
    bounds = block_bounds(stream, num_blocks, batch_rows)
    runs = ray.data.range(num_blocks, override_num_blocks=num_blocks)  # one row per block: the run's number
    if decode_workers > 0:
        dataset = runs.map_batches(
            StreamReader,
            batch_size=None,
            fn_constructor_args=(stream, params, strict, report, batch_rows, bounds),
            compute=ray.data.ActorPoolStrategy(size=decode_workers),
            num_cpus=DECODE_CPUS,
        )
    else:
        reader = StreamReader(stream, params, strict, report, batch_rows, bounds)
        dataset = runs.map_batches(reader, batch_size=None, num_cpus=DECODE_CPUS)
    # Ray Data buffers a task's output until it exceeds this size before it becomes a block the consumer can see: at
    # the default 128 MB a task over small crops would deliver nothing until it finished. A block's index and epoch
    # columns put each yielded block just over the estimate, so every yield becomes one block.
    dataset.context.target_max_block_size = block_bytes(stream.split, params.crop_size, batch_rows)[1]
    return dataset


def build_datasets(
    cfg: Config, root: str | None = None, *, start_iteration: int = 0, corrupt: CorruptRowLog | None = None
) -> dict[str, ray.data.Dataset]:
    """The Ray Datasets of a run from `start_iteration` on (the streams start at the epoch holding it).

    Args:
        cfg: the resolved config.
        root: dataset root (default `dataset_root(cfg)`).
        start_iteration: resume point.
        corrupt: where the decode tasks report skipped corrupt rows (default: only the tasks' log lines).

    Returns:
        {"labeled", "unlabeled", "val"}: lazy Datasets; iterate them with `labeled_batches`, `unlabeled_batches`
        and `val_batches`.
    """
    root = root or dataset_root(cfg)
    streams = plan_streams(cfg, root, labeled_batch=per_worker_batch_size(cfg), start_iteration=start_iteration)
    params = view_params(cfg)
    return {
        split: ray_dataset(
            stream,
            params,
            strict=cfg.data.strict,
            decode_workers=cfg.data.decode_workers,
            report=corrupt,
            batch_rows=per_worker_batch_size(cfg),
        )
        for split, stream in streams.items()
    }


class RunDatasets:
    """A Train run's datasets, planned once per worker-group start from the iteration the workers resume at.

    `for_trainer()` gives Train one zero-argument callable per split; Train calls each once at every worker-group
    start, so the first call of a start plans all three streams (one read of the manifest, the labelled subset and
    the resume step) and the other two take what it planned. After a restart the streams continue from the
    checkpoint's epoch instead of replaying the run from its first batch.

    Args:
        cfg: the resolved config.
        start_iteration: returns the iteration the workers will resume at (0 for a new run).
    """

    def __init__(self, cfg: Config, start_iteration: Callable[[], int]) -> None:
        self.cfg = cfg
        self.start_iteration = start_iteration
        self.corrupt = CorruptRowLog()
        self._planned: dict[str, ray.data.Dataset] = {}

    def dataset(self, split: str) -> ray.data.Dataset:
        """`split`'s dataset of the current worker-group start (planning the start's three when it has none)."""
        if split not in self._planned:
            self._planned = build_datasets(self.cfg, start_iteration=self.start_iteration(), corrupt=self.corrupt)
            for dataset in self._planned.values():
                # The driver's status line is the progress report; per-rank, per-operator bars drown it.
                dataset.context.enable_progress_bars = False
                dataset.context.print_on_execution_start = False
        return self._planned.pop(split)

    def for_trainer(self) -> dict[str, Callable[[], ray.data.Dataset]]:
        """`TorchTrainer(datasets=...)` (one pickled RunDatasets behind the three callables)."""
        return {split: partial(self.dataset, split) for split in SPLITS}


class RunDataConfig(DataConfig):
    """How a run's streams reach the Train workers.

    The unlabelled stream is split in equal shares (`streaming_split(equal=True)`: equal rows per rank keeps DDP in
    step); the validation stream is split in unequal shares (`equal=False`: each row goes to exactly one rank, and
    only that rank's task decodes it); the labelled stream is read whole by every rank.
    """

    def __init__(self) -> None:
        super().__init__(datasets_to_split=["unlabeled", "val"])

    def configure(
        self,
        datasets: dict[str, ray.data.Dataset],
        world_size: int,
        worker_handles: Any,
        worker_node_ids: list[str] | None,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        if "val" not in datasets:
            return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
        rest = {name: dataset for name, dataset in datasets.items() if name != "val"}
        shards = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        val = datasets["val"].copy(datasets["val"])
        val.context.execution_options = self._resolve_execution_options("val")
        hints = worker_node_ids if self._enable_shard_locality else None
        for shard, split in zip(
            shards, val.streaming_split(world_size, equal=False, locality_hints=hints), strict=True
        ):
            shard["val"] = split
        return shards


def data_cpus(cfg: Config) -> float:
    """Logical CPUs the data pipelines of one run should find free: with decode tasks (`data.decode_workers=0`) one
    task's worth for each stream read at once (every rank's labelled stream and the shared unlabelled one); with
    actor pools, the pools of those streams and of the shared validation stream (which Ray Data starts anew)."""
    workers = max(cfg.ray.num_workers, 1)
    if cfg.data.decode_workers == 0:
        return (workers + 1) * DECODE_CPUS
    return (workers + 2) * cfg.data.decode_workers * DECODE_CPUS


def labeled_batches(source: Any, cfg: Config, *, rank: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Labelled batches of the per-worker batch size from a Dataset or DataIterator (`get_dataset_shard`).

    Every rank reads the whole labelled stream; a local shuffle seeded with the rank gives each its own order.
    """
    batch = per_worker_batch_size(cfg)
    return iter(
        source.iter_torch_batches(
            batch_size=batch,
            dtypes=TORCH_DTYPES["labeled"],
            drop_last=True,
            prefetch_batches=cfg.data.prefetch_batches,
            local_shuffle_buffer_size=4 * batch,
            local_shuffle_seed=cfg.train.seed * 1_000_003 + rank,
        )
    )


def unlabeled_batches(source: Any, cfg: Config) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of B unlabelled rows, each with its CutMix partner's columns, from this worker's split."""
    return iter(
        source.iter_torch_batches(
            batch_size=per_worker_batch_size(cfg),
            dtypes=TORCH_DTYPES["unlabeled"],
            drop_last=True,
            prefetch_batches=cfg.data.prefetch_batches,
        )
    )


def val_batches(source: Any) -> Iterator[dict[str, torch.Tensor]]:
    """Full-size validation batches of one image: the whole split from a Dataset, this rank's share from its
    `get_dataset_shard("val")` (see RunDataConfig)."""
    return iter(source.iter_torch_batches(batch_size=1, dtypes=TORCH_DTYPES["val"]))
