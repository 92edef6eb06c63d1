"""Point targets (fast.ai's head-centre lesson): pixels in the image ↔ [-1, 1] in the model's view.

A point is given in pixels of the upright image (EXIF orientation applied, as a viewer shows
it). The model sees a crop: at validation and scoring, the shorter side resized to
``resize_size`` and the centre ``input_size`` square cut out; in training a random resized crop
and flip, applied to the point with torchvision v2 ``tv_tensors.KeyPoints`` so the target moves
with the pixels. The target is the point in that crop, scaled so the crop spans [-1, 1]
(``x / input_size * 2 - 1``), the range ``sigmoid_range(-1, 1)`` produces. A point outside the
crop maps outside [-1, 1]; the model cannot see it and can at best predict the nearest edge.

``to_model_frame`` / ``from_model_frame`` are the analytic form of the validation geometry, used
for the baseline and to report errors in original pixels; a test pins them to torchvision's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torchvision import tv_tensors

from training.data.image_loaders import ImageItemsDataset
from training.data.images import ImageItem
from training.data.transforms import load_rgb
from training.evaluation.plots import save_figure

#: Training crops for points keep more of the image than classification's 35 %: a crop that
#: cuts the point away teaches nothing but "predict the edge".
POINT_TRAIN_SCALE = (0.6, 1.0)


@dataclass(frozen=True)
class PointItem(ImageItem):
    """An image whose label is ``(x0, y0, x1, y1, ...)`` in pixels of the upright image of
    ``size`` (width, height)."""

    size: tuple[int, int]


def outside_view(coords: torch.Tensor) -> int:
    """How many points of ``(N, 2P)`` model-frame targets lie outside the crop."""
    pairs = coords.reshape(len(coords), -1, 2)
    return int((pairs.abs() > 1).any(-1).sum())


class PointItemsDataset(ImageItemsDataset):
    """Decodes ``PointItem`` images and moves their points through ``transform`` with them;
    yields (image, [-1, 1] coordinates in the transformed image)."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.items[i]
        image = load_rgb(item.path, min_side=self.min_side)
        w, h = image.size  # smaller than item.size when a JPEG was decoded at reduced scale
        pixels = torch.tensor(item.label, dtype=torch.float32).reshape(-1, 2)
        pixels = pixels * torch.tensor([w / item.size[0], h / item.size[1]])
        x, moved = self.transform(image, tv_tensors.KeyPoints(pixels, canvas_size=(h, w)))
        height, width = x.shape[-2:]
        scale = torch.tensor([width, height], dtype=torch.float32)
        return x, (moved.as_subclass(torch.Tensor) / scale * 2 - 1).reshape(-1)


def plot_points(images: torch.Tensor, true: torch.Tensor, pred: torch.Tensor,
                path: str | Path, *, titles: Sequence[str] = ()) -> Path:
    """Validation crops (uint8 NHWC) with true (green circle) and predicted (red cross) points
    drawn at their [-1, 1] coordinates."""
    n = len(images)
    cols = min(4, n) or 1
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(3 * cols, 3 * rows))
    for k in range(n):
        ax = fig.add_subplot(rows, cols, k + 1)
        side = images.shape[2]
        ax.imshow(np.asarray(images[k]))
        t = (true[k].reshape(-1, 2) + 1) / 2 * side
        p = (pred[k].reshape(-1, 2) + 1) / 2 * side
        ax.plot(t[:, 0], t[:, 1], "o", mfc="none", mec="lime", markersize=10, mew=2)
        ax.plot(p[:, 0], p[:, 1], "x", color="red", markersize=10, mew=2)
        ax.set_xlim(-0.5, side - 0.5)
        ax.set_ylim(side - 0.5, -0.5)
        ax.axis("off")
        if k < len(titles):
            ax.set_title(titles[k], fontsize="small")
    return save_figure(fig, path, dpi=80)
