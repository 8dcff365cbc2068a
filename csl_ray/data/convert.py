"""Converting a source folder (see `layouts.py`) into the shard format of `shards.py`: per-sample validation in
worker processes, then one atomic write; nothing is written unless every file is valid.

    summary = convert("voc", "VOCdevkit/VOC2012", "data/voc", labeled="splits/1464/labeled.txt",
                      unlabeled="splits/1464/unlabeled.txt")
    print(format_summary(summary))
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from csl_ray.data.layouts import ConversionError, Sample, discover, listing, resolve_splits, where
from csl_ray.data.shards import Record, ShardError, encode_mask, read_manifest, write_dataset

CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
_MASK_MODES = ("P", "L", "1", "I", "I;16")


def load_sample(sample: Sample, num_classes: int, ignore_index: int) -> tuple[Record | None, str | None, np.ndarray]:
    """Reads and validates one sample (runs in a worker process).

    Returns:
        (record, None, class pixel counts [256]) or (None, error naming the file and value, zeros).
    """
    counts = np.zeros(256, dtype=np.int64)
    try:
        data = sample.image.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # a full decode: truncated files fail here, not in the training pipeline
            width, height = image.size
            if image.format not in ("JPEG", "PNG"):
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="PNG")
                data = buffer.getvalue()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        return None, f"{sample.image}: unreadable image: {err}", counts
    if sample.mask is None:
        return Record(sample.id, data, None, height, width), None, counts
    try:
        with Image.open(sample.mask) as mask_image:
            mode = mask_image.mode
            ids = np.asarray(mask_image)
    except Exception as err:
        return None, f"{sample.mask}: unreadable mask: {err}", counts
    if mode not in _MASK_MODES:
        return None, f"{sample.mask}: mask mode {mode!r}; expected class ids (palette 'P' or grayscale 'L')", counts
    if ids.shape != (height, width):
        return (
            None,
            f"{sample.mask}: mask size {ids.shape[1]}x{ids.shape[0]} != image size {width}x{height} ({sample.image})",
            counts,
        )
    if sample.remap:
        lut = np.full(256, ignore_index, dtype=np.uint8)
        for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
            lut[label_id] = train_id
        ids = lut[np.clip(ids, 0, 255).astype(np.uint8)]
    values = np.unique(ids)
    bad = [int(v) for v in values if not (0 <= v < num_classes or v == ignore_index)]
    if bad:
        return None, f"{sample.mask}: class ids {bad[:10]} outside [0, {num_classes}) and != {ignore_index}", counts
    ids = ids.astype(np.uint8)
    counts += np.bincount(ids.ravel(), minlength=256)
    return Record(sample.id, data, encode_mask(ids), height, width), None, counts


def _load(job: tuple[Sample, int, int]) -> tuple[Record | None, str | None, np.ndarray]:
    return load_sample(*job)


def fingerprint(layout: str, splits: dict[str, list[Sample]]) -> str:
    """sha256 over the layout, split membership and every input file's path, size and mtime."""
    digest = hashlib.sha256(layout.encode())
    for split, samples in splits.items():
        digest.update(split.encode())
        for s in samples:
            for path in (s.image, s.mask):
                stat = path.stat() if path is not None else None
                digest.update(f"{s.id}|{path}|{stat and stat.st_size}|{stat and stat.st_mtime_ns}|{s.remap}\n".encode())
    return digest.hexdigest()


