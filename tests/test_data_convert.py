import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from csl_ray.data.convert import ConversionError, convert, format_summary
from csl_ray.data.layouts import CITYSCAPES_CLASSES
from csl_ray.data.shards import decode_image, decode_mask, read_manifest, read_split

JOB = Path(__file__).resolve().parents[1] / "jobs" / "prepare_data.py"
# A VOC-like palette whose colours are not the class ids, so reading RGB instead of the index would show.
PALETTE = [v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)]


def save_palette_mask(path: Path, ids: np.ndarray) -> None:
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette(PALETTE)
    image.save(path)


def make_voc(root: Path, count: int = 6, size: tuple[int, int] = (14, 18)) -> dict[str, np.ndarray]:
    """A VOC 2012 folder: JPEGImages/*.jpg, SegmentationClass/*.png (palette), val.txt, UniMatch split lists."""
    rng = np.random.default_rng(0)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    masks = {}
    for i in range(count):
        name = f"2007_{i:06d}"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        ids = rng.integers(0, 21, size).astype(np.uint8)
        ids[0, :3] = 255  # VOC's boundary / ignore value
        save_palette_mask(root / "SegmentationClass" / f"{name}.png", ids)
        masks[name] = ids
    names = sorted(masks)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names[-2:]) + "\n")
    lines = [f"JPEGImages/{n}.jpg SegmentationClass/{n}.png" for n in names]
    (root / "labeled.txt").write_text("\n".join(lines[:2]) + "\n")
    (root / "unlabeled.txt").write_text("\n".join(lines[2:4]) + "\n")
    return masks


@pytest.fixture
def voc(tmp_path):
    root = tmp_path / "VOC2012"
    return root, make_voc(root)


def run_voc(root: Path, out: Path, **kwargs):
    lists = {"labeled": str(root / "labeled.txt"), "unlabeled": str(root / "unlabeled.txt")}
    return convert("voc", root, out, workers=1, progress=False, **{**lists, **kwargs})


def test_voc_round_trip_decodes_to_the_source(voc, tmp_path):
    root, masks = voc
    summary = run_voc(root, tmp_path / "out")
    assert summary["splits"] == {"labeled": 2, "unlabeled": 2, "val": 2}
    manifest = read_manifest(tmp_path / "out")
    assert manifest["num_classes"] == 21 and manifest["class_names"][0] == "background"
    for split in ("labeled", "unlabeled", "val"):
        table = read_split(tmp_path / "out", split)
        for row in table.to_pylist():
            source = np.asarray(Image.open(root / "JPEGImages" / f"{row['id']}.jpg").convert("RGB"))
            assert np.array_equal(decode_image(row["image"]), source)
            assert np.array_equal(decode_mask(row["mask"]), masks[row["id"]])  # palette index, not RGB
            assert (row["height"], row["width"]) == source.shape[:2]
    assert "classes seen" in format_summary(summary)


def test_rerun_is_up_to_date_and_default_unlabeled_is_the_rest(voc, tmp_path):
    root, _ = voc
    first = run_voc(root, tmp_path / "out")
    again = run_voc(root, tmp_path / "out")
    assert not first["up_to_date"] and again["up_to_date"] and again["splits"] == first["splits"]
    rest = convert("voc", root, tmp_path / "rest", labeled=str(root / "labeled.txt"), workers=1, progress=False)
    assert rest["splits"] == {"labeled": 2, "unlabeled": 2, "val": 2}  # 6 images - 2 labelled - 2 val


def corrupt_image(root, name):
    (root / "JPEGImages" / f"{name}.jpg").write_bytes(b"not a jpeg at all")


def wrong_size_mask(root, name):
    save_palette_mask(root / "SegmentationClass" / f"{name}.png", np.zeros((5, 5), np.uint8))


