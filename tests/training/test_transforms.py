"""Train/valid transforms built from a Preprocessing record, and the decode step before them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from export.errors import ManifestError
from export.pixels import Preprocessing
from training.data.transforms import (
    decode_min_side,
    load_rgb,
    train_transform,
    valid_transform,
)

PRE = Preprocessing(input_size=40, resize_size=50, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))


def halves(width: int = 200, height: int = 100) -> Image.Image:
    """Left half black, right half white."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, width // 2:] = 255
    return Image.fromarray(pixels)


def test_valid_transform_resizes_shorter_side_then_centre_crops():
    pixels = np.zeros((100, 200, 3), dtype=np.uint8)
    pixels[:, 90:110] = (255, 128, 0)  # a band at the centre, outside the crop's left part
    x = valid_transform(PRE)(Image.fromarray(pixels))
    assert x.shape == (3, 40, 40) and x.dtype == torch.float32
    mean, std = torch.tensor(PRE.mean), torch.tensor(PRE.std)
    centre = torch.tensor([1.0, 128 / 255, 0.0])
    assert torch.allclose(x[:, 20, 20], (centre - mean) / std, atol=0.02)
    assert torch.allclose(x[:, 20, 0], (0 - mean) / std, atol=0.02)


def test_valid_transform_moves_keypoints_with_the_image():
    # 200x100 -> shorter side 50 (scale 0.5) -> 100x50 -> centre crop 40 at x=30, y=5.
    points = tv_tensors.KeyPoints([[100.0, 50.0], [70.0, 20.0]], canvas_size=(100, 200))
    x, moved = valid_transform(PRE)(halves(), points)
    assert x.shape == (3, 40, 40)
    assert moved.dtype == torch.float32
    assert torch.allclose(moved, torch.tensor([[20.0, 20.0], [5.0, 5.0]]))


def test_train_transform_is_random_but_seedable():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 120, 3), np.uint8))
    augment = train_transform(PRE)
    torch.manual_seed(3)
    a = augment(image)
    torch.manual_seed(3)
    b = augment(image)
    c = augment(image)
    assert a.shape == (3, 40, 40) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_train_flip_is_optional():
    def left_is_dark(transform) -> list[bool]:
        torch.manual_seed(0)
        return [bool(transform(halves(100, 100))[0, 20, 2] < 0) for _ in range(40)]

    whole_image = (1.0, 1.0)  # a full-area crop, so only the flip can swap the halves
    flipped = left_is_dark(train_transform(PRE, scale=whole_image))
    assert any(flipped) and not all(flipped)
    assert all(left_is_dark(train_transform(PRE, scale=whole_image, flip=False)))


def test_interpolation_comes_from_the_preprocessing():
    assert Preprocessing(interpolation="BICUBIC").mode.value == "bicubic"
    bicubic = Preprocessing(input_size=40, resize_size=50, interpolation="bicubic")
    assert valid_transform(bicubic)(halves()).shape == (3, 40, 40)
    with pytest.raises(ManifestError, match="interpolation.*'lanczoz'"):
        valid_transform(Preprocessing(interpolation="lanczoz"))


@pytest.mark.parametrize(("mode", "keep"), [("dct-scaled-2x", 2), ("dct-scaled", 1)])
def test_decode_min_side_lets_the_smallest_training_crop_keep_full_resolution(mode, keep):
    pre = Preprocessing(input_size=224, resize_size=256, jpeg_decode=mode)
    side = decode_min_side(pre, train=True)
    assert side * 0.35 ** 0.5 >= 224 * keep
    assert decode_min_side(pre, train=False) == 256 * keep == pre.decode_side()


def test_training_decodes_every_pixel_when_the_manifest_says_full():
    pre = Preprocessing(input_size=224, resize_size=256, jpeg_decode="full")
    assert decode_min_side(pre, train=True) is None and decode_min_side(pre, train=False) is None


def test_reduced_jpeg_decode_keeps_at_least_min_side(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1200, 1600, 3), np.uint8)).save(path)
    full = load_rgb(path)
    reduced = load_rgb(path, min_side=256)
    assert full.size == (1600, 1200)
    assert 256 <= min(reduced.size) < 1200 and reduced.mode == "RGB"
