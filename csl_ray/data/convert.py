"""Converters from folder layouts (VOC, Cityscapes, COCO, generic) to the shard format of `shards.py`.

Every layout resolves to three lists of samples (image path, mask path or None, id): `labeled`, `unlabeled`, `val`.
Split lists are UniMatch-style text files: one sample a line, either `IMAGE MASK` paths relative to the root
(`JPEGImages/x.jpg SegmentationClass/x.png`) or a bare id/image path whose mask is found by the layout. Without an
`--unlabeled` list the unlabelled split is the layout's training pool minus the labelled and validation ids.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from csl_ray.data.shards import SPLITS, Record, ShardError, encode_mask, read_manifest, write_dataset

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
COCO_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
# Cityscapes labelIds -> the 19 train ids (cityscapesScripts' labels.py); every other id is ignored.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
LAYOUTS = ("voc", "cityscapes", "coco", "folder")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_MASK_MODES = ("P", "L", "1", "I", "I;16")
_MAX_LISTED_ERRORS = 20


class ConversionError(ValueError):
    """Bad input data or split lists; the message names every offending file (or list line) and value."""


@dataclass(frozen=True)
class Sample:
    """One image to convert. `origin` is the split-list line that named it ("" when found by the layout scan)."""

    id: str
    image: Path
    mask: Path | None
    origin: str = ""
    remap: bool = False
    """The mask holds Cityscapes labelIds, mapped to train ids on the way in."""


@dataclass
class Layout:
    """What a folder layout provides: classes, every known sample by id, the training pool, a default val split."""

    name: str
    class_names: tuple[str, ...]
    index: dict[str, Sample]
    pool: list[str]
    default_val: list[str] | None = None


def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _images(folder: Path, recursive: bool = False) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _add(index: dict[str, Sample], sample: Sample) -> None:
    """Adds a sample to a layout's index; ids are file stems and must be unique across the layout."""
    if sample.id in index:
        raise ConversionError(f"{sample.image}: duplicate id {sample.id!r} (also {index[sample.id].image})")
    index[sample.id] = sample


def _require_dir(root: Path, name: str, layout: str) -> Path:
    path = root / name
    if not path.is_dir():
        raise ConversionError(f"{path}: missing folder (expected the {layout} layout under {root})")
    return path


def voc_layout(root: Path) -> Layout:
    """PASCAL VOC 2012: JPEGImages/, SegmentationClass/ palette PNGs, optional SegmentationClassAug/ (SBD)."""
    images = _require_dir(root, "JPEGImages", "voc")
    index = {}
    for image in _images(images):
        mask = _first_existing(
            root / "SegmentationClass" / f"{image.stem}.png", root / "SegmentationClassAug" / f"{image.stem}.png"
        )
        _add(index, Sample(image.stem, image, mask))
    val_list = root / "ImageSets" / "Segmentation" / "val.txt"
    default_val = (
        [line.split()[0] for line in val_list.read_text().splitlines() if line.strip()] if val_list.is_file() else None
    )
    # The pool is every image with a mask: VOC train (1464) alone, or train_aug (10582) with the SBD masks.
    pool = [i for i, s in index.items() if s.mask is not None]
    return Layout("voc", VOC_CLASSES, index, pool, default_val)


def _cityscapes_sample(root: Path, image: Path) -> Sample:
    base = image.name.removesuffix("_leftImg8bit.png")
    folder = root / "gtFine" / image.parent.relative_to(root / "leftImg8bit")
    train_ids = folder / f"{base}_gtFine_labelTrainIds.png"
    label_ids = folder / f"{base}_gtFine_labelIds.png"
    mask = _first_existing(train_ids, label_ids)
    return Sample(image.stem, image, mask, remap=mask == label_ids)


def cityscapes_layout(root: Path) -> Layout:
    """Cityscapes: leftImg8bit/{train,val}/CITY/*_leftImg8bit.png with gtFine/*_labelTrainIds.png or *_labelIds.png."""
    base = _require_dir(root, "leftImg8bit", "cityscapes")
    index, pools = {}, {"train": [], "val": []}
    for split in pools:
        for image in _images(base / split, recursive=True):
            sample = _cityscapes_sample(root, image)
            _add(index, sample)
            pools[split].append(sample.id)
    return Layout("cityscapes", CITYSCAPES_CLASSES, index, pools["train"], pools["val"] or None)


def coco_layout(root: Path) -> Layout:
    """COCO in UniMatch's layout: train2017/, val2017/ images, masks/{train2017,val2017}/*.png with 81 classes."""
    index, pools = {}, {"train2017": [], "val2017": []}
    for split in pools:
        for image in _images(_require_dir(root, split, "coco")):
            mask = _first_existing(root / "masks" / split / f"{image.stem}.png")
            _add(index, Sample(image.stem, image, mask))
            pools[split].append(image.stem)
    return Layout("coco", COCO_CLASSES, index, pools["train2017"], pools["val2017"] or None)


