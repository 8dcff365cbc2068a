"""Image augmentation: paired geometric transforms and photometric views (docs/method.md, TMP and The step)."""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, 3, H, W] (or [3, H, W]) -> float32 `(x / 255 - mean) / std`, on their device.

    Batches travel as uint8 (4x less object-store traffic than float) and are normalised on the training device.

    Args:
        mean, std: float [3, 1, 1] per-channel statistics of [0, 1] pixels (the backbone's, see csl_ray.weights).
    """
    return (images.float() / 255.0 - mean) / std


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _chance(prob: float, generator: torch.Generator) -> bool:
    return torch.rand((), generator=generator).item() < prob


def resize_crop_flip(
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    crop_size: int,
    scale_range: tuple[float, float],
    ignore_index: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UniMatch's paired geometry: random rescale, random crop (padding where the image is smaller), hflip p=0.5.

    The image is resized bilinearly with antialiasing (as PIL does), the mask by nearest neighbour. Padding goes
    right and bottom, as in UniMatch: image 0, mask `ignore_index`, valid False.

    Args:
        image: uint8 [3, H, W].
        mask: uint8 [H, W] class ids (`ignore_index` where unknown).
        crop_size: side S of the output.
        scale_range: (low, high) of the uniform scale factor.
        ignore_index: mask value of padding.
        generator: the source of randomness.

    Returns:
        (image uint8 [3, S, S], mask uint8 [S, S], valid bool [S, S]).
    """
    _, height, width = image.shape
    scale = _uniform(scale_range[0], scale_range[1], generator)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    image = TF.resize(image, [new_h, new_w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    mask = TF.resize(mask[None], [new_h, new_w], interpolation=TF.InterpolationMode.NEAREST)[0]
    pad_h, pad_w = max(crop_size - new_h, 0), max(crop_size - new_w, 0)
    valid = torch.ones(new_h, new_w, dtype=torch.bool)
    if pad_h or pad_w:
        image = torch.nn.functional.pad(image, (0, pad_w, 0, pad_h), value=0)
        mask = torch.nn.functional.pad(mask, (0, pad_w, 0, pad_h), value=ignore_index)
        valid = torch.nn.functional.pad(valid, (0, pad_w, 0, pad_h), value=False)
    top = int(torch.randint(image.shape[1] - crop_size + 1, (), generator=generator))
    left = int(torch.randint(image.shape[2] - crop_size + 1, (), generator=generator))
    window = (slice(top, top + crop_size), slice(left, left + crop_size))
    image, mask, valid = image[:, window[0], window[1]], mask[window], valid[window]
    if _chance(0.5, generator):
        image, mask, valid = image.flip(-1), mask.flip(-1), valid.flip(-1)
    return image.contiguous(), mask.contiguous(), valid.contiguous()


def color_jitter(
    image: torch.Tensor,
    *,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """torchvision's ColorJitter with its parameters drawn from `generator` instead of the global RNG.

    Factors are uniform in [max(0, 1 - x), 1 + x] (hue in [-hue, hue]) and the four adjustments run in a random
    order, exactly as `torchvision.transforms.v2.ColorJitter`.

    Args:
        image: uint8 [3, H, W].

    Returns:
        uint8 [3, H, W].
    """
    order = torch.randperm(4, generator=generator).tolist()
    factors = [_uniform(max(0.0, 1 - x), 1 + x, generator) for x in (brightness, contrast, saturation)]
    shift = _uniform(-hue, hue, generator)
    ops = (
        lambda x: TF.adjust_brightness(x, factors[0]),
        lambda x: TF.adjust_contrast(x, factors[1]),
        lambda x: TF.adjust_saturation(x, factors[2]),
        lambda x: TF.adjust_hue(x, shift),
    )
    for index in order:
        image = ops[index](image)
    return image


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with a kernel of 2*ceil(3*sigma)+1 taps (PIL's GaussianBlur(radius=sigma) in UniMatch)."""
    size = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(image, [size, size], [sigma, sigma])


def _photometric(
    image: torch.Tensor, generator: torch.Generator, jitter: float, hue: float, gray_p: float
) -> torch.Tensor:
    """ColorJitter(jitter, jitter, jitter, hue) p=0.8, grayscale p=gray_p (no draw when 0), blur sigma in [0.1, 2]
    p=0.5; uint8 [3, H, W] in and out."""
    if _chance(0.8, generator):
        image = color_jitter(image, brightness=jitter, contrast=jitter, saturation=jitter, hue=hue, generator=generator)
    if gray_p > 0 and _chance(gray_p, generator):
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if _chance(0.5, generator):
        image = gaussian_blur(image, _uniform(0.1, 2.0, generator))
    return image


def strong_view(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """UniMatch's strong view of the weak crop uint8 [3, H, W]: ColorJitter(0.5, 0.5, 0.5, 0.25) p=0.8, grayscale
    p=0.2, blur p=0.5."""
    return _photometric(image, generator, jitter=0.5, hue=0.25, gray_p=0.2)


def mild_view(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The TMP view's mild aug (docs/method.md, TMP) of the weak crop uint8 [3, H, W]:
    ColorJitter(0.2, 0.2, 0.2, 0.2) p=0.8, blur p=0.5."""
    return _photometric(image, generator, jitter=0.2, hue=0.2, gray_p=0.0)
