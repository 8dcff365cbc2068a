"""The built-in tiny dataset: procedurally drawn scenes of textured objects, deterministic from a seed.

Five object classes plus background. A class is a texture drawn in one of two colour families, and every colour
family is shared by two classes, so neither colour nor texture alone identifies a class; shape carries nothing:

| id | class | texture | colour families |
|---|---|---|---|
| 1 | striped | parallel stripes | red, blue |
| 2 | checkered | checkerboard | blue, green |
| 3 | dotted | dot lattice | green, yellow |
| 4 | speckled | fine random speckle | yellow, purple |
| 5 | ringed | concentric rings | purple, red |

Background distractors are shapes filled plain or with a smooth gradient in the same colour families, and shapes
with the class textures in greys; the background itself is a low-saturation gradient, low-frequency blotches or a
faint large-scale texture. Objects (discs, squares, triangles, ellipses) vary in scale (about 8-29 px radius on
96 px), rotation, shade, hue and texture period (4-9 px), occlude one another, and thin bars occlude them; a colour
cast,
illumination gradients, pixel noise and occasional blur finish the image. A pretrained backbone learns the classes
from a few dozen labelled scenes in a few hundred iterations, but not all of their variety, which leaves room for
unlabelled data (measured in benchmarks/README.md, Quality).

    root = ensure_builtin_dataset("~/.cache/csl-ray/builtin", seed=0)   # written once, then reused
"""

from __future__ import annotations

import colorsys
import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from csl_ray.data.shards import MANIFEST, Record, encode_mask, read_manifest, write_dataset

CLASS_NAMES = ("background", "striped", "checkered", "dotted", "speckled", "ringed")
_HUES = {"red": 0.0, "yellow": 0.15, "green": 0.33, "blue": 0.6, "purple": 0.8}  # HSV hue of each colour family
_CLASS_LOOK = {1: ("stripes", ("red", "blue")), 2: ("checker", ("blue", "green")),
               3: ("dots", ("green", "yellow")), 4: ("speckle", ("yellow", "purple")),
               5: ("rings", ("purple", "red"))}  # fmt: skip
_SHAPES = ("disc", "square", "triangle", "ellipse")
_SPLIT_STREAMS = {"labeled": 1, "unlabeled": 2, "val": 3}
FORMAT_TAG = "v3"
"""Bump when the drawing changes, so stale caches are not reused."""


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32) * 255


