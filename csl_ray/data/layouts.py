"""Source folder layouts (VOC, Cityscapes, COCO, generic) and their split lists, resolved to samples to convert.

Every layout resolves to three lists of samples (image path, mask path or None, id): `labeled`, `unlabeled`, `val`.
Split lists are UniMatch-style text files: one sample a line, either `IMAGE MASK` paths relative to the root
(`JPEGImages/x.jpg SegmentationClass/x.png`) or a bare id/image path whose mask is found by the layout. Without an
`--unlabeled` list the unlabelled split is the layout's training pool minus the labelled and validation ids.

    source = discover("voc", "VOCdevkit/VOC2012")
    splits = resolve_splits(source, root, "splits/1464/labeled.txt", None, None)   # {"labeled": [Sample], ...}
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from csl_ray.data.shards import SPLITS

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
LAYOUTS = ("voc", "cityscapes", "coco", "folder")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
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
        raise ConversionError(listing(f"{path}: {len(errors)} listed file(s) missing", errors))
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
        leaked = [where(s, f"{s.image}: also in val") for s in splits[split] if s.id in val_ids]
        if leaked:
            raise ConversionError(listing(f"split {split!r} shares {len(leaked)} image(s) with val", leaked))
    errors = [
        where(s, f"{s.image}: no mask found") for split in ("labeled", "val") for s in splits[split] if s.mask is None
    ]
    if errors:
        raise ConversionError(listing(f"{len(errors)} labelled/val image(s) without a mask", errors))
    return {split: splits[split] for split in SPLITS}


def where(sample: Sample, message: str) -> str:
    """An error message prefixed with the split-list line that named the sample, if one did."""
    return f"{sample.origin}: {message}" if sample.origin else message


def listing(head: str, errors: list[str]) -> str:
    """`head` and the first errors, one a line, with how many more were left out."""
    shown = errors[:_MAX_LISTED_ERRORS]
    more = f"\n... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
    return head + ":\n" + "\n".join(shown) + more
