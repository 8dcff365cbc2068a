"""Reading a stream in this process: `StreamReader` turns work items into stacked rows (Ray Data's decode tasks run
it too), and `iter_local` batches a split without Ray (tests, benchmarks, evaluation, the plain loop).

    for batch in iter_local(cfg, "unlabeled"):      # row for row what the Ray pipeline yields, in a fixed order
        ...
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from csl_ray.config import Config
from csl_ray.data.shards import filesystem
from csl_ray.data.streams import Cut, RowGroup, Stream, dataset_root, plan_streams, stream_rows_per_output
from csl_ray.data.views import TORCH_DTYPES, ViewParams, stack_rows, transform_rows, view_params

log = logging.getLogger(__name__)
T = TypeVar("T")

_COLUMNS = ["id", "image", "mask"]
YIELD_BYTES = 4 << 20
"""Rows are yielded, and become Ray Data blocks, in chunks of about this many bytes (but at least MIN_BLOCK_ROWS rows):
small, so the consumer sees rows soon after a task starts (about 50 unlabelled rows at crop 64)."""
MIN_BLOCK_ROWS = 8
"""Output rows per block at least: Ray Data pays a cost per block (its scheduling loop, object references, the
consumer's re-batching), and at 4 MB a 321-px unlabelled block held two rows, which held the 321-px JPEG benchmark
well below the DataLoader. 8 rows there make 16 MB blocks."""


def block_bytes(split: str, crop_size: int, batch_rows: int = 1) -> tuple[int, int]:
    """(output rows per block, bytes per block) of a split's stream: YIELD_BYTES of rows, at least MIN_BLOCK_ROWS,
    rounded up to whole batches of `batch_rows`.

    Whole batches per block let the consumer take each batch from one block as it is: a batch that straddles two
    blocks is copied into one by Ray Data's re-batching, in the consuming process (`benchmarks/data.py --ablate`
    measures what that costs it). An output row's bytes: uint8 images, masks and maps; an unlabelled row is a main
    crop (3 views, 4 maps) with its partner's 2 views and 1 map. Validation rows (full-size images) go one at a time.
    """
    if split == "val":
        return 1, YIELD_BYTES
    row_bytes = crop_size**2 * (4 if split == "labeled" else 5 * 3 + 5)
    rows = max(MIN_BLOCK_ROWS, YIELD_BYTES // row_bytes)
    rows = math.ceil(rows / batch_rows) * batch_rows
    return rows, rows * row_bytes


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """`items` in lists of `size` (the last one shorter when they do not divide evenly)."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


SkipReport = Callable[[dict[str, str]], None]
"""Called with the rows a reader skipped as corrupt: {"shard row N": "shard row N (id ...): corrupt: error"}."""