def out_of_range_ids(root, name):
    ids = np.zeros((14, 18), np.uint8)
    ids[2, 2] = 40
    save_palette_mask(root / "SegmentationClass" / f"{name}.png", ids)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (corrupt_image, "unreadable image"),
        (wrong_size_mask, "mask size 5x5 != image size 18x14"),
        (out_of_range_ids, "class ids [40] outside [0, 21)"),
    ],
)
def test_invalid_samples_fail_naming_the_file_and_write_nothing(voc, tmp_path, damage, expected):
    root, _ = voc
    damage(root, "2007_000001")
    with pytest.raises(ConversionError) as info:
        run_voc(root, tmp_path / "out")
    assert expected in str(info.value) and "2007_000001" in str(info.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_split_list_errors_name_the_list_and_line(voc, tmp_path):
    root, _ = voc
    (root / "missing.txt").write_text(
        "JPEGImages/2007_000000.jpg SegmentationClass/2007_000000.png\nJPEGImages/nope.jpg x.png\n"
    )
    with pytest.raises(ConversionError, match=r"missing.txt:2: .*nope.jpg: no such file"):
        run_voc(root, tmp_path / "out", labeled=str(root / "missing.txt"))
    (root / "empty.txt").write_text("\n")
    with pytest.raises(ConversionError, match="empty.txt: empty split list"):
        run_voc(root, tmp_path / "out", unlabeled=str(root / "empty.txt"))


def test_cityscapes_label_ids_map_to_train_ids(tmp_path):
    root = tmp_path / "cityscapes"
    for split in ("train", "val"):
        for i in range(2):
            stem = f"aachen_{split}_{i:06d}"
            image_dir, label_dir = root / "leftImg8bit" / split / "aachen", root / "gtFine" / split / "aachen"
            image_dir.mkdir(parents=True, exist_ok=True)
            label_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((4, 6, 3), 100, np.uint8)).save(image_dir / f"{stem}_leftImg8bit.png")
            ids = np.array([[7, 26, 0, 33, 4, 24]] * 4, np.uint8)
            Image.fromarray(ids, mode="L").save(label_dir / f"{stem}_gtFine_labelIds.png")
    (root / "labeled.txt").write_text("leftImg8bit/train/aachen/aachen_train_000000_leftImg8bit.png\n")
    summary = convert(
        "cityscapes", root, tmp_path / "out", labeled=str(root / "labeled.txt"), workers=1, progress=False
    )
    assert summary["splits"] == {"labeled": 1, "unlabeled": 1, "val": 2}
    mask = decode_mask(read_split(tmp_path / "out", "labeled")["mask"][0].as_py())
    assert mask[0].tolist() == [0, 13, 255, 18, 255, 11]


def test_folder_layout_with_class_list_in_parallel(tmp_path):
    root = tmp_path / "folder"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("sky\nground\nthing\n")
    for i in range(5):
        Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)).save(root / "images" / f"im{i}.png")
        Image.fromarray(np.full((6, 6), i % 3, np.uint8), mode="L").save(root / "masks" / f"im{i}.png")
    (root / "lab.txt").write_text("im0\nim1\n")
    (root / "val.txt").write_text("images/im4.png masks/im4.png\n")
    summary = convert("folder", root, tmp_path / "out", labeled=str(root / "lab.txt"), val=str(root / "val.txt"),
                      workers=2, progress=False)  # fmt: skip
    assert summary["splits"] == {"labeled": 2, "unlabeled": 2, "val": 1}
    assert summary["class_names"] == ["sky", "ground", "thing"] and summary["classes_seen"] == [0, 1, 2]


