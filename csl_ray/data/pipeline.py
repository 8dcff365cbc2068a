"""Training and validation data: shards -> decoded, augmented batches, through Ray Data or in-process.

The unit of work is one Parquet row group of one epoch (a *work item*). A stream is the sequence of work items of
a whole run: epoch after epoch, row groups in a per-epoch random order, rows in a per-epoch random order within
each group. Ray Data runs `ray.data.range(num_items)` (runs of neighbouring items per block) -> `map_batches`
(read the row group, decode, augment), so one pass over the dataset is the whole run, augmentation is fresh every
epoch (nothing is materialised), and every row's views are a pure function of (seed, epoch, row id). A union of
per-epoch `read_parquet` datasets would say the same, but a labelled split of 92 images cycled for 80k iterations
needs thousands of passes, and a union of thousands of read operators is not something Ray Data plans or schedules
well.

- `labeled`: every worker reads the whole (subset of the) labelled split, repeated for the run; workers see it in
  different orders through a rank-seeded local shuffle (`labeled_batches(..., rank=)`).
- `unlabeled`: split across workers (`DataConfig(datasets_to_split=["unlabeled"])`); each row carries all views.
- `val`: one pass, no random aug, full-size images, batch size 1 (`val_batches(..., rank=, world_size=)` gives
  each rank a disjoint share so an all-reduced confusion matrix counts each image once).

In a Ray Train worker:

    datasets = build_datasets(cfg, start_iteration=step)            # driver: TorchTrainer(datasets=datasets, ...)
    labeled = labeled_batches(train.get_dataset_shard("labeled"), cfg, rank=rank)
    unlabeled = unlabeled_batches(train.get_dataset_shard("unlabeled"), cfg)
    for step in range(start, cfg.train.iterations):
        loop.train_step(next(labeled), next(unlabeled))
    loop.validate(val_batches(train.get_dataset_shard("val"), rank=rank, world_size=world_size))

Without Ray (tests, benchmarks, the plain loop): `iter_local(cfg, "unlabeled")` yields the same rows.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchvision.io import ImageReadMode, decode_image

from csl_ray.augment import mild_view, resize_crop_flip, strong_view
from csl_ray.config import Config, ConfigError, per_worker_batch_size
from csl_ray.data.builtin import ensure_builtin_dataset
from csl_ray.data.shards import filesystem, read_manifest, read_split, split_files
from csl_ray.masking import cutmix_box, tmp_cells

log = logging.getLogger(__name__)

TORCH_DTYPES: dict[str, dict[str, torch.dtype]] = {
    "labeled": {"image": torch.uint8, "mask": torch.int64, "index": torch.int64, "epoch": torch.int64},
    "unlabeled": {
        "image_weak": torch.uint8,
        "image_strong": torch.uint8,
        "image_masked": torch.uint8,
        "tmp_cells": torch.bool,
        "cutmix_box": torch.bool,
        "valid": torch.bool,
        "mask": torch.int64,
        "index": torch.int64,
        "epoch": torch.int64,
    },
    "val": {"image": torch.uint8, "mask": torch.int64, "index": torch.int64},
}
"""`iter_torch_batches(dtypes=TORCH_DTYPES[split])`: masks travel as uint8 (8x less than int64) and widen here."""

_STREAM_IDS = {"labeled": 1, "unlabeled": 2, "val": 3}
_COLUMNS = ["id", "image", "mask"]
_YIELD_BYTES = 4 << 20
"""Rows are yielded, and become Ray Data blocks, in chunks of about this many bytes: small, so the consumer sees
rows soon after a task starts (about 75 rows at crop 64, 3 at crop 321)."""
_CORRUPT_COUNTER = "csl_ray_corrupt_rows"


class CorruptRowError(RuntimeError):
    """A row whose bytes do not decode (strict mode); the message names the shard and the row."""


@dataclass(frozen=True)
class ViewParams:
    """Everything the per-row transforms need (built from the config by `view_params`)."""

    crop_size: int
    scale_range: tuple[float, float]
    ignore_index: int
    cutmix_prob: float
    tmp_enabled: bool
    tmp_prob: float
    tmp_block: int
    tmp_mask_ratio: float


def view_params(cfg: Config) -> ViewParams:
    """The ViewParams of a config."""
    return ViewParams(
        crop_size=cfg.data.crop_size,
        scale_range=tuple(cfg.data.scale_range),
        ignore_index=cfg.data.ignore_index,
        cutmix_prob=cfg.ssl.cutmix_prob,
        tmp_enabled=cfg.ssl.tmp.enabled,
        tmp_prob=cfg.ssl.tmp.prob,
        tmp_block=cfg.ssl.tmp.block,
        tmp_mask_ratio=cfg.ssl.tmp.mask_ratio,
    )


# ----------------------------------------------------------------------------------------------- per-row transforms


def row_generator(seed: int, split: str, epoch: int, row_id: str) -> torch.Generator:
    """A torch.Generator that is a pure function of (seed, split, epoch, row id), stable across processes."""
    digest = int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:8], "little")
    state = np.random.SeedSequence([seed, _STREAM_IDS[split], epoch, digest]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def decode_row(image: bytes, mask: bytes | None, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded bytes -> (image uint8 [3, H, W] RGB, mask uint8 [H, W]; all `ignore_index` when there is no mask).

    Raises:
        ValueError (or torchvision's RuntimeError) for bytes that do not decode or sizes that disagree.
    """
    with warnings.catch_warnings():  # decoding only reads the buffer; copying it to make it writable is waste
        warnings.simplefilter("ignore", UserWarning)
        pixels = decode_image(torch.frombuffer(image, dtype=torch.uint8), mode=ImageReadMode.RGB)
        if mask is None:
            return pixels, torch.full(pixels.shape[1:], ignore_index, dtype=torch.uint8)
        labels = decode_image(torch.frombuffer(mask, dtype=torch.uint8), mode=ImageReadMode.GRAY)[0]
    if labels.shape != pixels.shape[1:]:
        raise ValueError(f"mask size {tuple(labels.shape)} != image size {tuple(pixels.shape[1:])}")
    return pixels, labels