def folder_layout(root: Path) -> Layout:
    """Generic: images/*, masks/<image stem>.png (uint8 class ids), classes.txt (one class name a line)."""
    images = _require_dir(root, "images", "folder")
    classes = root / "classes.txt"
    if not classes.is_file():
        raise ConversionError(f"{classes}: missing (one class name a line, in class-id order)")
    names = tuple(line.strip() for line in classes.read_text().splitlines() if line.strip())
    if len(names) < 2:
        raise ConversionError(f"{classes}: needs at least 2 class names, found {len(names)}")
    index = {}
    for image in _images(images):
        mask = _first_existing(root / "masks" / f"{image.stem}.png")
        _add(index, Sample(image.stem, image, mask))
    return Layout("folder", names, index, list(index))


def discover(layout: str, root: str | os.PathLike) -> Layout:
    """Scans a source root in one of LAYOUTS."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise ConversionError(f"{root}: no such folder")
    readers = {"voc": voc_layout, "cityscapes": cityscapes_layout, "coco": coco_layout, "folder": folder_layout}
    if layout not in readers:
        raise ConversionError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    return readers[layout](root)


def read_split_list(path: str | os.PathLike, root: Path, layout: Layout) -> list[Sample]:
    """Parses a UniMatch-style split list into samples; raises ConversionError naming `file:line` for a missing file.

    A line is `IMAGE MASK` (paths relative to the root; a missing MASK falls back to the layout's mask for that id)
    or a single token, an id or image path, looked up in the layout's index.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise ConversionError(f"{path}: cannot read split list: {err}") from err
    samples, errors = [], []
    for number, line in enumerate(lines, 1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"{path}:{number}"
        sample_id = Path(tokens[0]).stem
        known = layout.index.get(sample_id)
        if len(tokens) == 1:
            if known is None:
                errors.append(f"{where}: {tokens[0]!r}: no image with id {sample_id!r} under {root}")
            else:
                samples.append(Sample(known.id, known.image, known.mask, where, known.remap))
            continue
        image, mask = root / tokens[0], root / tokens[1]
        if not image.is_file():
            errors.append(f"{where}: {image}: no such file")
            continue
        if mask.is_file():
            samples.append(Sample(sample_id, image, mask, where, remap=mask.name.endswith("_labelIds.png")))
        else:
            samples.append(
                Sample(sample_id, image, known.mask if known else None, where, known.remap if known else False)
            )
    if errors:
        raise ConversionError(_listing(f"{path}: {len(errors)} listed file(s) missing", errors))
    if not samples:
        raise ConversionError(f"{path}: empty split list")
    return samples


def resolve_splits(
    layout: Layout, root: Path, labeled: str | None, unlabeled: str | None, val: str | None
) -> dict[str, list[Sample]]:
    """Split name -> samples, from the lists given and the layout's defaults; checks emptiness, overlap and masks."""
    if labeled is None:
        raise ConversionError(f"{layout.name}: --labeled is required (a split list of the labelled images)")
    splits = {"labeled": read_split_list(labeled, root, layout)}
    if val is not None:
        splits["val"] = read_split_list(val, root, layout)
    elif layout.default_val is not None:
        missing = [i for i in layout.default_val if i not in layout.index]
        if missing:
            raise ConversionError(f"{root}: default val ids without an image: {missing[:5]}")
        splits["val"] = [layout.index[i] for i in layout.default_val]
    else:
        raise ConversionError(f"{layout.name}: --val is required (the layout defines no validation split)")
    if unlabeled is not None:
        splits["unlabeled"] = read_split_list(unlabeled, root, layout)
    else:
        taken = {s.id for s in splits["labeled"]} | {s.id for s in splits["val"]}
        splits["unlabeled"] = [layout.index[i] for i in layout.pool if i not in taken]
        if not splits["unlabeled"]:
            raise ConversionError(
                f"split 'unlabeled' is empty: every image of the {layout.name} pool under {root} is labelled or in "
                "val; pass --unlabeled"
            )
    val_ids = {s.id for s in splits["val"]}
    for split in ("labeled", "unlabeled"):
        leaked = [_where(s, f"{s.image}: also in val") for s in splits[split] if s.id in val_ids]
        if leaked:
            raise ConversionError(_listing(f"split {split!r} shares {len(leaked)} image(s) with val", leaked))
    errors = [
        _where(s, f"{s.image}: no mask found") for split in ("labeled", "val") for s in splits[split] if s.mask is None
    ]
    if errors:
        raise ConversionError(_listing(f"{len(errors)} labelled/val image(s) without a mask", errors))
    return {split: splits[split] for split in SPLITS}


def _where(sample: Sample, message: str) -> str:
    return f"{sample.origin}: {message}" if sample.origin else message


def _listing(head: str, errors: list[str]) -> str:
    shown = errors[:_MAX_LISTED_ERRORS]
    more = f"\n... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
    return head + ":\n" + "\n".join(shown) + more


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
                errors.append(_where(sample, error))
                continue
            counts += seen
            yield record

    def check() -> None:
        if errors:
            raise ConversionError(_listing(f"{len(errors)} invalid sample(s); nothing was written", errors))

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
