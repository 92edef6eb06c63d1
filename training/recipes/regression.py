"""Fine-tune an image regression model: the image recipe with an MSE loss and a bounded head.

fast.ai lesson 3's head-pose recipe: the head ends in ``sigmoid_range(y_range)`` so outputs
start mid-range and can never leave it, the loss is MSE, and the report sets ``valid_mse`` next
to ``baseline_mse`` — the error of always answering the training mean — so a user sees at a
glance whether the model learnt anything. Point targets (``training.data.points``) are predicted as
[-1, 1] coordinates in the model's view, ``y_range`` (-1, 1), and also reported as distances in
pixels, of the model's input and of the original image.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn

from export.pixels import Preprocessing, from_model_frame, to_model_frame
from training.data.image_loaders import ImageItemsDataset
from training.data.points import (
    POINT_TRAIN_SCALE,
    PointItemsDataset,
    outside_view,
    plot_points,
)
from training.data.regression import RegressionData
from training.data.transforms import TRAIN_SCALE
from training.evaluation import metrics
from training.evaluation.plots import save_figure
from training.models.ranges import parse_y_range, y_range_text
from training.recipes.image import ImageTask, ImageTrainResult, train_image_task, valid_sample
from training.recipes.options import RegressionOptions
from training.recipes.training_output import with_overrides

POINT_Y_RANGE = (-1.0, 1.0)
#: "auto" y_range for plain targets: the training range widened by this fraction of its span
#: on each side, so the extremes are reachable without saturating the sigmoid.
Y_RANGE_MARGIN = 0.1
PLOTTED_IMAGES = 8


def resolve_y_range(data: RegressionData,
                    y_range: tuple[float, float] | str | None) -> tuple[float, float] | None:
    """``"auto"``: (-1, 1) for points, else the widened training range; None: no squashing.

    y_range: ``"auto"``, ``"none"``, ``"LOW,HIGH"``, a (low, high) pair or None.
    """
    y_range = parse_y_range(y_range)
    if y_range != "auto":
        return y_range
    if data.points:
        return POINT_Y_RANGE
    ranges = data.target_ranges().values()
    low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
    margin = Y_RANGE_MARGIN * (high - low) if high > low else 1.0
    return (low - margin, high + margin)


def train_regression_model(
    data: RegressionData,
    out_dir: str | Path,
    options: RegressionOptions | None = None,
    *,
    progress=None,
    **overrides,
) -> ImageTrainResult:
    """Fine-tune on float or point targets; report valid_mse against baseline_mse.

    ``options.y_range``: auto | none | LOW,HIGH (a (low, high) pair is taken too);
    ``options.flip``: horizontal flips in training (off when left and right points have names).
    overrides: option fields as keywords, applied to ``options``.
    """
    if "y_range" in overrides:
        overrides["y_range"] = y_range_text(overrides["y_range"])
    options = with_overrides(RegressionOptions, options, overrides)
    metric_fns = {"mae": metrics.mae}
    if data.points:
        # Half the input side is one unit of the [-1, 1] frame.
        half = options.size / 2
        metric_fns["pixel_distance"] = lambda p, t: metrics.mean_point_distance(p, t, half)

    def evaluate(preds: torch.Tensor, targets: torch.Tensor, prep: Preprocessing,
                 plots_dir: Path | None) -> tuple[dict, dict]:
        return _evaluate(preds, targets, data, prep, plots_dir)

    task = ImageTask(
        "regression", tuple(data.classes), nn.MSELoss(), metric_fns, evaluate,
        y_range=resolve_y_range(data, options.y_range),
        dataset_cls=PointItemsDataset if data.points else ImageItemsDataset,
        train_scale=POINT_TRAIN_SCALE if data.points else TRAIN_SCALE, flip=options.flip,
        points=bool(data.points))
    return train_image_task(task, data, out_dir, options, progress=progress)


def model_frame_targets(data: RegressionData, split: str, prep: Preprocessing) -> torch.Tensor:
    """``(N, K)`` targets of ``split`` as the model sees them under the validation transform."""
    items = getattr(data, split)
    if not items:
        return torch.empty((0, len(data.classes)))
    if data.points:
        rows = [to_model_frame(item.label, item.size, prep) for item in items]
    else:
        rows = [list(item.label) for item in items]
    return torch.tensor(rows, dtype=torch.float32)


def _evaluate(preds: torch.Tensor, targets: torch.Tensor, data: RegressionData,
              prep: Preprocessing, plots_dir: Path | None) -> tuple[dict, dict]:
    """valid_mse, MAE, baseline_mse and (points) pixel distances; what the outputs mean."""
    outputs = {"targets": _targets_meta(data)}
    if not data.valid:
        return {"n_valid": 0}, outputs
    train_targets = model_frame_targets(data, "train", prep)
    per_target = ((preds - targets) ** 2).mean(0).sqrt().tolist()
    result = {
        "valid_mse": metrics.mse(preds, targets),
        "mae": metrics.mae(preds, targets),
        "baseline_mse": metrics.baseline_mse(train_targets, targets),
        "rmse_per_target": dict(zip(data.classes, per_target, strict=True)),
        "n_valid": len(data.valid),
    }
    if data.points:
        result |= _pixel_metrics(data, preds, targets, prep)
        if plots_dir is None:
            return result, outputs
        n = min(PLOTTED_IMAGES, len(data.valid))
        plot_points(valid_sample(data, prep, n), targets[:n], preds[:n],
                    plots_dir / "points.png", titles=[i.path.name for i in data.valid[:n]])
    elif plots_dir is not None:
        plot_predicted_vs_true(preds, targets, data.classes, plots_dir / "predicted_vs_true.png")
    return result, outputs


def _pixel_metrics(data: RegressionData, preds: torch.Tensor, targets: torch.Tensor,
                   prep: Preprocessing) -> dict:
    """Distances in the model's input pixels and, mapped back, in each original image's."""
    original = torch.tensor([from_model_frame(p.tolist(), item.size, prep)
                             for p, item in zip(preds, data.valid, strict=True)])
    truth = torch.tensor([list(item.label) for item in data.valid], dtype=torch.float32)
    return {
        "mean_pixel_distance": metrics.mean_point_distance(preds, targets,
                                                           prep.input_size / 2),
        "mean_pixel_distance_original": metrics.mean_point_distance(original, truth),
        "baseline_pixel_distance": metrics.mean_point_distance(
            model_frame_targets(data, "train", prep).mean(0, keepdim=True).expand_as(targets),
            targets, prep.input_size / 2),
        "valid_points_outside_view": outside_view(targets),
    }


def _targets_meta(data: RegressionData) -> dict:
    """What each output means, for the manifest's ``targets``."""
    if not data.points:
        return {"kind": "values", "names": list(data.classes)}
    return {
        "kind": "points",
        "names": list(data.classes),
        "points": [list(p) for p in data.points],
        # Outputs are (x, y) pairs in the centre crop the graph takes, scaled to [-1, 1]:
        # pixel = (v + 1) / 2 * input_size, then undo the crop offset and the resize.
        "frame": "input_crop_normalised",
        "range": list(POINT_Y_RANGE),
    }


def plot_predicted_vs_true(preds: torch.Tensor, targets: torch.Tensor, names, path) -> Path:
    """One scatter per target: predicted against true, with the y = x line."""
    fig = Figure(figsize=(4 * len(names), 4))
    for j, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), j + 1)
        ax.scatter(targets[:, j], preds[:, j], s=10)
        low = float(min(targets[:, j].min(), preds[:, j].min()))
        high = float(max(targets[:, j].max(), preds[:, j].max()))
        ax.plot([low, high], [low, high], "--", color="grey")
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"predicted {name}")
    return save_figure(fig, path)
