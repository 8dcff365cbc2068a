import pytest
import torch
import torch.nn.functional as F

from csl_ray import augment
from csl_ray.augment import color_jitter, mild_view, normalize, resize_crop_flip, strong_view


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def paired(height: int = 12, width: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose first channel encodes its mask, so alignment survives any crop/flip at scale 1."""
    mask = torch.randint(0, 6, (height, width), generator=gen(0), dtype=torch.uint8)
    image = torch.stack(
        [mask * 10, torch.full_like(mask, 200), torch.arange(width, dtype=torch.uint8).expand(height, width)]
    )
    return image, mask


def test_normalize_uses_the_given_stats_per_channel():
    images = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    mean, std = torch.tensor([0.5, 0.5, 0.1]).view(3, 1, 1), torch.tensor([0.5, 0.25, 0.2]).view(3, 1, 1)
    out = normalize(images, mean, std)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 4)
    assert torch.allclose(out[1, :, 3, 2], torch.tensor([-1.0, 2.0, 0.5]))


def test_resize_crop_flip_pads_with_zero_ignore_and_invalid():
    image, mask = paired(6, 5)
    out, out_mask, valid = resize_crop_flip(
        image, mask, crop_size=8, scale_range=(1.0, 1.0), ignore_index=255, generator=gen(1)
    )
    assert out.shape == (3, 8, 8) and out_mask.shape == (8, 8) and valid.shape == (8, 8)
    assert out.dtype == torch.uint8 and out_mask.dtype == torch.uint8 and valid.dtype == torch.bool
    assert int(valid.sum()) == 6 * 5
    assert (out[:, ~valid] == 0).all() and (out_mask[~valid] == 255).all()
    assert (out_mask[valid] < 6).all()


@pytest.mark.parametrize("seed", range(6))
def test_resize_crop_flip_keeps_image_and_mask_aligned(seed):
    image, mask = paired()
    out, out_mask, valid = resize_crop_flip(
        image, mask, crop_size=7, scale_range=(1.0, 1.0), ignore_index=255, generator=gen(seed)
    )
    assert torch.equal(out[0][valid], out_mask[valid] * 10)


def test_resize_crop_flip_rescales_within_range_and_is_reproducible():
    image, mask = paired(20, 20)
    first = resize_crop_flip(image, mask, crop_size=16, scale_range=(0.5, 2.0), ignore_index=255, generator=gen(3))
    again = resize_crop_flip(image, mask, crop_size=16, scale_range=(0.5, 2.0), ignore_index=255, generator=gen(3))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # Downscaled to 10 px at 0.5: a 16-px crop is at least 10x10 valid and at most all valid.
    for seed in range(10):
        _, _, valid = resize_crop_flip(
            image, mask, crop_size=16, scale_range=(0.5, 2.0), ignore_index=255, generator=gen(seed)
        )
        assert 100 <= int(valid.sum()) <= 256


BLOCK_IDS = (0, 3, 7, 12, 20, 31)  # gaps between ids: a bilinear mask resize would make values in between


def block_labelled(height: int = 24, width: int = 40, block: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A non-square image of block x block tiles; neighbouring tiles differ, no flip or transpose maps the layout to
    itself, and each tile's colour encodes its id."""
    rows, cols = torch.meshgrid(torch.arange(height) // block, torch.arange(width) // block, indexing="ij")
    mask = torch.tensor(BLOCK_IDS, dtype=torch.uint8)[(rows * 4 + cols) % len(BLOCK_IDS)]
    return block_colours(mask), mask


def block_colours(mask: torch.Tensor) -> torch.Tensor:
    return torch.stack([mask * 8, 255 - mask * 8, torch.full_like(mask, 100)])


def interior(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Pixels whose (2 radius + 1)^2 neighbourhood, inside the crop, holds one mask value."""
    padded = F.pad(mask[None, None].float(), (radius,) * 4, value=-1.0)  # the crop border is never interior
    size = 2 * radius + 1
    return (F.max_pool2d(padded, size, stride=1) == -F.max_pool2d(-padded, size, stride=1))[0, 0]


@pytest.mark.parametrize("seed", range(8))
def test_rescaled_crop_keeps_image_and_mask_aligned(seed, monkeypatch):
    scale_range, crop = (0.5, 2.0), 32
    drawn = []

    def recording_uniform(low, high, generator):
        drawn.append(real_uniform(low, high, generator))
        return drawn[-1]

    real_uniform = augment._uniform
    monkeypatch.setattr(augment, "_uniform", recording_uniform)  # to learn the scale drawn for this seed
    image, mask = block_labelled()
    out, out_mask, valid = resize_crop_flip(
        image, mask, crop_size=crop, scale_range=scale_range, ignore_index=255, generator=gen(seed)
    )
    (scale,) = drawn
    assert set(out_mask.unique().tolist()) <= {*BLOCK_IDS, 255}
    rows, cols = min(round(24 * scale), crop), min(round(40 * scale), crop)
    assert (int(valid.any(1).sum()), int(valid.any(0).sum()), int(valid.sum())) == (rows, cols, rows * cols)
    assert (out_mask[~valid] == 255).all() and (out[:, ~valid] == 0).all()
    inside = interior(out_mask, radius=1) & valid
    assert inside.sum() >= 0.2 * valid.sum()
    difference = (out.int() - block_colours(out_mask).int()).abs()
    assert difference[:, inside].max() <= 2


def test_color_jitter_with_zero_ranges_is_identity():
    image = torch.randint(0, 256, (3, 9, 9), dtype=torch.uint8, generator=gen(0))
    out = color_jitter(image, brightness=0, contrast=0, saturation=0, hue=0, generator=gen(1))
    assert torch.equal(out, image)


@pytest.mark.parametrize("view", [strong_view, mild_view])
def test_photometric_views_keep_shape_dtype_and_follow_the_generator(view):
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=gen(0))
    outs = [view(image, gen(seed)) for seed in (5, 5, 6, 7, 8)]
    assert all(o.shape == image.shape and o.dtype == torch.uint8 for o in outs)
    assert torch.equal(outs[0], outs[1])
    assert any(not torch.equal(outs[0], o) for o in outs[2:])
    assert any(not torch.equal(image, o) for o in outs)
