import io
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from csl_ray.config import ConfigError, load_config
from csl_ray.data.builtin import CLASS_NAMES, draw_scene
from csl_ray.data.corrupt_log import CorruptRowLog
from csl_ray.data.ray_datasets import (
    RunDataConfig,
    RunDatasets,
    build_datasets,
    labeled_batches,
    unlabeled_batches,
    val_batches,
)
from csl_ray.data.reader import MIN_BLOCK_ROWS, YIELD_BYTES, StreamReader, block_bytes, iter_local
from csl_ray.data.shards import Record, encode_mask, read_split, write_dataset
from csl_ray.data.streams import (
    MAX_BLOCKS,
    MIN_BLOCK_PIXELS,
    RowGroup,
    Stream,
    block_bounds,
    block_count,
    labeled_subset,
    output_rows,
    plan_streams,
)
from csl_ray.data.views import TORCH_DTYPES, CorruptRowError, decode_row, partner_views, row_generator, view_params

CROP = 16
SHAPES = {
    "labeled": {"image": (3, CROP, CROP), "mask": (CROP, CROP), "index": (), "epoch": ()},
    "unlabeled": {
        **{k: (3, CROP, CROP) for k in ("image_weak", "image_strong", "image_masked", "partner_weak")},
        "partner_strong": (3, CROP, CROP),
        **{k: (CROP, CROP) for k in ("tmp_cells", "cutmix_box", "valid", "mask", "partner_valid")},
        "index": (),
        "epoch": (),
        "partner_index": (),
    },
}


def record(split: str, i: int, size: int = 20) -> Record:
    image, mask = draw_scene(np.random.default_rng([9, len(split), i]), size)
    buffer = io.BytesIO()
    Image.fromarray(image[:, : size - 2]).save(buffer, format="JPEG")  # non-square, like real photos
    return Record(f"{split}-{i}", buffer.getvalue(), encode_mask(mask[:, : size - 2]), size, size - 2)


def make_root(path, counts=(6, 12, 3), corrupt: int | None = None):
    """A small dataset root: 4-row groups, so each split has several work items; optional corrupt unlabelled row."""
    splits = {}
    for split, count in zip(("labeled", "unlabeled", "val"), counts, strict=True):
        rows = [record(split, i) for i in range(count)]
        if split == "unlabeled" and corrupt is not None:
            rows[corrupt] = Record(rows[corrupt].id, b"\xff\xd8 garbage", rows[corrupt].mask, 20, 18)
        splits[split] = rows
    write_dataset(path, name="test", class_names=list(CLASS_NAMES), splits=splits, max_rows=8, row_group_rows=4)
    return str(path)


def config(root, *overrides):
    return load_config(
        preset="tiny",
        overrides=[f"data.root={root}", f"data.crop_size={CROP}", "data.global_batch_size=4", "ray.num_workers=2",
                   "train.iterations=3", "ssl.tmp.block=4", *overrides],
    )  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("data") / "root")


def by_key(batches, *columns):
    """(epoch, index) -> row dict of numpy arrays."""
    rows = {}
    for batch in batches:
        for i in range(len(batch["index"])):
            key = (int(batch["epoch"][i]), int(batch["index"][i]))
            assert key not in rows
            rows[key] = {c: np.asarray(batch[c][i]) for c in columns}
    return rows


def stream_rows(batches):
    """(epoch, index) of every stream row the unlabelled batches use, main crops and partners."""
    return [
        (int(e), int(i))
        for b in batches
        for key in ("index", "partner_index")
        for e, i in zip(b["epoch"], b[key], strict=True)
    ]


