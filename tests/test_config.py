import dataclasses
import re

import pytest

from csl_ray.config import (
    PRESETS,
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_config,
    epoch_iterations,
    field_docs,
    load_config,
    per_worker_batch_size,
    resolve_iterations,
    valid_keys,
)
from csl_ray.data.builtin import CLASS_NAMES
from csl_ray.data.layouts import CITYSCAPES_CLASSES, COCO_CLASSES, VOC_CLASSES


def test_defaults_match_spec():
    cfg = load_config()
    assert cfg.ssl.selector.alpha == 8.0
    assert cfg.ssl.selector.lam == 0.0 and cfg.ssl.selector.ridge == 0.0
    assert cfg.ssl.selector.residual_variance == "released" and cfg.ssl.selector.residual_rule == "csl"
    assert cfg.ssl.tmp.mask_ratio == 0.7 and cfg.ssl.tmp.block == 32 and cfg.ssl.tmp.prob == 0.5
    assert (cfg.ssl.weight_strong, cfg.ssl.weight_masked, cfg.ssl.weight_fp) == (0.25, 0.25, 0.5)
    assert cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 1e-4 and cfg.optim.poly_power == 0.9


# The class names of each preset's dataset, by the preset's name prefix.
DATASET_CLASSES = {"pascal": VOC_CLASSES, "cityscapes": CITYSCAPES_CLASSES, "coco": COCO_CLASSES, "tiny": CLASS_NAMES}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_have_their_dataset_class_count(preset):
    dataset = next((name for name in DATASET_CLASSES if preset.startswith(name)), None)
    assert dataset is not None, f"preset {preset!r}: add its dataset's class names to DATASET_CLASSES"
    assert load_config(preset).data.num_classes == len(DATASET_CLASSES[dataset])


def test_defaults_are_the_pascal_recipe():
    assert load_config("pascal") == Config()


def test_spec_table_values():
    city = load_config("cityscapes")
    assert (city.data.num_classes, city.data.crop_size, city.optim.lr, city.optim.lr_multi) == (19, 801, 5e-3, 1.0)
    assert city.optim.labeled_loss == "ohem" and city.data.eval_mode == "sliding_window"
    coco = load_config("coco")
    assert (coco.data.num_classes, coco.data.crop_size, coco.optim.lr) == (81, 513, 4e-3)


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("preset: pascal\nssl:\n  tmp:\n    mask_ratio: 0.5\noptim:\n  lr: 2\n")
    cfg = load_config(path=path, overrides=["ssl.tmp.mask_ratio=0.3", "model.weights_file=/w.pth"])
    assert cfg.data.num_classes == 21  # from the preset named in the file
    assert cfg.ssl.tmp.mask_ratio == 0.3  # override beats file
    assert cfg.optim.lr == 2.0 and isinstance(cfg.optim.lr, float)  # int widened to float
    assert cfg.model.weights_file == "/w.pth"


def test_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ssl:\n  tmp:\n    mask_rato: 0.5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path=path)
    message = str(err.value)
    assert str(path) in message and "ssl.tmp.mask_rato" in message and "ssl.tmp.mask_ratio" in message


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("ssl.tmp.mask_ratio=high", "ssl.tmp.mask_ratio"),
        ("train.iterations=1.5", "train.iterations"),
        ("ssl.enabled=3", "ssl.enabled"),
        ("ssl.selector.kind=otsu", "ssl.selector.kind: 'otsu' is not one of csl, threshold, none"),
        ("model.output_stride=32", "model.output_stride: 32 is not one of 8, 16"),
        ("ssl.bn_stats=some", "ssl.bn_stats"),
        ("ssl.teacher.partner_pass=true", "ssl.teacher.partner_pass"),
        ("ssl.warmup_iterations=-1", "ssl.warmup_iterations"),
        ("ssl.selector.weight_floor=1.5", "ssl.selector.weight_floor"),
        ("train.epochs=0", "train.epochs"),
        ("ssl.tmp.mask_ratio=1.5", "ssl.tmp.mask_ratio"),
        ("data.scale_range=[1]", "data.scale_range"),
        ("nokey", "section.key=value"),
        ("ssl=1", "ssl"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config("tiny", overrides=[override])


def test_paper_presets_are_the_released_recipe():
    for preset, epochs in (("pascal", 80), ("cityscapes", 240), ("coco", 30)):
        cfg = load_config(preset)
        assert cfg.model.backbone == "resnet101s" and cfg.model.weights_file is None
        assert (cfg.train.epochs, cfg.train.iterations) == (epochs, None)
        assert cfg.ssl.bn_stats == "released" and cfg.ssl.teacher.partner_pass == "train"
        assert (cfg.ssl.warmup_iterations, cfg.ssl.rampup_iterations, cfg.ssl.selector.weight_floor) == (0, 0, 0.0)


@pytest.mark.parametrize(
    ("unlabeled_rows", "released_iterations"),
    [(10_490, 104_880), (9_118, 91_120), (7_936, 79_360)],  # Pascal 92, 1464 and blended 1/4 at batch 8, 80 epochs
)
def test_epochs_give_the_released_iteration_counts(unlabeled_rows, released_iterations):
    assert epoch_iterations(80, unlabeled_rows, 8) == released_iterations
    cfg = load_config("pascal")
    resolved = resolve_iterations(cfg, unlabeled_rows)
    assert resolved.train.iterations == released_iterations and cfg.train.iterations is None  # a copy


def test_iterations_win_over_epochs_and_one_is_needed():
    cfg = load_config("pascal", overrides=["train.iterations=300", "train.epochs=5"])
    assert resolve_iterations(cfg, 10_490).train.iterations == 300
    assert resolve_iterations(load_config("pascal", overrides=["train.epochs=2"]), 20).train.iterations == 4
    with pytest.raises(ConfigError, match="train.epochs: 7 unlabelled rows"):
        resolve_iterations(load_config("pascal"), 7)
    with pytest.raises(ConfigError, match="set one of them"):
        load_config("pascal", overrides=["train.epochs=null"])


def test_batch_must_divide_across_workers():
    with pytest.raises(ConfigError, match="global_batch_size"):
        load_config("tiny", overrides=["ray.num_workers=3"])
    cfg = load_config("tiny", overrides=["ray.num_workers=4"])
    assert per_worker_batch_size(cfg) == 2


def test_round_trip_through_yaml_and_dict(tmp_path):
    cfg = load_config("cityscapes", overrides=["data.scale_range=[0.75, 1.5]", "train.name=run1"])
    dump_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(path=tmp_path / "out" / "config.yaml") == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_field_docs_cover_every_key():
    rows = field_docs()
    assert [row[0] for row in rows] == valid_keys()
    undocumented = [key for key, _, doc in rows if not doc]
    # Self-explanatory leaves may skip a docstring, but the method's knobs must not.
    for key in ("ssl.selector.alpha", "ssl.selector.ridge", "ssl.tmp.mask_ratio", "data.global_batch_size"):
        assert key not in undocumented


def test_every_leaf_is_a_plain_type():
    for key in valid_keys():
        obj = Config()
        *parents, leaf = key.split(".")
        for part in parents:
            obj = getattr(obj, part)
        assert not dataclasses.is_dataclass(getattr(obj, leaf))


def test_readme_reference_is_generated_from_the_dataclasses():
    from pathlib import Path

    from csl_ray.config import reference_markdown

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    section = readme.split(start, 1)[1].split(end, 1)[0]
    assert section == reference_markdown(), "stale README table: paste `python -m csl_ray.config`"
