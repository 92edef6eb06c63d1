"""Fine-tune a multi-label image model: the image recipe with a sigmoid per label.

fast.ai lesson 3's PASCAL recipe: binary cross-entropy on the logits (``BCEWithLogitsLoss``,
one independent yes/no per label), ``accuracy_multi`` and mean average precision while
training, and, once the best epoch is restored, a decision threshold swept on the validation
predictions (``training.evaluation.thresholds``) that the manifest carries to export's parity
gate and to scoring.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from export.pixels import Preprocessing
from training.data.multilabel import MultiLabelData
from training.evaluation import metrics
from training.evaluation.thresholds import choose_threshold, plot_threshold_sweep
from training.recipes.image import ImageTask, ImageTrainResult, train_image_task
from training.recipes.options import MultiLabelOptions
from training.recipes.training_output import with_overrides


def train_multilabel_model(
    data: MultiLabelData,
    out_dir: str | Path,
    options: MultiLabelOptions | None = None,
    *,
    progress=None,
    **overrides,
) -> ImageTrainResult:
    """Fine-tune on multi-label images, then choose the decision threshold on validation.

    ``options.threshold_metric`` and ``options.per_label_thresholds`` choose how; overrides:
    option fields as keywords, applied to ``options``.
    """
    options = with_overrides(MultiLabelOptions, options, overrides)

    def evaluate(preds: torch.Tensor, targets: torch.Tensor, prep: Preprocessing,
                 plots_dir: Path | None) -> tuple[dict, dict]:
        return _evaluate(preds, targets, data, plots_dir, options.threshold_metric,
                         options.per_label_thresholds)

    task = ImageTask(
        "multi_label", tuple(data.classes), nn.BCEWithLogitsLoss(),
        {"accuracy_multi": metrics.accuracy_multi, "mAP": metrics.mean_average_precision},
        evaluate)
    return train_image_task(task, data, out_dir, options, progress=progress)


def _evaluate(preds: torch.Tensor, targets: torch.Tensor, data: MultiLabelData,
              plots_dir: Path | None, threshold_metric: str,
              per_label: bool) -> tuple[dict, dict]:
    """Validation metrics at 0.5 and at the chosen threshold(s); the threshold for the manifest."""
    classes = list(data.classes)
    base = {"n_valid": len(data.valid), "valid_only_labels": dict(data.valid_only)}
    if len(data.valid) == 0:
        return base | {"threshold": 0.5}, {"thresholds": 0.5}
    targets = targets.float()
    probs = torch.sigmoid(preds.float())
    choice = choose_threshold(probs, targets, classes, metric=threshold_metric,
                              per_label=per_label)
    if plots_dir is not None:
        plot_threshold_sweep(choice, plots_dir / "threshold_sweep.png")
    thresholds = choice.manifest_value()
    f1 = metrics.f1_per_label(probs, targets, thresholds, sigmoid=False)
    ap = metrics.average_precision(probs, targets)
    return base | {
        "valid_loss": float(nn.functional.binary_cross_entropy_with_logits(preds, targets)),
        "accuracy_multi": metrics.accuracy_multi(probs, targets, thresholds, sigmoid=False),
        "accuracy_multi_at_0.5": metrics.accuracy_multi(probs, targets, 0.5, sigmoid=False),
        "threshold": choice.best,
        "threshold_metric": threshold_metric,
        "f1_macro": metrics.f1_macro(probs, targets, thresholds, sigmoid=False),
        "f1_micro": metrics.f1_micro(probs, targets, thresholds, sigmoid=False),
        "mean_average_precision": metrics.mean_average_precision(probs, targets),
        "per_label_f1": dict(zip(classes, f1, strict=True)),
        "per_label_average_precision": dict(zip(classes, ap, strict=True)),
        "per_label_threshold": choice.per_label,
        "threshold_sweep": choice.to_dict(),
    }, {"thresholds": thresholds}
