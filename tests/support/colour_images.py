"""A tiny image folder two classes apart by colour: enough for a training run to learn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def colour_folder(root: Path) -> Path:
    """Six red and six blue 40x40 images, a folder per class."""
    rng = np.random.default_rng(0)
    for name, channel in (("red", 0), ("blue", 2)):
        (root / name).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 60, (40, 40, 3), dtype=np.uint8)
            pixels[..., channel] = 200
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root