def _family_colours(family: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark and a light shade of a colour family, hue jittered, so the texture shows in every shade."""
    hue = _HUES[family] + rng.uniform(-0.04, 0.04)
    saturation = rng.uniform(0.5, 0.95)
    return _hsv(hue, saturation, rng.uniform(0.3, 0.55)), _hsv(hue, saturation * 0.8, rng.uniform(0.75, 1.0))


def _greys(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return _hsv(rng.random(), rng.uniform(0.0, 0.12), rng.uniform(0.2, 0.45)), _hsv(
        rng.random(), rng.uniform(0.0, 0.12), rng.uniform(0.65, 0.95)
    )


def _shape(kind: str, u: np.ndarray, v: np.ndarray, aspect: float) -> np.ndarray:
    """Inside test in the object's rotated frame, unit radius."""
    if kind == "disc":
        return u**2 + v**2 <= 1.0
    if kind == "ellipse":
        return (u * aspect) ** 2 + (v / aspect) ** 2 <= 1.0
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if kind == "triangle":  # equilateral, inscribed in the unit circle
        return (v >= -0.5) & (np.sqrt(3) * u - v >= -1.0) & (-np.sqrt(3) * u - v >= -1.0)
    raise ValueError(kind)


def _texture(kind: str, x: np.ndarray, y: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    """Mix weight in [0, 1] between an object's two colours, in pixel coordinates of a rotated texture frame
    centred on the object."""
    if kind == "stripes":
        return (np.sin(2 * np.pi * x / period) > 0).astype(np.float32)
    if kind == "checker":
        return ((np.floor(x / period) + np.floor(y / period)) % 2).astype(np.float32)
    if kind == "dots":
        dx = x / period - np.round(x / period)
        dy = y / period - np.round(y / period)
        return (dx**2 + dy**2 < 0.09).astype(np.float32)
    if kind == "speckle":
        return (rng.random(x.shape) < 0.5).astype(np.float32)
    if kind == "rings":
        return (np.sin(2 * np.pi * np.hypot(x, y) / period) > 0).astype(np.float32)
    if kind == "gradient":
        return np.clip(0.5 + x / (4 * period), 0, 1).astype(np.float32)
    return np.zeros_like(x, dtype=np.float32)  # plain


def _paint(
    image: np.ndarray,
    mask: np.ndarray,
    label: int | None,
    texture: str,
    colours: tuple[np.ndarray, np.ndarray],
    rng: np.random.Generator,
) -> None:
    """Draws one textured shape at a random place, scale and rotation; label None keeps the mask (a distractor)."""
    size = image.shape[0]
    radius = rng.uniform(0.08, 0.3) * size
    cx, cy = rng.uniform(0.05, 0.95, 2) * size
    angle, texture_angle = rng.uniform(0, 2 * np.pi, 2)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xs - cx, ys - cy
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / radius
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / radius
    inside = _shape(_SHAPES[rng.integers(len(_SHAPES))], u, v, aspect=rng.uniform(1.4, 2.0))
    tx = dx * np.cos(texture_angle) + dy * np.sin(texture_angle)
    ty = -dx * np.sin(texture_angle) + dy * np.cos(texture_angle)
    weight = _texture(texture, tx, ty, rng.uniform(4.0, 9.0), rng)[..., None]
    first, second = colours
    colour = first * (1 - weight) + second * weight
    image[inside] = colour[inside]
    if label is not None:
        mask[inside] = label


def _distractor(rng: np.random.Generator) -> tuple[str, tuple[np.ndarray, np.ndarray]]:
    """A background object: a class colour without a texture, or a class texture without a colour."""
    if rng.random() < 0.5:
        family = list(_HUES)[rng.integers(len(_HUES))]
        return ("plain", "gradient")[rng.integers(2)], _family_colours(family, rng)
    return _CLASS_LOOK[int(rng.integers(1, 6))][0], _greys(rng)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Low-saturation gradient, blotches, or a faint large texture (so texture alone cannot mean 'object')."""
    first = _hsv(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.9))
    second = _hsv(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.9))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    style = rng.integers(3)
    if style == 0:
        angle = rng.uniform(0, 2 * np.pi)
        weight = np.clip((xs - 0.5) * np.cos(angle) + (ys - 0.5) * np.sin(angle) + 0.5, 0, 1)
    elif style == 1:
        coarse = rng.random((5, 5)).astype(np.float32)
        weight = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC)).clip(0, 1)
    else:
        kind = rng.choice(["stripes", "checker"])
        weight = 0.35 * _texture(kind, xs * size, ys * size, rng.uniform(8.0, 14.0), rng)
    return first * (1 - weight[..., None]) + second * weight[..., None]


def draw_scene(rng: np.random.Generator, size: int = 96, include: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One scene.

    Args:
        rng: the only source of randomness.
        size: image side in pixels.
        include: a class id drawn in the scene for sure (the labelled split cycles through the classes, so that a
            small split shows each class in about as many scenes as the others, as curated label splits do).

    Returns:
        (image uint8 [size, size, 3], mask uint8 [size, size] with ids 0..5).
    """
    image = _background(size, rng)
    mask = np.zeros((size, size), dtype=np.uint8)
    layers: list[int | None] = [int(c) for c in rng.integers(1, 6, rng.integers(1, 5))]
    if include is not None:
        layers[0] = include
    layers += [None] * int(rng.integers(0, 3))
    for index in rng.permutation(len(layers)):  # later layers occlude earlier ones, distractors included
        label = layers[index]
        if label is None:
            texture, colours = _distractor(rng)
        else:
            texture, families = _CLASS_LOOK[label]
            colours = _family_colours(families[rng.integers(2)], rng)
        _paint(image, mask, label, texture, colours, rng)
    for _ in range(rng.integers(0, 3)):  # thin occluding bars
        colour = _greys(rng)[rng.integers(2)]
        horizontal, start, width = rng.integers(2), rng.integers(0, size), rng.integers(1, 4)
        region = (
            (slice(start, start + width), slice(None)) if horizontal else (slice(None), slice(start, start + width))
        )
        image[region] = colour
        mask[region] = 0
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    light = 1.0 + rng.uniform(-0.3, 0.3) * (xs - 0.5) + rng.uniform(-0.3, 0.3) * (ys - 0.5)
    cast = rng.uniform(0.85, 1.15, 3)  # a colour cast per image (white balance)
    image = image * light[..., None] * cast * rng.uniform(0.75, 1.15) + rng.normal(0.0, rng.uniform(3, 12), image.shape)
    pixels = Image.fromarray(image.clip(0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        pixels = pixels.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0)))
    return np.asarray(pixels), mask


def _records(seed: int, split: str, count: int, size: int) -> Iterator[Record]:
    for i in range(count):
        include = 1 + i % (len(CLASS_NAMES) - 1) if split == "labeled" else None
        image, mask = draw_scene(np.random.default_rng([seed, _SPLIT_STREAMS[split], i]), size, include)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        yield Record(f"{split}-{i:05d}", buffer.getvalue(), encode_mask(mask), size, size)


def ensure_builtin_dataset(
    cache_dir: str | os.PathLike,
    seed: int = 0,
    *,
    num_labeled: int = 16,
    num_unlabeled: int = 512,
    num_val: int = 64,
    size: int = 96,
) -> Path:
    """Returns the root of the built-in dataset, drawing and writing it on first use.

    Safe when several processes call it at once: each writes a temp folder and the first rename wins (the others
    find an identical dataset). Unlabelled rows keep their masks for pseudo-label diagnostics.

    Args:
        cache_dir: parent folder of the cached roots (one per seed and size).
        seed: scenes are a pure function of (seed, split, index).
        num_labeled, num_unlabeled, num_val: rows per split.
        size: image side in pixels (the `tiny` preset crops 64).

    Returns:
        The dataset root (holds manifest.json).
    """
    name = f"builtin-{FORMAT_TAG}-seed{seed}-{num_labeled}-{num_unlabeled}-{num_val}-{size}px"
    root = Path(cache_dir).expanduser().resolve() / name
    if (root / MANIFEST).is_file():
        read_manifest(root)
        return root
    counts = {"labeled": num_labeled, "unlabeled": num_unlabeled, "val": num_val}
    write_dataset(
        root,
        name=name,
        class_names=list(CLASS_NAMES),
        splits={split: _records(seed, split, count, size) for split, count in counts.items()},
        source={"builtin": FORMAT_TAG, "seed": seed},
        # Small shards and row groups: the pipeline's unit of work is a row group, and these are tiny images.
        max_rows=128,
        row_group_rows=32,
    )
    return root
