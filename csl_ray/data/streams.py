"""Stream planning: which rows of which row groups each split reads, in which order, for a whole run.

The unit of work is one Parquet row group of one epoch (a *work item*). A stream is the sequence of work items of
a whole run: epoch after epoch, row groups in a per-epoch random order, rows in a per-epoch random order within
each group. A resumed run re-plans its streams from the checkpoint's iteration (`plan_streams(start_iteration=)`).
Reads manifests and the labelled split's ids; decodes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csl_ray.config import Config, ConfigError
from csl_ray.data.builtin import ensure_builtin_dataset
from csl_ray.data.shards import read_manifest, read_split, split_files
from csl_ray.data.views import STREAM_IDS


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

    def group_order(self, epoch: int) -> np.ndarray:
        """Indices into `groups` in the order epoch `epoch` reads them."""
        if not self.shuffle:
            return np.arange(len(self.groups))
        return np.random.default_rng([self.seed, STREAM_IDS[self.split], epoch]).permutation(len(self.groups))

    def item(self, number: int) -> tuple[int, RowGroup, list[int]]:
        """Work item `number` -> (epoch, row group, its rows in this epoch's order)."""
        epoch = self.start_epoch + number // len(self.groups)
        index = int(self.group_order(epoch)[number % len(self.groups)])
        group = self.groups[index]
        if not self.shuffle:
            return epoch, group, list(group.rows)
        rows = np.random.default_rng([self.seed, STREAM_IDS[self.split], epoch, index]).permutation(group.rows)
        return epoch, group, rows.tolist()


MAX_BLOCKS = 1000
"""Blocks (tasks) per stream at most. Ray Data plans every block of a read up front: ~50k blocks took minutes before
the first batch here, ~1k take a second or two; a long run's items are grouped into this many runs of neighbours."""
MIN_BLOCK_PIXELS = 8192 * 64 * 64
"""Output crop pixels per block (task) at least: 8192 rows at crop 64, 326 at crop 321 (the work per row grows with
the crop). Ray Data starts a stream's next task only after one ends and its scheduling loop notices (it waits up to
0.1 s for its tasks, `WAIT_FOR_TASK_COMPLETION_TIMEOUT_S`, then leases a worker), so tasks of a fraction of a second
leave the CPUs idle between them (`benchmarks/README.md`, "Data pipeline")."""


def block_count(stream: Stream, crop_size: int, cpus: int) -> int:
    """How many blocks (Ray Data tasks, runs of neighbouring rows) to cut a stream into.

    Each block holds at least MIN_BLOCK_PIXELS of crops, a short stream (tests, benchmarks, evaluation, a small run)
    still gets a block per CPU, and a stream of more blocks than CPUs gets a whole number of rounds (a multiple of
    `cpus`): blocks of equal size then finish together, where one block left over would run alone on one CPU at the
    end of the stream. A short stream gets one round, not two: a second round adds a task boundary per CPU, and two
    runs of different images take different times, so the CPU that drew the quicker pair idles at the stream's end
    (`benchmarks/README.md`, "Data pipeline").

    Args:
        stream: the stream (its items and rows per item).
        crop_size: side of the output crops.
        cpus: CPUs of the cluster that runs the stream.

    Returns:
        Between 1 and min(num_items, MAX_BLOCKS).
    """
    rows_per_item = max(1, stream.rows_per_epoch // len(stream.groups))
    min_items = math.ceil(MIN_BLOCK_PIXELS / (rows_per_item * crop_size**2))
    blocks = max(stream.num_items // min_items, min(stream.num_items, cpus))
    blocks = min(blocks, MAX_BLOCKS, stream.num_items)
    if blocks > cpus:
        blocks -= blocks % cpus
    return max(blocks, 1)


Cut = tuple[int, int]
"""A place in a stream: (work item number, output row within the item)."""


def stream_rows_per_output(split: str) -> int:
    """Stream rows behind one output row: unlabelled rows go in pairs (a main crop and its CutMix partner)."""
    return 2 if split == "unlabeled" else 1


def output_rows(split: str, stream_rows: int) -> int:
    """Rows a work item of `stream_rows` rows gives its consumer (an odd unlabelled row out pairs with the item's first
    row, `reader.StreamReader.rows`)."""
    return math.ceil(stream_rows / stream_rows_per_output(split))


def block_bounds(stream: Stream, num_blocks: int, batch_rows: int = 1) -> tuple[Cut, ...]:
    """Where to cut a stream into `num_blocks` runs of neighbouring output rows, as many in each as whole batches allow.

    Cut by output rows, within items where need be, at the whole batch of `batch_rows` nearest an equal share: runs
    cut at item bounds differed by up to an item's rows, and the CPU that drew the shorter runs idled at the stream's
    end. Whole batches keep the consumer's batches whole (`reader.block_bytes`). `ray.data.range(num_items,
    override_num_blocks=k)` would cut k runs of num_items // k items and one more of the remainder.

    Returns:
        num_blocks + 1 cuts from (0, 0) to (num_items, 0): run b holds the output rows from bounds[b] up to, not
        including, bounds[b + 1].
    """
    sizes = np.array([output_rows(stream.split, len(g.rows)) for g in stream.groups])
    epochs = range(stream.start_epoch, stream.start_epoch + stream.num_epochs)
    read = np.concatenate([sizes[stream.group_order(epoch)] for epoch in epochs])
    rows_before = np.concatenate([[0], np.cumsum(read)])  # rows_before[k]: output rows of the first k items
    targets = rows_before[-1] * np.arange(1, num_blocks) / num_blocks
    cuts = np.minimum(np.round(targets / batch_rows) * batch_rows, rows_before[-1]).astype(np.int64)
    items = np.searchsorted(rows_before, cuts, side="right") - 1  # a cut at an item's first row belongs to that item
    inner = ((int(item), int(cut - rows_before[item])) for item, cut in zip(items, cuts, strict=True))
    return ((0, 0), *inner, (stream.num_items, 0))


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
    unlabeled_per_iteration = 2 * cfg.data.global_batch_size  # each batch row: a main crop and its CutMix partner
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
