"""From an image file to the normalised tensor a model sees: decode, then train/valid transforms.

Training follows the torchvision reference recipe and fast.ai's default augmentation: a random
resized crop (Szegedy et al., "Going deeper with convolutions", 2015) of 35-100 % of the image area
and a horizontal flip. Validation resizes the shorter side and takes the centre crop, the
evaluation protocol of the ImageNet reference scripts. Both use torchvision transforms v2, so the
same pipelines move `tv_tensors.KeyPoints` / `BoundingBoxes` along with the image when a task
needs point targets. Decoding comes first and is shared by both: an upright (EXIF-rotated) RGB
image whatever the file's mode.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2

from export.pixels import Preprocessing, open_rgb
from training.errors import TrainingError

#: Fraction of the image area a training crop covers; fast.ai uses 0.35 as its minimum.
TRAIN_SCALE = (0.35, 1.0)


def load_rgb(path: Path, *, min_side: int | None = None) -> Image.Image:
    """Decode an image file to an upright RGB PIL image (first frame of an animation).

    min_side: shortest side the caller needs; JPEGs are decoded at the smallest DCT scale that
    keeps it, which is several times faster for camera-sized photos.
    """
    try:
        return open_rgb(path, min_side=min_side)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombWarning) as err:
        raise TrainingError(f"{path}: cannot decode image ({err})") from None


def _to_normalized_tensor(pre: Preprocessing) -> list[v2.Transform]:
    # ToDtype with a bare dtype converts only images, so point/box targets keep their coordinates.
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(pre.mean), std=list(pre.std)),
    ]


def train_transform(
    pre: Preprocessing, *, scale: tuple[float, float] = TRAIN_SCALE, flip: bool = True
) -> v2.Compose:
    """Random resized crop to `input_size`, optional horizontal flip, float, normalise."""
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(
            pre.input_size, scale=scale, interpolation=pre.mode,
            antialias=True,
        )
    ]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _to_normalized_tensor(pre))


def valid_transform(pre: Preprocessing) -> v2.Compose:
    """Resize the shorter side to `resize_size`, centre-crop `input_size`, float, normalise."""
    return v2.Compose([
        v2.Resize(pre.resize_size, interpolation=pre.mode,
                  antialias=True),
        v2.CenterCrop(pre.input_size),
        *_to_normalized_tensor(pre),
    ])


def decode_min_side(
    pre: Preprocessing, *, train: bool, scale: tuple[float, float] = TRAIN_SCALE
) -> int | None:
    """Shortest side a JPEG is decoded to (at reduced DCT scale) for the transform, by the rule
    of ``pre.jpeg_decode`` that scoring follows too; None: every pixel.

    The smallest training crop covers `scale[0]` of the area, so its side is about
    sqrt(scale[0]) of the image side; the image must be big enough for that crop to still hold
    `input_size` pixels, or the crop would be upsampled from a needlessly shrunken decode.
    """
    if not train:
        return pre.decode_side()
    return pre.decode_side(max(pre.resize_size, math.ceil(pre.input_size / math.sqrt(scale[0]))))