def test_local_batches_schema_dtypes_and_shapes(root):
    cfg = config(root)
    for split in ("labeled", "unlabeled"):
        batch = next(iter(iter_local(cfg, split)))
        assert set(batch) == set(TORCH_DTYPES[split])
        for key, shape in SHAPES[split].items():
            assert batch[key].shape == (4, *shape) and batch[key].dtype == TORCH_DTYPES[split][key], key
        assert ((batch["mask"] < 6) | (batch["mask"] == 255)).all()
    batch = next(iter(iter_local(cfg, "unlabeled")))
    # Partners come from the same row group (4 rows each here), never the row itself.
    index, partner = batch["index"], batch["partner_index"]
    assert (index // 4 == partner // 4).all() and (index != partner).all()
    unlabeled = next(iter(iter_local(cfg, "unlabeled", batch_size=16)))
    padded = ~unlabeled["valid"]
    assert padded.any()  # scale 0.5 of 20x18 < 16 somewhere
    assert (unlabeled["image_weak"].permute(1, 0, 2, 3)[:, padded] == 0).all() and (
        unlabeled["mask"][padded] == 255
    ).all()
    val = list(iter_local(cfg, "val"))
    assert len(val) == 3 and val[0]["image"].shape == (1, 3, 20, 18) and val[0]["mask"].dtype == torch.uint8


def test_epochs_differ_ids_repeat_and_views_reproduce(root):
    cfg = config(root, "train.iterations=8")  # 8 iterations x 4 pairs (8 stream rows) over 12 rows: several epochs
    rows = by_key(iter_local(cfg, "unlabeled"), "image_strong", "image_weak", "tmp_cells")
    epochs = sorted({e for e, _ in rows})
    assert len(epochs) >= 2
    used = stream_rows(iter_local(cfg, "unlabeled"))
    ids = [sorted(i for e, i in used if e == epoch) for epoch in epochs[:2]]
    assert ids[0] == ids[1] == list(range(12))  # every row once per epoch, as a main crop or as a partner
    twice = [i for i in range(12) if (0, i) in rows and (1, i) in rows]  # main crops in both epochs
    assert twice and any(not np.array_equal(rows[(0, i)]["image_strong"], rows[(1, i)]["image_strong"]) for i in twice)
    again = by_key(iter_local(cfg, "unlabeled"), "image_strong", "image_weak", "tmp_cells")
    assert all(np.array_equal(rows[k]["image_strong"], again[k]["image_strong"]) for k in rows)
    # A resumed stream starts at the epoch holding the iteration and draws the same views for it.
    resumed = by_key(iter_local(cfg, "unlabeled", start_iteration=4), "image_strong")
    assert min(e for e, _ in resumed) == 4 * 8 // 12  # 8 stream rows an iteration, 12 an epoch
    assert all(np.array_equal(resumed[k]["image_strong"], rows[k]["image_strong"]) for k in resumed if k in rows)


def test_partner_columns_are_the_partner_rows_own_views(root):
    cfg = config(root)
    table = read_split(root, "unlabeled")
    batch = next(iter(iter_local(cfg, "unlabeled")))
    for row in range(4):
        partner = int(batch["partner_index"][row])
        image, mask = decode_row(table["image"][partner].as_py(), table["mask"][partner].as_py(), 255)
        generator = row_generator(cfg.train.seed, "unlabeled", int(batch["epoch"][row]), table["id"][partner].as_py())
        expected = partner_views(image, mask, view_params(cfg), generator)
        assert all(torch.equal(batch[k][row], v) for k, v in expected.items())


def test_tmp_and_cutmix_switches(root):
    off = next(
        iter(iter_local(config(root, "ssl.tmp.enabled=false", "ssl.cutmix_prob=0.0"), "unlabeled", batch_size=12))
    )
    assert not off["tmp_cells"].any() and not off["cutmix_box"].any()
    on = next(iter(iter_local(config(root, "ssl.tmp.prob=1.0", "ssl.cutmix_prob=1.0"), "unlabeled", batch_size=12)))
    assert on["tmp_cells"].flatten(1).any(1).all() and on["cutmix_box"].flatten(1).any(1).all()


def test_labelled_subsets_are_reproducible_and_differ_by_fraction(root, tmp_path):
    half = labeled_subset(root, fraction=0.5, list_path=None, split_seed=0)
    assert len(half) == 3 and half == labeled_subset(root, fraction=0.5, list_path=None, split_seed=0)
    third = labeled_subset(root, fraction=1 / 3, list_path=None, split_seed=0)
    assert len(third) == 2 and third != half
    assert half != labeled_subset(root, fraction=0.5, list_path=None, split_seed=1) or len(half) == 6
    assert labeled_subset(root, fraction=1.0, list_path=None, split_seed=0) is None
    listed = tmp_path / "lab.txt"
    listed.write_text("JPEGImages/labeled-4.jpg SegmentationClass/labeled-4.png\nlabeled-1\n")
    assert labeled_subset(root, fraction=0.5, list_path=str(listed), split_seed=0) == {1, 4}
    listed.write_text("labeled-99\n")
    with pytest.raises(ConfigError, match="labeled-99"):
        labeled_subset(root, fraction=1.0, list_path=str(listed), split_seed=0)
    stream = plan_streams(config(root, "data.labeled_fraction=0.5"), root, labeled_batch=2)["labeled"]
    assert stream.rows_per_epoch == 3
    used = {int(i) for b in iter_local(config(root, "data.labeled_fraction=0.5"), "labeled") for i in b["index"]}
    assert used == half


def test_corrupt_rows_are_skipped_and_counted_or_fail_in_strict_mode(tmp_path):
    root = make_root(tmp_path / "bad", corrupt=5)
    cfg = config(root, "train.iterations=1")
    batches = iter_local(cfg, "unlabeled", batch_size=1)
    seen = {i for _, i in stream_rows(batches)}
    assert 5 not in seen and len(seen) == 11
    assert len(batches.skipped) >= 1 and "unlabeled/part-00000.parquet row 5" in batches.skipped[0]
    with pytest.raises(CorruptRowError, match=r"unlabeled/part-00000.parquet row 5 \(id 'unlabeled-5'\)"):
        list(iter_local(config(root, "data.strict=true"), "unlabeled"))


def fake_stream(groups: int, rows_per_group: int, epochs: int) -> Stream:
    """A stream of `groups` row groups (never read: block planning only counts them)."""
    rows = tuple(range(rows_per_group))
    row_groups = tuple(RowGroup("s", g, 0, 0, rows) for g in range(groups))
    return Stream("unused", "unlabeled", row_groups, 0, num_epochs=epochs)


@pytest.mark.parametrize("crop", [64, 321])
@pytest.mark.parametrize("cpus", [1, 2, 6])
def test_long_streams_get_large_blocks_in_whole_rounds_of_cpus(crop, cpus):
    for groups, epochs in [(8, 22), (40, 500), (300, 2000)]:
        stream = fake_stream(groups, 32, epochs)
        blocks = block_count(stream, crop, cpus)
        items_per_block = stream.num_items // blocks  # block_bounds cuts runs of equal rows
        assert 1 <= blocks <= min(MAX_BLOCKS, stream.num_items)
        assert blocks <= cpus or blocks % cpus == 0, (groups, epochs, blocks)
        if blocks > cpus and blocks < MAX_BLOCKS:
            assert items_per_block * 32 * crop**2 >= MIN_BLOCK_PIXELS
    # Larger crops cost more per row: the same stream is cut into more (smaller) blocks.
    stream = fake_stream(40, 32, 500)
    assert block_count(stream, 321, cpus) > block_count(stream, 64, cpus)


def test_blocks_hold_a_few_megabytes_but_never_fewer_than_min_block_rows():
    rows, size = block_bytes("unlabeled", 64)
    assert rows > MIN_BLOCK_ROWS and YIELD_BYTES - 64 * 64 * 20 < size <= YIELD_BYTES  # small crops: ~YIELD_BYTES
    rows, size = block_bytes("unlabeled", 321)
    assert rows == MIN_BLOCK_ROWS and size == MIN_BLOCK_ROWS * 321 * 321 * 20 > YIELD_BYTES  # large crops: the minimum
    assert block_bytes("val", 321)[0] == 1  # full-size validation images one at a time
    for crop in (64, 321):
        for batch_rows in (1, 3, 16, 40):
            rows, size = block_bytes("unlabeled", crop, batch_rows)
            unrounded = block_bytes("unlabeled", crop)[0]
            assert rows % batch_rows == 0 and unrounded <= rows < unrounded + batch_rows  # whole batches, no more
            assert size == rows * crop * crop * 20


def test_reader_blocks_hold_whole_batches_across_work_items(root):
    cfg = config(root, "data.crop_size=160")  # 8 rows per block before rounding to batches
    stream = plan_streams(cfg, root, labeled_batch=3)["unlabeled"]  # 4-row groups: 2 output rows per work item
    reader = StreamReader(stream, view_params(cfg), strict=True, batch_rows=3)
    blocks = list(reader({"id": np.arange(1)}))  # the whole stream as one run
    sizes = [len(b["index"]) for b in blocks]
    assert reader.block_rows == 9 and len(sizes) > 1
    assert all(size == 9 for size in sizes[:-1]) and 0 < sizes[-1] <= 9
    # The same rows in the same order as the work items give them one by one.
    one_by_one = [(int(r["epoch"]), int(r["index"])) for n in range(stream.num_items) for r in reader.rows(n)]
    assert [(int(e), int(i)) for b in blocks for e, i in zip(b["epoch"], b["index"], strict=True)] == one_by_one


@pytest.mark.parametrize("sizes", [(32,), (64, 32), (64, 64, 64, 5), (4, 4, 4), (3, 5)])
@pytest.mark.parametrize("epochs", [1, 3, 22])
@pytest.mark.parametrize("batch_rows", [1, 4, 16])
def test_blocks_are_runs_of_neighbouring_rows_in_equal_whole_batches(sizes, epochs, batch_rows):
    groups = tuple(RowGroup("s", g, 0, 0, tuple(range(size))) for g, size in enumerate(sizes))
    stream = Stream("unused", "unlabeled", groups, 0, num_epochs=epochs)
    item_rows = [output_rows("unlabeled", len(stream.item(n)[2])) for n in range(stream.num_items)]
    rows_before = np.concatenate([[0], np.cumsum(item_rows)])
    total = rows_before[-1]
    for num_blocks in {1, 2, 4, stream.num_items}:
        bounds = block_bounds(stream, num_blocks, batch_rows)
        assert len(bounds) == num_blocks + 1 and bounds[0] == (0, 0) and bounds[-1] == (stream.num_items, 0)
        for item, offset in bounds[1:-1]:
            # Each cut names a row inside its item, or the stream's end (a run of no rows: fewer batches than runs).
            assert (item, offset) == bounds[-1] or 0 <= offset < item_rows[item]
        positions = [rows_before[item] + offset for item, offset in bounds]
        assert positions == sorted(positions)  # every row once, in order
        for block, position in enumerate(positions[1:-1], start=1):
            # Cut at the whole batch nearest an equal share of the rows (or at the stream's end).
            assert position % batch_rows == 0 or position == total
            assert abs(position - total * block / num_blocks) <= batch_rows / 2, (bounds, item_rows)


@pytest.mark.parametrize("batch_rows", [1, 3])
def test_runs_cut_inside_items_give_the_rows_of_the_whole_stream(tmp_path, batch_rows):
    root = make_root(tmp_path / "odd", counts=(6, 11, 3))  # unlabelled groups of 4, 4 and 3 rows: an odd pair
    cfg = config(root)
    stream = plan_streams(cfg, root, labeled_batch=2)["unlabeled"]
    params = view_params(cfg)
    whole = list(StreamReader(stream, params, strict=True).run(0))
    for epoch in {int(r["epoch"]) for r in whole}:
        # The 3-row group (rows 8-10) gives two output rows; its odd row out pairs with the group's first row.
        odd_group = [r for r in whole if int(r["epoch"]) == epoch and int(r["index"]) >= 8]
        assert len(odd_group) == 2 and int(odd_group[1]["partner_index"]) == int(odd_group[0]["index"])
    cuts_inside_items = 0
    for num_blocks in (2, 3, 5, stream.num_items):
        bounds = block_bounds(stream, num_blocks, batch_rows)
        cuts_inside_items += sum(offset > 0 for _, offset in bounds)
        reader = StreamReader(stream, params, strict=True, runs=bounds)
        cut = [row for run in range(num_blocks) for row in reader.run(run)]
        assert len(cut) == len(whole)
        for a, b in zip(cut, whole, strict=True):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert cuts_inside_items > 0


def test_short_streams_still_give_every_cpu_blocks():
    assert block_count(fake_stream(8, 32, 2), 64, cpus=4) == 4  # one round: a block per CPU
    assert block_count(fake_stream(3, 1, 1), 64, cpus=4) == 3  # never more blocks than items
    assert block_count(fake_stream(1, 1, 1), 64, cpus=8) == 1


# ------------------------------------------------------------------------------------------------- with Ray


def test_ray_datasets_match_local_rows_and_schema(ray_session, root):
    cfg = config(root)
    datasets = build_datasets(cfg)
    assert set(datasets) == {"labeled", "unlabeled", "val"}
    ray_batches = list(unlabeled_batches(datasets["unlabeled"], cfg))
    # Boolean maps cross from the decode tasks as uint8 and reach the batch as bool again.
    assert all({k: v.dtype for k, v in b.items()} == TORCH_DTYPES["unlabeled"] for b in ray_batches)
    ray_rows = by_key(ray_batches, *SHAPES["unlabeled"])
    local_rows = by_key(iter_local(cfg, "unlabeled"), *SHAPES["unlabeled"])
    # Batch sizes differ (per-worker B vs global B), so drop_last drops different tails; the rows agree.
    assert len(ray_rows) == 36 // 2 and set(local_rows) <= set(ray_rows)  # 3 epochs of 12 stream rows, in pairs
    assert all(np.array_equal(ray_rows[k][c], local_rows[k][c]) for k in local_rows for c in SHAPES["unlabeled"])
    batch = next(labeled_batches(datasets["labeled"], cfg, rank=1))
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == {
        k: ((2, *SHAPES["labeled"][k]), TORCH_DTYPES["labeled"][k]) for k in SHAPES["labeled"]
    }
    assert [int(b["index"]) for b in val_batches(datasets["val"])] == [0, 1, 2]


def test_streaming_split_covers_every_unlabelled_row_once_per_epoch(ray_session, root):
    cfg = config(root, "train.iterations=6")  # 6 x 8 rows = 4 epochs of 12 (+1 spare)
    splits = build_datasets(cfg)["unlabeled"].streaming_split(2, equal=True)
    seen: list[list[tuple[int, int]]] = [[], []]

    def consume(rank):
        seen[rank].extend(stream_rows(splits[rank].iter_batches(batch_size=4)))

    threads = [threading.Thread(target=consume, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)  # generous: minutes on a loaded 2-core machine
    assert not any(t.is_alive() for t in threads), "a consumer did not finish"
    assert len(seen[0]) == len(seen[1]) > 0
    counts = Counter(seen[0] + seen[1])
    assert set(counts.values()) == {1}
    for epoch in {e for e, _ in counts}:
        assert sorted(i for e, i in counts if e == epoch) == list(range(12))


def test_ray_corrupt_rows_are_counted_once_each_or_fail_naming_shard_and_row(ray_session, tmp_path):
    root = make_root(tmp_path / "bad", corrupt=2)
    cfg = config(root, "train.iterations=1")
    corrupt = CorruptRowLog()
    used = stream_rows(build_datasets(cfg, corrupt=corrupt)["unlabeled"].iter_batches(batch_size=None))
    assert len(set(used)) == 2 * 11  # two epochs of the 11 good rows
    # Met in both epochs (and again on any task retry), counted once: the log keeps rows, not reports.
    assert len(corrupt.rows()) == 1 and "row 2 (id 'unlabeled-2')" in corrupt.rows()[0]
    corrupt({"unlabeled/part-00000.parquet row 2": "reported again, as a retried task would"})
    assert len(corrupt.rows()) == 1
    strict = build_datasets(config(root, "train.iterations=1", "data.strict=true"))["unlabeled"]
    with pytest.raises(Exception, match=r"unlabeled/part-00000.parquet row 2"):
        strict.take_all()


def test_a_run_plans_its_datasets_once_per_worker_group_start(ray_session, root):
    starts = []

    def resume_step():
        starts.append(len(starts))
        return 0

    run = RunDatasets(config(root), start_iteration=resume_step)
    callables = run.for_trainer()
    first = {split: make() for split, make in callables.items()}  # what Train does at each worker-group start
    assert set(first) == {"labeled", "unlabeled", "val"} and len(starts) == 1
    second = {split: make() for split, make in callables.items()}  # a restart re-plans, once
    assert len(starts) == 2 and all(second[s] is not first[s] for s in first)


def test_validation_is_split_across_ranks_before_decoding(ray_session, root):
    run = RunDatasets(config(root), start_iteration=lambda: 0)
    val = run.for_trainer()["val"]()
    shards = [shard["val"] for shard in RunDataConfig().configure({"val": val}, 2, None, None)]
    seen: list[list[int]] = [[], []]

    def consume(rank):
        seen[rank].extend(int(b["index"][0]) for b in val_batches(shards[rank]))

    threads = [threading.Thread(target=consume, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a consumer did not finish"
    # Each image reaches exactly one rank: no rank decodes an image to drop it.
    assert sorted(seen[0] + seen[1]) == [0, 1, 2]


def parent(pid: int) -> int:
    """The parent pid of a process (0 when it has ended)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def descends_from_this_process(pid: int) -> bool:
    """Whether `pid` was started by this test session (its Ray's workers descend from this process)."""
    while pid > 1:
        pid = parent(pid)
        if pid == os.getpid():
            return True
    return False


def decode_task_pids() -> list[int]:
    """Pids of this session's processes running a decode task now (Ray titles a worker `ray::<task name>` while it
    runs one); other Ray instances on the machine are left alone."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            running = b"MapBatches(StreamReader)" in cmdline.read_bytes()
        except OSError:  # the process ended meanwhile
            continue
        if running and descends_from_this_process(int(cmdline.parent.name)):
            pids.append(int(cmdline.parent.name))
    return pids


def test_a_killed_decode_task_is_retried_without_losing_or_repeating_a_row(ray_session, tmp_path):
    root = make_root(tmp_path / "kill", counts=(4, 64, 2))
    cfg = config(root, "train.iterations=8")  # 8 x 8 stream rows = 1 epoch of 64 (+1 spare)
    killed: list[int] = []
    used = []
    for batch in build_datasets(cfg)["unlabeled"].iter_batches(batch_size=2, prefetch_batches=0):
        used.extend(stream_rows([batch]))
        if not killed and (pids := decode_task_pids()):
            # Mid-epoch, while the task runs. At 16-px crops a task's rows reach the consumer as one block when it
            # ends, so this checks the retry of a whole task's rows, not of a partly delivered stream.
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
        time.sleep(0.02)  # a slow consumer keeps tasks alive, paused with full output buffers
    assert killed
    # Ray re-ran the task; its rows are a pure function of (seed, epoch, row), so nothing is lost or repeated.
    counts = Counter(used)
    assert set(counts.values()) == {1}
    assert sorted(counts) == [(epoch, i) for epoch in sorted({e for e, _ in counts}) for i in range(64)]
