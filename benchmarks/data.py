"""Data pipeline throughput: Ray Data vs a torch DataLoader doing the same per-row work on the same CPUs.

The work per unlabelled batch row is the training pipeline's: decode two rows (JPEG + PNG mask each); for the main
crop resize/crop/flip, strong view, TMP view (mild + cells, or a second strong draw), CutMix box; for its CutMix
partner resize/crop/flip and strong view. Two datasets: the built-in one (96-px scenes, crop 64 as in the `tiny`
preset) and generated VOC-sized JPEGs (500x375, crop 321 as in the `pascal` preset). Ray Data runs
`csl_ray.data.ray_datasets.ray_dataset` with decode tasks (the default, `data.decode_workers=0`) twice: as training jobs
run it (`csl_ray/data/executor_tuning.py`: Ray Data's executor reads its resource limits every 0.1 s and fetches block
metadata on its scheduling loop) and with Ray's own settings (limits read every second, during whose first second an
execution runs one task at a time; metadata fetched on a thread, which leaves a CPU idle between tasks). The
DataLoader runs a map-style dataset over the same encoded rows held in memory with `num_workers = --cpus`. Rows/s is
over a whole pass (Ray's worker processes are warmed up first, as a training run pays their start once); the time to
the first batch is reported separately, and so is where the CPUs went during a pass (Linux, from /proc): the
pipeline's workers (Ray's task worker processes, or the DataLoader's), the consuming process (this one, which also
runs Ray Data's executor), Ray's own services (raylet, GCS, agents and Ray Data's own actors; up during every
pipeline's passes) and what nobody used. The pipelines run side by side in `--repeats` rounds (each round times each
pipeline once, back to back, in an order rotating by round); the table gives medians, and the ratio is the median
over rounds of a pipeline's rate over the DataLoader's in the same round, so a shared machine's drifting load moves
both sides of each ratio alike; the rounds' spread says how far it did not.

    python benchmarks/data.py                 # 2 CPUs, prints a markdown table
    python benchmarks/data.py --cpus 8 --epochs 4
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from csl_ray.config import load_config
from csl_ray.data.builtin import draw_scene, ensure_builtin_dataset
from csl_ray.data.executor_tuning import (
    LIMITS_REFRESH_S,
    fetch_metadata_on_thread,
    limits_refresh,
    metadata_on_thread,
    shorten_limits_refresh,
)
from csl_ray.data.ray_datasets import ray_dataset
from csl_ray.data.shards import ROW_GROUP_ROWS, Record, encode_mask, read_split, write_dataset
from csl_ray.data.streams import Stream, row_groups
from csl_ray.data.views import TORCH_DTYPES, decode_row, partner_views, row_generator, unlabeled_views, view_params

BATCH = 16
CORE_SHARES = ("workers", "consumer", "Ray services", "unused")
RAY_SERVICE_ACTORS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::_")
"""`ray::` processes that are Ray's services, not task workers: its agents and its internal actors (Ray Data's
`_StatsActor` and `_AutoscalingCoordinatorActor`, whose names start with an underscore)."""


def cpu_seconds() -> dict[str, float] | None:
    """CPU seconds spent so far by the pipelines' workers, this process and Ray's services (None without /proc).

    Workers: Ray's task worker processes (`ray::IDLE`, or named after the task they run) and this process's finished
    children (the DataLoader's workers, which exit and are reaped at the end of each pass). Services: the other
    processes of the Ray installation, including its agents and Ray Data's own actors (`RAY_SERVICE_ACTORS`).
    """
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    tick = os.sysconf("SC_CLK_TCK")
    spent = dict.fromkeys(("workers", "consumer", "Ray services"), 0.0)
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended between the listing and the read
            continue
        own, children = (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick
        if int(entry.name) == os.getpid():
            spent["consumer"] += own
            spent["workers"] += children
        elif command.startswith("ray::") and not command.startswith(RAY_SERVICE_ACTORS):
            spent["workers"] += own
        elif "/ray/" in command:
            spent["Ray services"] += own
    return spent


def cores_used(before: dict[str, float] | None, after: dict[str, float] | None, seconds: float, cpus: int) -> dict:
    """Cores each of CORE_SHARES used on average between two `cpu_seconds` readings ({} without them)."""
    if before is None or after is None:
        return {}
    cores = {share: (after[share] - before[share]) / seconds for share in after}
    return {**cores, "unused": cpus - sum(cores.values())}


def make_jpeg_dataset(out: Path, count: int, row_group_rows: int = ROW_GROUP_ROWS) -> Path:
    """`count` VOC-sized (500x375) JPEG scenes with masks, as the unlabelled split of a dataset root (row groups as
    `jobs/prepare_data.py` writes them unless told otherwise)."""
    records = []
    for i in range(count):
        image, mask = draw_scene(np.random.default_rng([7, i]), 500)
        buffer = io.BytesIO()
        Image.fromarray(image[:375]).save(buffer, format="JPEG", quality=90)
        records.append(Record(f"img-{i:05d}", buffer.getvalue(), encode_mask(mask[:375]), 375, 500))
    write_dataset(
        out,
        name="jpeg-bench",
        class_names=[str(c) for c in range(6)],
        splits={"unlabeled": records},
        row_group_rows=row_group_rows,
    )
    return out


class RowDataset(torch.utils.data.Dataset):
    """The same per-row work as the Ray pipeline, one batch row (a main crop and its partner) per __getitem__."""

    def __init__(self, root: str, params, epochs: int, seed: int = 0) -> None:
        table = read_split(root, "unlabeled")
        self.ids = table.column("id").to_pylist()
        self.images = table.column("image").to_pylist()
        self.masks = table.column("mask").to_pylist()
        self.params = params
        self.epochs = epochs
        self.seed = seed

    def __len__(self) -> int:
        return len(self.ids) // 2 * self.epochs

    def _views(self, row: int, epoch: int, make) -> dict[str, torch.Tensor]:
        image, mask = decode_row(self.images[row], self.masks[row], self.params.ignore_index)
        return make(image, mask, self.params, row_generator(self.seed, "unlabeled", epoch, self.ids[row]))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        epoch, pair = divmod(i, len(self.ids) // 2)
        row, partner = 2 * pair, 2 * pair + 1
        views = {**self._views(row, epoch, unlabeled_views), **self._views(partner, epoch, partner_views)}
        ids = {"index": torch.tensor(row), "partner_index": torch.tensor(partner), "epoch": torch.tensor(epoch)}
        return {**views, **ids}


def timed(batches: Iterable[dict], cpus: int) -> tuple[int, float, float, dict[str, float]]:
    """Consumes batches: (rows, seconds to the first batch, rows/s over the whole pass, `cores_used` over the pass)."""
    spent = cpu_seconds()
    start = time.perf_counter()
    rows, first = 0, None
    for batch in batches:
        rows += len(batch["index"])
        first = first if first is not None else time.perf_counter() - start
    seconds = time.perf_counter() - start
    return rows, first, rows / seconds, cores_used(spent, cpu_seconds(), seconds, cpus)


def run(name: str, root: str, crop: int, args: argparse.Namespace, ray_own: tuple[float, bool] | None) -> list[dict]:
    """The pipelines side by side, `args.repeats` rounds, each round timing every pipeline once, back to back (in an
    order rotating by round). Ray Data runs as training jobs run it and, given `ray_own` (Ray's own refresh of its
    resource limits and metadata fetch), as Ray ships it.

    Returns one result per pipeline: rows per pass, medians over the rounds of the time to the first batch, the rate,
    the ratio of its round's rate to the DataLoader's in the same round and the cores per share (`CORE_SHARES`), and
    every round's ratio. Pairing by round keeps a shared machine's drifting load out of the ratio; the rounds' spread
    shows what is left of it.
    """
    import ray

    cfg = load_config(preset="tiny", overrides=[f"data.crop_size={crop}"])
    params = view_params(cfg)
    stream = Stream(root, "unlabeled", row_groups(root, "unlabeled"), seed=0, num_epochs=args.epochs)
    # address=local: a private Ray of exactly `cpus` CPUs, never a cluster that `ray start` left on the machine.
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().op_resource_reservation_enabled = not args.no_reservation

    def ray_pass(
        refresh_s: float = LIMITS_REFRESH_S, on_thread: bool = False, batch_rows: int = BATCH
    ) -> tuple[int, float, float, dict[str, float]]:
        # The passes execute in this process: the settings a training job gives its worker processes are made here.
        shorten_limits_refresh(refresh_s)
        fetch_metadata_on_thread(on_thread)
        dataset = ray_dataset(stream, params, strict=False, decode_workers=0, batch_rows=batch_rows)
        return timed(dataset.iter_torch_batches(batch_size=BATCH, dtypes=TORCH_DTYPES["unlabeled"]), args.cpus)

    def loader_pass() -> tuple[int, float, float, dict[str, float]]:
        dataset = RowDataset(root, params, args.epochs)
        return timed(torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=args.cpus), args.cpus)

    baseline = f"DataLoader, {args.cpus} workers"
    pipelines = {"Ray Data, tasks": ray_pass}
    if ray_own is not None:
        pipelines["Ray Data, tasks, Ray's own executor settings"] = partial(ray_pass, *ray_own)
    if args.ablate:
        # One of the pipeline's choices undone at a time (benchmarks/README.md, "Data pipeline").
        pipelines["Ray Data, tasks, metadata fetched on a thread"] = partial(ray_pass, on_thread=True)
        pipelines["Ray Data, tasks, blocks not cut to whole batches"] = partial(ray_pass, batch_rows=1)
    pipelines[baseline] = loader_pass
    # One untimed Ray pass first: it starts Ray's worker processes (each imports torch, seconds here), which a
    # training run pays once. Ray stays up, idle, while the DataLoader runs.
    ray_pass()
    rounds = []
    for round_number in range(args.repeats):
        # Rotate which pipeline goes first, so a pass that runs better (or worse) after another's does not favour
        # one side of every ratio.
        shift = round_number % len(pipelines)
        order = list(pipelines)[shift:] + list(pipelines)[:shift]
        rounds.append({label: pipelines[label]() for label in order})
    ray.shutdown()
    results = []
    for label in pipelines:
        passes = [r[label] for r in rounds]
        ratios = [r[label][2] / r[baseline][2] for r in rounds]
        cores = {share: statistics.median(p[3][share] for p in passes) for share in passes[0][3]}
        results.append(
            {"dataset": name, "pipeline": label, "rows": passes[0][0],
             "first_batch_s": statistics.median(p[1] for p in passes),
             "rows_per_s": statistics.median(p[2] for p in passes),
             "ratio_vs_dataloader": statistics.median(ratios), "round_ratios": ratios, "cores": cores}
        )  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs for Ray (num_cpus) and DataLoader workers")
    parser.add_argument(
        "--epochs",
        type=int,
        default=6,
        help="passes over each dataset per measurement; each Ray pass is one execution, as a training run's "
        "unlabelled stream is, and pays the execution's start once (22 epochs: as many rows as the embedded default's "
        "stream)",
    )
    parser.add_argument("--jpeg-images", type=int, default=96, help="generated 500x375 JPEGs (crop 321)")
    parser.add_argument(
        "--jpeg-row-group-rows",
        type=int,
        default=ROW_GROUP_ROWS,
        help="rows per Parquet row group of the JPEG shards (a work item of the Ray pipeline; default: as "
        "jobs/prepare_data.py writes them)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="rounds; each times every pipeline once; the table gives medians and the spread of the paired ratio",
    )
    parser.add_argument(
        "--ablate",
        action="store_true",
        help="also run Ray Data with one of its choices undone at a time: block metadata fetched on Ray's thread, "
        "blocks not cut to whole batches",
    )
    parser.add_argument("--cache", default=None, help="where to put the datasets (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this path")
    parser.add_argument(
        "--no-reservation",
        action="store_true",
        help="turn off Ray Data's per-operator resource reservation (DataContext.op_resource_reservation_enabled), "
        "which holds a lone operator to one task at a time on 2 CPUs; the training job keeps it on",
    )
    args = parser.parse_args()
    import ray

    # Ray's own settings, read before anything here changes them (None: this Ray lacks one of them).
    refresh_s, on_thread = limits_refresh(), metadata_on_thread()
    ray_own = None if refresh_s is None or on_thread is None else (refresh_s, on_thread)

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache or tmp)
        builtin = str(ensure_builtin_dataset(cache / "builtin", num_labeled=8, num_unlabeled=256, num_val=8))
        jpegs = str(make_jpeg_dataset(cache / "jpeg", args.jpeg_images, args.jpeg_row_group_rows))
        results = []
        for name, root, crop in (("built-in 96 px, crop 64", builtin, 64), ("JPEG 500x375, crop 321", jpegs, 321)):
            results.extend(run(name, root, crop, args, ray_own))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, {args.cpus} used"
    load = f"load average {os.getloadavg()[0]:.1f}"
    reservation = "off" if args.no_reservation else "on"
    print(
        f"\nmachine: {machine}, {load}; torch {torch.__version__}, ray {ray.__version__}; reservation {reservation}\n"
    )
    columns = ["dataset", "pipeline", "rows per pass", "first batch (s)", "rows/s", "ratio vs DataLoader"]
    print("| " + " | ".join([*columns, "rounds' ratios", "cores: " + " / ".join(CORE_SHARES)]) + " |")
    print("|---" * 8 + "|")
    for r in results:
        spread = f"{min(r['round_ratios']):.2f}-{max(r['round_ratios']):.2f}"
        cores = " / ".join(f"{r['cores'][share]:.2f}" for share in CORE_SHARES) if r["cores"] else "n/a"
        print(
            f"| {r['dataset']} | {r['pipeline']} | {r['rows']} | {r['first_batch_s']:.1f} | {r['rows_per_s']:.0f} "
            f"| {r['ratio_vs_dataloader']:.2f} | {spread} | {cores} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = {"machine": machine, "load": load, "reservation": reservation, "results": results}
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
