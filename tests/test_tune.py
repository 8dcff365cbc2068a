"""Tune sweeps: search space checks, label-split grid, results table, and a real 2-trial sweep."""

import csv
import math

import pytest
from test_train import small_dataset

from csl_ray.config import ConfigError, apply_overrides, load_config
from csl_ray.data.streams import labeled_subset
from csl_ray.tune import (
    DEFAULT_FRACTIONS,
    SMOKE_SPACE,
    check_space,
    format_table,
    max_concurrent_trials,
    parse_space,
    split_grid,
    sweep,
    write_results,
)


def test_invalid_search_space_key_fails_listing_valid_keys():
    with pytest.raises(ConfigError) as err:
        check_space(load_config(preset="tiny"), {"ssl.tmp.mask_raito": [0.5], "ssl.selector.alpha": [4.0]})
    message = str(err.value)
    assert "ssl.tmp.mask_raito" in message and "ssl.tmp.mask_ratio" in message and "valid keys" in message


def test_invalid_search_space_value_fails():
    with pytest.raises(ConfigError, match="ssl.tmp.mask_ratio"):
        check_space(load_config(preset="tiny"), {"ssl.tmp.mask_ratio": [0.5, 1.5]})


def test_parse_space_reads_yaml_values():
    assert parse_space(["ssl.tmp.mask_ratio=0.5,0.7", "ssl.enabled=true,false"]) == {
        "ssl.tmp.mask_ratio": [0.5, 0.7],
        "ssl.enabled": [True, False],
    }
    with pytest.raises(ConfigError):
        parse_space(["ssl.tmp.mask_ratio"])


def test_split_grid_gives_different_labelled_subsets(tmp_path, tmp_path_factory):
    splits = split_grid(DEFAULT_FRACTIONS)
    assert [label for label, _ in splits] == ["1-16", "1-8", "1-4"]
    root = small_dataset(tmp_path_factory)
    subsets = []
    for _, overrides in splits:
        data = apply_overrides(load_config(preset="tiny"), overrides).data
        subsets.append(
            labeled_subset(
                root, fraction=data.labeled_fraction, list_path=data.labeled_list, split_seed=data.split_seed
            )
        )
    sizes = [len(s) for s in subsets]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    assert len({frozenset(s) for s in subsets}) == 3
    listed = tmp_path / "ids.txt"
    listed.write_text("labeled-00003.jpg labeled-00003.png\n")  # UniMatch style: image and mask paths
    ((label, overrides),) = split_grid([], [str(listed)])
    assert label == "ids" and overrides["data.labeled_list"] == str(listed)
    with pytest.raises(ConfigError):
        split_grid(["3/2"])


def test_max_concurrent_trials_counts_workers_and_data():
    gpu = load_config(preset="tiny", overrides=["ray.use_gpu=true", "ray.num_workers=2"])
    assert max_concurrent_trials(gpu, {"GPU": 8, "CPU": 64}) == 4
    cpu = load_config(preset="tiny", overrides=["ray.num_workers=1"])
    assert max_concurrent_trials(cpu, {"CPU": 4}) == 1 and max_concurrent_trials(cpu, {"CPU": 100}) > 1


def test_results_csv_plot_and_table(tmp_path):
    rows = [
        {"split": "1-8", "trial_id": "a", "ssl.tmp.mask_ratio": 0.5, "miou": 40.0, "final_miou": 39.0, "step": 4,
         "status": "ok"},
        {"split": "1-8", "trial_id": "b", "ssl.tmp.mask_ratio": 0.9, "miou": 45.0, "final_miou": 45.0, "step": 4,
         "status": "ok"},
        {"split": "1-4", "trial_id": "c", "ssl.tmp.mask_ratio": 0.5, "miou": math.nan, "final_miou": math.nan,
         "step": 0, "status": "error"},
    ]  # fmt: skip
    write_results(rows, ["ssl.tmp.mask_ratio"], tmp_path)
    with (tmp_path / "results.csv").open() as f:
        assert [r["trial_id"] for r in csv.DictReader(f)] == ["a", "b", "c"]
    assert (tmp_path / "miou_vs_mask_ratio.png").is_file()
    table = format_table(rows, ["ssl.tmp.mask_ratio"])
    assert "45.00" in table and "ssl.tmp.mask_ratio=0.9" in table and "no trial reached" in table


@pytest.mark.slow
def test_two_trial_sweep_writes_results(ray_session, tmp_path, tmp_path_factory):
    cfg = load_config(
        preset="tiny",
        overrides=[
            f"data.root={small_dataset(tmp_path_factory)}",
            "data.crop_size=32",
            "data.global_batch_size=2",
            "ray.num_workers=1",
            "train.iterations=2",
            "train.eval_every=2",
            "train.checkpoint_every=2",
            "ray.max_failures=0",
            f"train.output_dir={tmp_path}",
        ],
    )
    rows = sweep(cfg, SMOKE_SPACE, split_grid(["1/2"]), name="smoke")
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert sorted(r["ssl.tmp.mask_ratio"] for r in rows) == [0.5, 0.9]
    assert all(math.isfinite(r["miou"]) for r in rows)
    assert (tmp_path / "smoke" / "results.csv").is_file() and (tmp_path / "smoke" / "miou_vs_mask_ratio.png").is_file()