class StreamReader:
    """Reads and transforms work items of a stream; also the Ray Data `map_batches` callable (tasks or actors).

    Args:
        stream: the work items.
        params: crop and augmentation parameters.
        strict: raise on a corrupt row (else skip it, log it and report it).
        report: where skipped rows go besides the log.
        batch_rows: rows the consumer takes per batch; the blocks handed to Ray Data hold whole batches.
        runs: where the stream is cut into runs (`streams.block_bounds`), one per Ray Data block of the `range` it
            maps (default: one run of the whole stream).
    """

    def __init__(
        self,
        stream: Stream,
        params: ViewParams,
        strict: bool,
        report: SkipReport | None = None,
        batch_rows: int = 1,
        runs: tuple[Cut, ...] | None = None,
    ) -> None:
        self.stream = stream
        self.runs = runs or ((0, 0), (stream.num_items, 0))
        self.params = params
        self.strict = strict
        self.report = report
        self.skipped: dict[str, str] = {}
        self._files: dict[str, pq.ParquetFile] = {}
        self.block_rows, _ = block_bytes(stream.split, params.crop_size, batch_rows)
        self._per_output = stream_rows_per_output(stream.split)
        self._chunk = self._per_output * self.block_rows  # stream rows transformed at once: a block's worth

    def _group(self, group: RowGroup) -> pa.Table:
        if group.shard not in self._files:
            fs, path = filesystem(self.stream.root)
            self._files[group.shard] = pq.ParquetFile(f"{path}/{group.shard}", filesystem=fs)
        return self._files[group.shard].read_row_group(group.group, columns=_COLUMNS)

    def rows(self, number: int, start: int = 0, stop: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """The transformed output rows `start` to `stop` (exclusive; default: to the end) of work item `number`, one
        dict each (decoded a block's worth at a time, so memory stays bounded for big crops).

        An unlabelled output row is a pair of stream rows (`views.pairs`); an item of an odd number of rows pairs its
        last row with its first, so a run that starts or ends inside an item gives the same rows as a whole item.
        """
        epoch, group, rows = self.stream.item(number)
        per_output = self._per_output
        picked = rows[per_output * start : None if stop is None else per_output * stop]
        if len(picked) % per_output:
            picked.append(rows[0])
        table = self._group(group)
        for first in range(0, len(picked), self._chunk):
            out, skipped = transform_rows(
                table,
                picked[first : first + self._chunk],
                split=self.stream.split,
                params=self.params,
                seed=self.stream.seed,
                epoch=epoch,
                first_index=group.first_index,
                where=group.shard,
                first_row=group.first_row,
                strict=self.strict,
            )
            if skipped:
                self._report(skipped)
            yield from out

    def _report(self, skipped: dict[str, str]) -> None:
        for message in skipped.values():
            log.warning("skipped %s", message)
        self.skipped.update(skipped)
        if self.report is not None:
            self.report(skipped)

    def run(self, number: int) -> Iterator[dict[str, np.ndarray]]:
        """The output rows of run `number`: from cut `runs[number]` up to cut `runs[number + 1]`."""
        (first, start), (last, stop) = self.runs[number], self.runs[number + 1]
        for item in range(first, last + 1):
            end = stop if item == last else None
            if end != 0:
                yield from self.rows(item, start if item == first else 0, end)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """The rows of the runs numbered in `batch["id"]`, stacked `block_rows` at a time across the items' bounds."""
        rows = (row for number in batch["id"] for row in self.run(int(number)))
        for block in chunked(rows, self.block_rows):
            yield stack_rows(block)


class LocalBatches:
    """The rows of a stream, read and augmented in this process, batched as tensors; re-iterable (replays).

    `skipped` lists the rows skipped as corrupt so far, each once however many epochs met it.
    """

    def __init__(self, stream: Stream, params: ViewParams, *, strict: bool, batch_size: int, drop_last: bool):
        self.reader = StreamReader(stream, params, strict, batch_rows=batch_size)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.dtypes = TORCH_DTYPES[stream.split]

    @property
    def skipped(self) -> list[str]:
        return list(self.reader.skipped.values())

    def _tensors(self, rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v).to(self.dtypes[k]) for k, v in stack_rows(rows).items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in chunked(self.reader.run(0), self.batch_size):
            if len(batch) == self.batch_size or not self.drop_last:
                yield self._tensors(batch)


def iter_local(
    cfg: Config,
    split: str,
    root: str | None = None,
    *,
    start_iteration: int = 0,
    batch_size: int | None = None,
) -> LocalBatches:
    """The batches of one split without Ray, row for row what the Ray pipeline yields (in a fixed order).

    Args:
        cfg: the resolved config.
        split: labeled | unlabeled | val.
        root: dataset root (default `dataset_root(cfg)`).
        start_iteration: resume point.
        batch_size: default: the global batch (labelled and unlabelled; an unlabelled row carries its partner), 1 (val).

    Returns:
        A re-iterable of batch dicts (TORCH_DTYPES[split]); one pass over a training split covers the whole run.
    """
    root = root or dataset_root(cfg)
    labeled_batch = cfg.data.global_batch_size
    stream = plan_streams(cfg, root, labeled_batch=labeled_batch, start_iteration=start_iteration)[split]
    default = {"labeled": labeled_batch, "unlabeled": labeled_batch, "val": 1}[split]
    return LocalBatches(
        stream, view_params(cfg), strict=cfg.data.strict, batch_size=batch_size or default, drop_last=split != "val"
    )