def labeled_views(
    image: torch.Tensor, mask: torch.Tensor, params: ViewParams, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """A labelled training row: the weak crop and its mask.

    Args:
        image: uint8 [3, H, W].
        mask: uint8 [H, W].

    Returns:
        `image` uint8 [3, S, S], `mask` uint8 [S, S] (ignore_index on padding).
    """
    image, mask, _ = resize_crop_flip(
        image,
        mask,
        crop_size=params.crop_size,
        scale_range=params.scale_range,
        ignore_index=params.ignore_index,
        generator=generator,
    )
    return {"image": image, "mask": mask}


def unlabeled_views(
    image: torch.Tensor, mask: torch.Tensor, params: ViewParams, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """An unlabelled training row with every view the step needs (docs/data.md, "Batch schema").

    The masked view takes the mild aug + TMP cells with probability tmp_prob (when TMP is enabled), otherwise an
    independent strong draw with no cells.

    Args:
        image: uint8 [3, H, W].
        mask: uint8 [H, W] ground truth for diagnostics (all ignore_index when unknown).

    Returns:
        `image_weak`, `image_strong`, `image_masked` uint8 [3, S, S]; `tmp_cells`, `cutmix_box`, `valid`
        bool [S, S]; `mask` uint8 [S, S].
    """
    size = params.crop_size
    weak, mask, valid = resize_crop_flip(
        image, mask, crop_size=size, scale_range=params.scale_range, ignore_index=params.ignore_index,
        generator=generator,
    )  # fmt: skip
    strong = strong_view(weak, generator)
    if params.tmp_enabled and torch.rand((), generator=generator).item() < params.tmp_prob:
        masked = mild_view(weak, generator)
        cells = tmp_cells(size, params.tmp_block, params.tmp_mask_ratio, generator)
    else:
        masked = strong_view(weak, generator)
        cells = torch.zeros(size, size, dtype=torch.bool)
    return {
        "image_weak": weak,
        "image_strong": strong,
        "image_masked": masked,
        "tmp_cells": cells,
        "cutmix_box": cutmix_box(size, params.cutmix_prob, generator),
        "valid": valid,
        "mask": mask,
    }


def transform_rows(
    table: pa.Table,
    rows: list[int],
    *,
    split: str,
    params: ViewParams,
    seed: int,
    epoch: int,
    first_index: int,
    where: str,
    first_row: int,
    strict: bool,
) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    """Decodes and augments rows of one row group (a pure function: numpy/torch in, arrays out).

    Args:
        table: the row group with columns id, image, mask.
        rows: row numbers within the group, in output order.
        split: labeled | unlabeled | val (which views to make).
        params: crop and augmentation parameters.
        seed, epoch: with the row id, the seed of the row's generator.
        first_index: split-wide index of the group's first row (the `index` column).
        where: the shard's name, first_row: the group's first row within it (for messages).
        strict: raise CorruptRowError instead of skipping a row that does not decode.

    Returns:
        (one dict of numpy arrays per kept row, each with `index` and, for training splits, `epoch`;
        "shard row N: error" for every skipped row).
    """
    ids = table.column("id").to_pylist()
    images = table.column("image")
    masks = table.column("mask")
    out, skipped = [], []
    for row in rows:
        try:
            mask = masks[row].as_py()
            if mask is None and split != "unlabeled":
                raise ValueError("no mask in a labelled split")
            image, labels = decode_row(images[row].as_py(), mask, params.ignore_index)
        except (RuntimeError, ValueError) as err:
            message = f"{where} row {first_row + row} (id {ids[row]!r}): corrupt: {err}"
            if strict:
                raise CorruptRowError(message) from err
            skipped.append(message)
            continue
        if split == "val":
            views = {"image": image, "mask": labels}
        else:
            generator = row_generator(seed, split, epoch, ids[row])
            make = labeled_views if split == "labeled" else unlabeled_views
            views = make(image, labels, params, generator)
            views["epoch"] = torch.tensor(epoch)
        views["index"] = torch.tensor(first_index + row)
        out.append({k: v.numpy() for k, v in views.items()})
    return out, skipped


def stack_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Row dicts -> one batch dict of stacked arrays."""
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


# ------------------------------------------------------------------------------------------------------ streams


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group: where it is, its first row's split-wide index, and the rows of it a stream uses."""

    shard: str
    group: int
    first_row: int
    first_index: int
    rows: tuple[int, ...]


@dataclass(frozen=True)
class Stream:
    """The work items of one split for a whole run: `num_epochs` epochs from `start_epoch`, one item per group."""

    root: str
    split: str
    groups: tuple[RowGroup, ...]
    seed: int
    start_epoch: int = 0
    num_epochs: int = 1
    shuffle: bool = True

    @property
    def rows_per_epoch(self) -> int:
        return sum(len(g.rows) for g in self.groups)

    @property
    def num_items(self) -> int:
        return len(self.groups) * self.num_epochs

    def item(self, number: int) -> tuple[int, RowGroup, list[int]]:
        """Work item `number` -> (epoch, row group, its rows in this epoch's order)."""
        epoch = self.start_epoch + number // len(self.groups)
        position = number % len(self.groups)
        if not self.shuffle:
            group = self.groups[position]
            return epoch, group, list(group.rows)
        stream = _STREAM_IDS[self.split]
        order = np.random.default_rng([self.seed, stream, epoch]).permutation(len(self.groups))
        group = self.groups[order[position]]
        rows = np.random.default_rng([self.seed, stream, epoch, int(order[position])]).permutation(group.rows)
        return epoch, group, rows.tolist()


def row_groups(root: str, split: str, subset: set[int] | None = None) -> tuple[RowGroup, ...]:
    """The row groups of a split in manifest order (only those with rows in `subset` of split-wide indices)."""
    groups = []
    index = 0
    for entry in split_files(read_manifest(root), split):
        first_row = 0
        for group, size in enumerate(entry["row_groups"]):
            rows = tuple(r for r in range(size) if subset is None or index + r in subset)
            if rows:
                groups.append(RowGroup(entry["path"], group, first_row, index, rows))
            first_row += size
            index += size
    return tuple(groups)


def labeled_subset(root: str, *, fraction: float, list_path: str | None, split_seed: int) -> set[int] | None:
    """Split-wide indices of the labelled rows to train on (None = all of them).

    A `list_path` (UniMatch-style lines; the first token's file stem is the id) wins over `fraction`; otherwise
    round(fraction * N) rows (at least 1) drawn with `split_seed`, so a split is reproducible and different
    fractions give different subsets.
    """
    if list_path is None and fraction >= 1.0:
        return None
    ids = read_split(root, "labeled", columns=["id"]).column("id").to_pylist()
    if list_path is not None:
        position = {row_id: i for i, row_id in enumerate(ids)}
        try:
            lines = Path(list_path).expanduser().read_text().splitlines()
        except OSError as err:
            raise ConfigError(f"data.labeled_list: {list_path}: {err}") from err
        wanted = [Path(line.split()[0]).stem for line in lines if line.strip()]
        missing = [w for w in wanted if w not in position]
        if missing or not wanted:
            raise ConfigError(
                f"data.labeled_list: {list_path}: "
                + (f"ids not in the labelled split of {root}: {missing[:5]}" if missing else "no ids")
            )
        return {position[w] for w in wanted}
    count = max(1, round(fraction * len(ids)))
    return set(np.random.default_rng(split_seed).choice(len(ids), count, replace=False).tolist())


class StreamReader:
    """Reads and transforms work items of a stream; also the Ray Data `map_batches` callable (tasks or actors)."""

    def __init__(self, stream: Stream, params: ViewParams, strict: bool, report_to_ray: bool = True) -> None:
        self.stream = stream
        self.params = params
        self.strict = strict
        self.report_to_ray = report_to_ray
        self.skipped: list[str] = []
        self._files: dict[str, pq.ParquetFile] = {}
        channels = 1 if stream.split == "labeled" else 4
        row_bytes = params.crop_size**2 * (3 * channels + 4)
        self._chunk = max(1, _YIELD_BYTES // row_bytes) if stream.split != "val" else 1

    def _group(self, group: RowGroup) -> pa.Table:
        if group.shard not in self._files:
            fs, path = filesystem(self.stream.root)
            self._files[group.shard] = pq.ParquetFile(f"{path}/{group.shard}", filesystem=fs)
        return self._files[group.shard].read_row_group(group.group, columns=_COLUMNS)

    def process(self, number: int) -> Iterator[dict[str, np.ndarray]]:
        """Yields the transformed rows of work item `number`, stacked in chunks (bounded memory for big crops)."""
        epoch, group, rows = self.stream.item(number)
        table = self._group(group)
        for start in range(0, len(rows), self._chunk):
            out, skipped = transform_rows(
                table,
                rows[start : start + self._chunk],
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
            if out:
                yield stack_rows(out)

    def _report(self, skipped: list[str]) -> None:
        for message in skipped:
            log.warning("skipped %s", message)
        self.skipped.extend(skipped)
        if self.report_to_ray:
            import ray

            ray.get(_counter().add.remote(skipped))

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for number in batch["id"]:
            yield from self.process(int(number))


class CorruptRowCounter:
    """Collects the names of skipped rows from every Ray Data worker of a job (a Ray actor: see `_counter`)."""

    def __init__(self) -> None:
        self.rows: list[str] = []

    def add(self, rows: list[str]) -> None:
        self.rows.extend(rows)

    def get(self) -> list[str]:
        return list(self.rows)


_counters: dict[str, Any] = {}


def _counter() -> Any:
    """This job's named counter actor, created on first use.

    The handle is kept in a module global because a non-detached actor dies with its last handle; `build_datasets`
    calls this first, so the owner is the driver (or Train's controller), which lives as long as the run.
    """
    import ray

    job = ray.get_runtime_context().get_job_id()
    if job not in _counters:
        remote = ray.remote(num_cpus=0)(CorruptRowCounter)
        _counters[job] = remote.options(name=_CORRUPT_COUNTER, get_if_exists=True).remote()
    return _counters[job]


def corrupt_rows() -> list[str]:
    """Rows skipped as corrupt by the Ray pipelines of this Ray job so far ("shard row N (id ...): error")."""
    import ray

    try:
        counter = ray.get_actor(_CORRUPT_COUNTER)
    except ValueError:
        return []
    return ray.get(counter.get.remote())


# ---------------------------------------------------------------------------------------------------- planning


def dataset_root(cfg: Config) -> str:
    """cfg.data.root, or the built-in dataset (drawn into cfg.data.builtin_cache on first use); checks the classes.

    Raises:
        ConfigError when the manifest's num_classes or ignore_index disagree with the config.
    """
    root = cfg.data.root or str(ensure_builtin_dataset(cfg.data.builtin_cache))
    manifest = read_manifest(root)
    if manifest["num_classes"] != cfg.data.num_classes:
        raise ConfigError(
            f"data.num_classes: {cfg.data.num_classes} but dataset {root} has {manifest['num_classes']} classes"
        )
    if manifest["ignore_index"] != cfg.data.ignore_index:
        raise ConfigError(
            f"data.ignore_index: {cfg.data.ignore_index} but dataset {root} uses {manifest['ignore_index']}"
        )
    return root


def plan_streams(cfg: Config, root: str, *, labeled_batch: int, start_iteration: int = 0) -> dict[str, Stream]:
    """The three streams of a run from `start_iteration` on.

    Args:
        cfg: the resolved config (iterations, global batch, seeds, labelled subset).
        root: dataset root.
        labeled_batch: labelled rows each consumer takes per iteration (per-worker batch under Ray Train, the
            global batch in a single process); each consumer reads the whole labelled stream.
        start_iteration: resume point; the streams start at the epoch holding that iteration's rows.

    Returns:
        {"labeled", "unlabeled", "val"}: Streams long enough for the remaining iterations (plus one spare epoch,
        so `drop_last` and equal splits never run short).
    """
    seed = cfg.train.seed
    remaining = max(cfg.train.iterations - start_iteration, 1)
    subset = labeled_subset(
        root, fraction=cfg.data.labeled_fraction, list_path=cfg.data.labeled_list, split_seed=cfg.data.split_seed
    )
    unlabeled = row_groups(root, "unlabeled")
    labeled = row_groups(root, "labeled", subset) + (unlabeled if cfg.data.oracle_labels else ())
    n_labeled = sum(len(g.rows) for g in labeled)
    n_unlabeled = sum(len(g.rows) for g in unlabeled)
    unlabeled_per_iteration = 2 * cfg.data.global_batch_size
    return {
        "labeled": Stream(
            root, "labeled", labeled, seed,
            start_epoch=start_iteration * labeled_batch // n_labeled,
            num_epochs=math.ceil(remaining * labeled_batch / n_labeled) + 1,
        ),
        "unlabeled": Stream(
            root, "unlabeled", unlabeled, seed,
            start_epoch=start_iteration * unlabeled_per_iteration // n_unlabeled,
            num_epochs=math.ceil(remaining * unlabeled_per_iteration / n_unlabeled) + 1,
        ),
        "val": Stream(root, "val", row_groups(root, "val"), seed, shuffle=False),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------------ Ray Data


MAX_BLOCKS = 1000
"""Blocks (tasks) per stream. Ray Data plans every block of a read up front: ~50k blocks took minutes before the
first batch here, ~1k take a second or two; a long run's items are grouped into this many runs of neighbours."""
MIN_BLOCK_ROWS = 256
"""Rows per block (task) at least: tasks over a few small crops spend much of their time on Ray's per-task cost
(with one 32-row group per task the built-in dataset ran at 0.65x a DataLoader, an actor pool at 1.0x)."""
MIN_BLOCKS_PER_CPU = 2
"""...unless that leaves fewer than this many blocks per cluster CPU (short streams: tests, benchmarks, evaluation)."""
DECODE_CPUS = 1.0
"""Logical CPUs each decode task or actor reserves. Tasks must match the range read's default of 1 to be fused
with it; on a small machine give Ray more logical CPUs than cores rather than less per task."""


def ray_dataset(stream: Stream, params: ViewParams, *, strict: bool, decode_workers: int):
    """A stream as a lazy Ray Dataset: range(num_items) -> map_batches(StreamReader) on CPU.

    With tasks, Ray Data fuses the range read into the map (one task per work item, 1 CPU each) and reuses its
    worker processes, so later epochs and evaluations start at once. An actor pool starts its actors with every
    execution (each evaluation, each rank's labelled stream), which costs seconds per execution on a small machine.

    Args:
        decode_workers: 0 = Ray tasks, as many as the CPUs allow; n > 0 = an actor pool of n.
    """
    import ray

    # Each block is a run of consecutive work items: one task per block, streaming its rows out as it goes, so the
    # tasks in flight work on neighbouring items (the stream stays close to epoch order). batch_size=None hands the
    # whole block to the map, which keeps the range read fused into it.
    rows_per_item = max(1, stream.rows_per_epoch // len(stream.groups))
    # A short stream still gets a few blocks per CPU, or its few large blocks would leave CPUs idle.
    cpus = max(int(ray.cluster_resources().get("CPU", 1)), 1) if ray.is_initialized() else 1
    min_rows = min(math.ceil(MIN_BLOCK_ROWS / rows_per_item), math.ceil(stream.num_items / (MIN_BLOCKS_PER_CPU * cpus)))
    per_block = max(math.ceil(stream.num_items / MAX_BLOCKS), min_rows)
    items = ray.data.range(stream.num_items, override_num_blocks=math.ceil(stream.num_items / per_block))
    if decode_workers > 0:
        dataset = items.map_batches(
            StreamReader,
            batch_size=None,
            fn_constructor_args=(stream, params, strict),
            compute=ray.data.ActorPoolStrategy(size=decode_workers),
            num_cpus=DECODE_CPUS,
        )
    else:
        dataset = items.map_batches(StreamReader(stream, params, strict), batch_size=None, num_cpus=DECODE_CPUS)
    # Ray Data buffers a task's output up to this size before it becomes a block the consumer can see: at the
    # default 128 MB a task over small crops would deliver nothing until it finished.
    dataset.context.target_max_block_size = _YIELD_BYTES
    return dataset


def build_datasets(cfg: Config, root: str | None = None, *, start_iteration: int = 0) -> dict[str, Any]:
    """The Ray Datasets of a run, for `TorchTrainer(datasets=...)` with `DataConfig(datasets_to_split=["unlabeled"])`.

    Args:
        cfg: the resolved config.
        root: dataset root (default `dataset_root(cfg)`).
        start_iteration: resume point (the streams start at the epoch holding it).

    Returns:
        {"labeled", "unlabeled", "val"}: lazy Datasets; iterate them with `labeled_batches`, `unlabeled_batches`
        and `val_batches`.
    """
    root = root or dataset_root(cfg)
    streams = plan_streams(cfg, root, labeled_batch=per_worker_batch_size(cfg), start_iteration=start_iteration)
    params = view_params(cfg)
    _counter()  # created here, so the driver owns it and it outlives the decode tasks
    return {
        split: ray_dataset(stream, params, strict=cfg.data.strict, decode_workers=cfg.data.decode_workers)
        for split, stream in streams.items()
    }


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
    """Batches of 2B unlabelled rows (B main crops, then B CutMix partners) from this worker's split."""
    return iter(
        source.iter_torch_batches(
            batch_size=2 * per_worker_batch_size(cfg),
            dtypes=TORCH_DTYPES["unlabeled"],
            drop_last=True,
            prefetch_batches=cfg.data.prefetch_batches,
        )
    )


def val_batches(source: Any, *, rank: int = 0, world_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Full-size validation batches of one image; rank r keeps the rows with index % world_size == r."""
    for batch in source.iter_torch_batches(batch_size=1, dtypes=TORCH_DTYPES["val"]):
        if int(batch["index"][0]) % world_size == rank:
            yield batch


# ------------------------------------------------------------------------------------------------- without Ray


class LocalBatches:
    """The rows of a stream, read and augmented in this process, batched as tensors; re-iterable (replays).

    `skipped` lists the rows skipped as corrupt so far.
    """

    def __init__(self, stream: Stream, params: ViewParams, *, strict: bool, batch_size: int, drop_last: bool):
        self.reader = StreamReader(stream, params, strict, report_to_ray=False)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.dtypes = TORCH_DTYPES[stream.split]

    @property
    def skipped(self) -> list[str]:
        return self.reader.skipped

    def _tensors(self, rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v).to(self.dtypes[k]) for k, v in stack_rows(rows).items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        pending: list[dict[str, np.ndarray]] = []
        for number in range(self.reader.stream.num_items):
            for chunk in self.reader.process(number):
                pending.extend({k: v[i] for k, v in chunk.items()} for i in range(len(chunk["index"])))
                while len(pending) >= self.batch_size:
                    yield self._tensors(pending[: self.batch_size])
                    pending = pending[self.batch_size :]
        if pending and not self.drop_last:
            yield self._tensors(pending)


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
        batch_size: default: the global batch (labelled), twice it (unlabelled: main crops + CutMix partners), 1 (val).

    Returns:
        A re-iterable of batch dicts (TORCH_DTYPES[split]); one pass over a training split covers the whole run.
    """
    root = root or dataset_root(cfg)
    labeled_batch = cfg.data.global_batch_size
    stream = plan_streams(cfg, root, labeled_batch=labeled_batch, start_iteration=start_iteration)[split]
    default = {"labeled": labeled_batch, "unlabeled": 2 * labeled_batch, "val": 1}[split]
    return LocalBatches(
        stream, view_params(cfg), strict=cfg.data.strict, batch_size=batch_size or default, drop_last=split != "val"
    )