def cli(*args: str) -> subprocess.CompletedProcess:
    # Generous: the job imports torch and pyarrow, seconds on a quiet machine and far longer on a loaded one.
    return subprocess.run([sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=600)


def test_cli_converts_verifies_and_fails_with_nonzero_status(voc, tmp_path):
    root, _ = voc
    out = tmp_path / "out"
    lists = ["--labeled", str(root / "labeled.txt"), "--unlabeled", str(root / "unlabeled.txt")]
    done = cli("voc", "--root", str(root), "--out", str(out), "--workers", "1", *lists)
    assert done.returncode == 0, done.stderr
    assert "rows: labeled 2, unlabeled 2, val 2" in done.stdout
    assert cli("--verify", str(out)).returncode == 0
    shard = next((out / "val").glob("*.parquet"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    failed = cli("--verify", str(out))
    assert failed.returncode != 0 and shard.name in failed.stderr and "sha256" in failed.stderr
    corrupt_image(root, "2007_000002")
    failed = cli("voc", "--root", str(root), "--out", str(tmp_path / "other"), "--workers", "1", *lists)
    assert failed.returncode != 0 and "2007_000002.jpg: unreadable image" in failed.stderr


def write_coco_tree(root: Path, mask_of: Callable[[str], np.ndarray]) -> None:
    """A COCO-layout tree of 3 train and 1 val 5x7 images (masks from `mask_of(image name)`), image 1 labelled."""
    for split, ids in (("train2017", range(3)), ("val2017", [9])):
        (root / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in ids:
            name = f"{i:012d}"
            Image.fromarray(np.full((5, 7, 3), 90, np.uint8)).save(root / split / f"{name}.jpg")
            Image.fromarray(mask_of(name), mode="L").save(root / "masks" / split / f"{name}.png")
    (root / "labeled.txt").write_text("train2017/000000000001.jpg masks/train2017/000000000001.png\n")


def test_coco_layout_defaults_val_and_unlabeled(tmp_path):
    root = tmp_path / "coco"
    write_coco_tree(root, lambda name: np.full((5, 7), 80, np.uint8))
    summary = convert("coco", root, tmp_path / "out", labeled=str(root / "labeled.txt"), workers=1, progress=False)
    assert summary["splits"] == {"labeled": 1, "unlabeled": 2, "val": 1}
    assert len(summary["class_names"]) == 81 and summary["classes_seen"] == [80]


# cityscapesScripts' helpers/labels.py, (name, id, trainId) for every id a labelIds mask holds ("license plate",
# id -1, never appears in one).
CITYSCAPES_LABELS = (
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255), ("out of roi", 3, 255),
    ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255), ("road", 7, 0), ("sidewalk", 8, 1),
    ("parking", 9, 255), ("rail track", 10, 255), ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4),
    ("guard rail", 14, 255), ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9), ("sky", 23, 10),
    ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15),
    ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18),
)  # fmt: skip
OFFICIAL_TRAIN_ID = np.array([train_id for _, _, train_id in CITYSCAPES_LABELS], np.uint8)


def make_cityscapes(root: Path, images_per_split: int = 2) -> dict[str, np.ndarray]:
    """leftImg8bit/ and gtFine/*_labelIds.png for train and val; each mask holds every labelId 0-33 (a 5x7 grid of
    0..34, 34 being no Cityscapes class), rolled differently per image. Returns the labelIds by sample id."""
    masks = {}
    for split in ("train", "val"):
        for i in range(images_per_split):
            stem = f"aachen_{split}_{i:06d}"
            image_dir, label_dir = root / "leftImg8bit" / split / "aachen", root / "gtFine" / split / "aachen"
            image_dir.mkdir(parents=True, exist_ok=True)
            label_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((5, 7, 3), 30 * i, np.uint8)).save(image_dir / f"{stem}_leftImg8bit.png")
            ids = np.roll(np.arange(35, dtype=np.uint8), 3 * i + (split == "val")).reshape(5, 7)
            Image.fromarray(ids, mode="L").save(label_dir / f"{stem}_gtFine_labelIds.png")
            masks[f"{stem}_leftImg8bit"] = ids
    return masks


def decoded_masks(out: Path) -> dict[str, dict[str, np.ndarray]]:
    return {
        split: {row["id"]: decode_mask(row["mask"]) for row in read_split(out, split).to_pylist()}
        for split in ("labeled", "unlabeled", "val")
    }


def test_cityscapes_every_label_id_maps_as_the_official_table(tmp_path):
    assert [name for name, _, train_id in CITYSCAPES_LABELS if train_id != 255] == list(CITYSCAPES_CLASSES)
    root = tmp_path / "cityscapes"
    label_ids = make_cityscapes(root)
    (root / "labeled.txt").write_text("leftImg8bit/train/aachen/aachen_train_000000_leftImg8bit.png\n")
    convert("cityscapes", root, tmp_path / "out", labeled=str(root / "labeled.txt"), workers=1, progress=False)
    masks = decoded_masks(tmp_path / "out")
    assert {split: len(rows) for split, rows in masks.items()} == {"labeled": 1, "unlabeled": 1, "val": 2}
    for split, rows in masks.items():
        for sample_id, mask in rows.items():
            source = label_ids[sample_id]
            expected = np.where(source < len(OFFICIAL_TRAIN_ID), OFFICIAL_TRAIN_ID[source.clip(0, 33)], 255)
            assert np.array_equal(mask, expected), (split, sample_id)