def convert(
    layout: str,
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    labeled: str | None = None,
    unlabeled: str | None = None,
    val: str | None = None,
    name: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Converts a source folder into a dataset root of Parquet shards; nothing is written unless every file is valid.

    Re-running with unchanged inputs finds the existing root's fingerprint and returns at once.

    Args:
        layout: one of LAYOUTS.
        root: the source folder.
        out: the dataset root to write.
        labeled, unlabeled, val: split list files (see the module docstring); defaults per layout.
        name: dataset name in the manifest (default: the layout name).
        workers: decoding processes (default: all CPUs; 1 = in this process).
        overwrite: replace a different dataset already at `out`.
        progress: show a tqdm bar.

    Returns:
        Summary: `out`, `up_to_date`, `splits` (rows), `bytes`, `class_names`, `classes_seen` (ids with pixels),
        `unlabeled_without_mask`.

    Raises:
        ConversionError: any invalid input, listing the offending files.
    """
    source = discover(layout, root)
    splits = resolve_splits(source, Path(root).expanduser().resolve(), labeled, unlabeled, val)
    inputs_digest = fingerprint(layout, splits)
    out = Path(out).expanduser().resolve()
    if (out / "manifest.json").is_file():
        try:
            existing = read_manifest(out)
        except ShardError:
            existing = None
        if existing is not None and existing.get("source", {}).get("fingerprint") == inputs_digest:
            return _summary(out, existing, up_to_date=True)
    num_classes, ignore_index = len(source.class_names), 255
    errors: list[str] = []
    counts = np.zeros(256, dtype=np.int64)
    total = sum(len(s) for s in splits.values())
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=total, unit="img", disable=not progress, desc=f"{layout} -> {out.name}")

    def records(samples: list[Sample], results: Iterator[tuple[Record | None, str | None, np.ndarray]]):
        nonlocal counts
        for sample, (record, error, seen) in zip(samples, results, strict=True):
            bar.update(1)
            if error is not None:
                errors.append(where(sample, error))
                continue
            counts += seen
            yield record

    def check() -> None:
        if errors:
            raise ConversionError(listing(f"{len(errors)} invalid sample(s); nothing was written", errors))

    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        mapper = pool.imap if pool is not None else map
        iterables = {
            split: records(samples, mapper(_load, [(s, num_classes, ignore_index) for s in samples]))
            for split, samples in splits.items()
        }
        manifest = write_dataset(
            out,
            name=name or layout,
            class_names=list(source.class_names),
            splits=iterables,
            ignore_index=ignore_index,
            source=lambda: {
                "layout": layout,
                "root": str(Path(root).expanduser().resolve()),
                "fingerprint": inputs_digest,
                "classes_seen": [int(c) for c in np.flatnonzero(counts[:num_classes])],
                "unlabeled_without_mask": sum(s.mask is None for s in splits["unlabeled"]),
            },
            overwrite=overwrite,
            before_publish=check,
        )
    except ShardError:
        check()  # a split whose every sample is invalid surfaces as "no rows": report the files instead
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return _summary(out, manifest, up_to_date=False)


def _summary(out: Path, manifest: dict[str, Any], up_to_date: bool) -> dict[str, Any]:
    source = manifest.get("source", {})
    return {
        "out": str(out),
        "up_to_date": up_to_date,
        "splits": manifest["splits"],
        "bytes": sum(f["bytes"] for f in manifest["files"]),
        "class_names": manifest["class_names"],
        "classes_seen": source.get("classes_seen", []),
        "unlabeled_without_mask": source.get("unlabeled_without_mask", 0),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable closing summary of `convert`."""
    names = summary["class_names"]
    seen = set(summary["classes_seen"])
    unseen = [names[i] for i in range(len(names)) if i not in seen]
    lines = [
        f"{summary['out']}: {'already up to date' if summary['up_to_date'] else 'written'}",
        "  rows: " + ", ".join(f"{split} {rows}" for split, rows in summary["splits"].items()),
        f"  bytes: {summary['bytes']:,} ({summary['bytes'] / 2**20:.1f} MiB)",
        f"  classes seen: {len(seen)}/{len(names)}" + (f" (never seen: {', '.join(unseen)})" if unseen else ""),
    ]
    if summary["unlabeled_without_mask"]:
        lines.append(
            f"  unlabelled images without a mask (no pseudo-label diagnostics): {summary['unlabeled_without_mask']}"
        )
    return "\n".join(lines)
