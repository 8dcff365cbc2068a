import json
import multiprocessing

import numpy as np

from csl_ray.data.builtin import CLASS_NAMES, draw_scene, ensure_builtin_dataset
from csl_ray.data.shards import decode_image, decode_mask, read_manifest, read_split, verify

SMALL = {"num_labeled": 4, "num_unlabeled": 6, "num_val": 3, "size": 32}


def file_hashes(root):
    return [(f["path"], f["sha256"]) for f in read_manifest(root)["files"]]


def test_deterministic_per_seed_and_cached(tmp_path):
    first = ensure_builtin_dataset(tmp_path / "a", seed=3, **SMALL)
    second = ensure_builtin_dataset(tmp_path / "b", seed=3, **SMALL)
    other = ensure_builtin_dataset(tmp_path / "a", seed=4, **SMALL)
    assert file_hashes(first) == file_hashes(second)
    assert file_hashes(first) != file_hashes(other)
    assert ensure_builtin_dataset(tmp_path / "a", seed=3, **SMALL) == first  # cached: found, not redrawn
    manifest = read_manifest(first)
    assert manifest["splits"] == {"labeled": 4, "unlabeled": 6, "val": 3}
    assert manifest["num_classes"] == 6 == len(CLASS_NAMES)
    verify(first)


def test_rows_decode_and_unlabelled_rows_keep_masks(tmp_path):
    root = ensure_builtin_dataset(tmp_path, seed=0, **SMALL)
    for row in read_split(root, "unlabeled").to_pylist():
        image, mask = decode_image(row["image"]), decode_mask(row["mask"])
        assert image.shape == (32, 32, 3) and mask.shape == (32, 32)
        assert mask.max() < 6


def test_scenes_are_varied_and_not_separable_by_colour():
    scenes = [draw_scene(np.random.default_rng([0, i]), 64) for i in range(48)]
    masks = np.stack([m for _, m in scenes])
    counts = np.bincount(masks.ravel(), minlength=6)
    assert (counts > 0).all()  # every class appears
    assert 0.5 < counts[0] / counts.sum() < 0.95  # background dominates, objects are not rare

    # A colour-only rule (the majority class of each coarse RGB bin, fit on other scenes) cannot name the class of
    # most object pixels: each colour family is shared by two classes.
    def object_colours(first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        drawn = [draw_scene(np.random.default_rng([1, i]), 64) for i in range(first, first + count)]
        image, mask = np.stack([im for im, _ in drawn]), np.stack([m for _, m in drawn])
        return (image[mask > 0] // 32).astype(np.int64) @ np.array([64, 8, 1]), mask[mask > 0]

    fit_bins, fit_labels = object_colours(0, 96)
    votes = np.zeros((512, 6), dtype=np.int64)
    np.add.at(votes, (fit_bins, fit_labels), 1)
    test_bins, test_labels = object_colours(96, 96)
    assert (votes.argmax(1)[test_bins] == test_labels).mean() < 0.5


def _ensure(args):
    cache, seed = args
    return str(ensure_builtin_dataset(cache, seed=seed, **SMALL))


def test_two_processes_racing_get_one_identical_dataset(tmp_path):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        roots = pool.map(_ensure, [(str(tmp_path), 5)] * 2)
    assert roots[0] == roots[1]
    verify(roots[0])
    assert json.loads((tmp_path / roots[0].split("/")[-1] / "manifest.json").read_text())["splits"]["val"] == 3
    assert [p.name for p in tmp_path.iterdir()] == [roots[0].split("/")[-1]]  # no temp folders left behind