def test_cityscapes_prefers_label_train_ids_over_label_ids(tmp_path):
    root = tmp_path / "cityscapes"
    make_cityscapes(root)
    train_ids = np.arange(35, dtype=np.uint8).reshape(5, 7) % 19  # not what the labelIds would map to
    train_ids[0, :2] = 255
    for split in ("train", "val"):
        label_dir = root / "gtFine" / split / "aachen"
        Image.fromarray(train_ids, mode="L").save(label_dir / f"aachen_{split}_000001_gtFine_labelTrainIds.png")
    (root / "labeled.txt").write_text("leftImg8bit/train/aachen/aachen_train_000001_leftImg8bit.png\n")
    convert("cityscapes", root, tmp_path / "out", labeled=str(root / "labeled.txt"), workers=1, progress=False)
    masks = decoded_masks(tmp_path / "out")
    assert np.array_equal(masks["labeled"]["aachen_train_000001_leftImg8bit"], train_ids)
    assert np.array_equal(masks["val"]["aachen_val_000001_leftImg8bit"], train_ids)


def random_ids(rng: np.random.Generator, num_classes: int, shape: tuple[int, int]) -> np.ndarray:
    ids = rng.integers(0, num_classes, shape).astype(np.uint8)
    ids[rng.random(shape) < 0.2] = 255
    return ids


def test_coco_masks_round_trip_with_ignore(tmp_path):
    root, rng = tmp_path / "coco", np.random.default_rng(3)
    masks = {}
    write_coco_tree(root, lambda name: masks.setdefault(name, random_ids(rng, 81, (5, 7))))
    convert("coco", root, tmp_path / "out", labeled=str(root / "labeled.txt"), workers=1, progress=False)
    decoded = decoded_masks(tmp_path / "out")
    assert sum(len(rows) for rows in decoded.values()) == 4
    for rows in decoded.values():
        for sample_id, mask in rows.items():
            assert np.array_equal(mask, masks[sample_id]), sample_id


def make_folder(root: Path, count: int = 5) -> dict[str, np.ndarray]:
    """images/*.png, masks/*.png (3 classes and 255), classes.txt."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("sky\nground\nthing\n")
    rng, masks = np.random.default_rng(4), {}
    for i in range(count):
        Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)).save(root / "images" / f"im{i}.png")
        masks[f"im{i}"] = random_ids(rng, 3, (6, 6))
        Image.fromarray(masks[f"im{i}"], mode="L").save(root / "masks" / f"im{i}.png")
    return masks


def test_folder_masks_round_trip_with_ignore(tmp_path):
    root = tmp_path / "folder"
    masks = make_folder(root)
    (root / "lab.txt").write_text("im0\nim1\n")
    (root / "val.txt").write_text("images/im4.png masks/im4.png\n")
    convert("folder", root, tmp_path / "out", labeled=str(root / "lab.txt"), val=str(root / "val.txt"), workers=1,
            progress=False)  # fmt: skip
    decoded = decoded_masks(tmp_path / "out")
    assert sum(len(rows) for rows in decoded.values()) == 5
    for rows in decoded.values():
        for sample_id, mask in rows.items():
            assert np.array_equal(mask, masks[sample_id]), sample_id


def test_val_overlap_and_missing_mask_errors_name_the_file(tmp_path):
    root = tmp_path / "folder"
    make_folder(root)
    (root / "val.txt").write_text("im4\n")
    (root / "lab.txt").write_text("im0\nim4\n")
    with pytest.raises(ConversionError, match=r"lab.txt:2: .*im4.png"):
        convert("folder", root, tmp_path / "out", labeled=str(root / "lab.txt"), val=str(root / "val.txt"),
                workers=1, progress=False)  # fmt: skip
    (root / "lab.txt").write_text("im0\nim1\n")
    (root / "masks" / "im1.png").unlink()
    with pytest.raises(ConversionError, match=r"lab.txt:2: .*im1.png: no mask found"):
        convert("folder", root, tmp_path / "out", labeled=str(root / "lab.txt"), val=str(root / "val.txt"),
                workers=1, progress=False)  # fmt: skip
    assert not (tmp_path / "out").exists()
