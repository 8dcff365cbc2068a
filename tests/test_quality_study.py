"""The quality study's grid (benchmarks/quality.py): each variant is its released recipe with one thing changed, so a
row's difference from `csl` (or `threshold`) is that thing and nothing the `tiny` preset adds (its warm-up)."""

import pytest

from benchmarks.quality import METHODS, VARIANTS
from csl_ray.config import config_to_dict, load_config


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resolved(overrides: list[str]) -> dict:
    return flat(config_to_dict(load_config("tiny", overrides=overrides)))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_variant_changes_only_its_own_keys_of_the_released_recipe(variant):
    base = "threshold" if variant.startswith("threshold") else "csl"
    own_keys = {o.split("=")[0] for o in VARIANTS[variant] if o not in METHODS[base]}
    released, changed = resolved(METHODS[base]), resolved(VARIANTS[variant])
    differing = {key for key in released if released[key] != changed[key]}
    assert differing == own_keys and own_keys


def test_the_released_recipes_have_no_warm_up_whatever_the_preset_adopts():
    assert load_config("tiny").ssl.warmup_iterations > 0  # the preset's own recipe option
    for method in ("csl", "threshold"):
        assert resolved(METHODS[method])["ssl.warmup_iterations"] == 0
