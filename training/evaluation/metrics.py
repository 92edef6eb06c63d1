"""Metrics on (predictions, targets) tensors, as fastai reports them, for the three image tasks.

Single-label: predictions are logits or probabilities ``(N, C)`` — or already-decided class
indices ``(N,)``; targets are class indices ``(N,)``. Multi-label: logits (or probabilities with
``sigmoid=False``) ``(N, C)`` against multi-hot ``(N, C)``; average precision is the area under
the precision-recall step curve, as scikit-learn's ``average_precision_score`` computes it (the
PASCAL VOC mAP of Everingham et al., 2010, without interpolation). Regression: ``(N, K)`` outputs
against ``(N, K)`` targets; point targets are ``(x, y)`` pairs, so distances pair up columns.

Each metric is a plain function, so the Learner takes any of them in its ``metrics={name: fn}``
dict; ``METRICS`` names the ones the CLI can ask for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from training.errors import TrainingError


def predicted_classes(preds: torch.Tensor) -> torch.Tensor:
    """Class index per sample: argmax over the last dim of ``(N, C)``, or ``preds`` if ``(N,)``."""
    if preds.dim() == 1:
        return preds.long()
    return preds.argmax(dim=-1)


def _check(preds: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    decided = predicted_classes(preds)
    targets = targets.reshape(-1).long()
    if decided.shape[0] != targets.shape[0]:
        raise TrainingError(
            f"metrics got {decided.shape[0]} predictions for {targets.shape[0]} targets"
        )
    return decided.cpu(), targets.cpu()


def accuracy(preds: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of samples whose predicted class is the target."""
    decided, targets = _check(preds, targets)
    if targets.numel() == 0:
        return float("nan")
    return float((decided == targets).float().mean())


def error_rate(preds: torch.Tensor, targets: torch.Tensor) -> float:
    """1 - accuracy."""
    return 1.0 - accuracy(preds, targets)


def confusion_matrix(
    preds: torch.Tensor, targets: torch.Tensor, num_classes: int | None = None
) -> torch.Tensor:
    """``(C, C)`` int64 counts: row = actual class, column = predicted class."""
    decided, targets = _check(preds, targets)
    if num_classes is None:
        num_classes = preds.shape[-1] if preds.dim() > 1 else 0
        num_classes = max(num_classes, int(torch.cat([decided, targets]).max()) + 1)
    flat = targets * num_classes + decided
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_accuracy(
    preds: torch.Tensor, targets: torch.Tensor, num_classes: int | None = None
) -> list[float]:
    """Accuracy within each actual class (its recall); NaN for a class with no samples."""
    cm = confusion_matrix(preds, targets, num_classes).double()
    support = cm.sum(dim=1)
    correct = cm.diagonal()
    return [float(c / s) if s > 0 else float("nan") for c, s in zip(correct, support, strict=True)]


def most_confused(
    cm: torch.Tensor, classes: Sequence[str], min_count: int = 1
) -> list[tuple[str, str, int]]:
    """Off-diagonal ``(actual, predicted, count)`` with ``count >= min_count``, most first."""
    if cm.shape != (len(classes), len(classes)):
        raise TrainingError(
            f"confusion matrix is {tuple(cm.shape)} but {len(classes)} class names were given"
        )
    pairs = [
        (classes[i], classes[j], int(cm[i, j]))
        for i in range(len(classes))
        for j in range(len(classes))
        if i != j and int(cm[i, j]) >= min_count
    ]
    return sorted(pairs, key=lambda pair: -pair[2])


# --- multi-label ---------------------------------------------------------------------------

def _multi(preds: torch.Tensor, targets: torch.Tensor,
           sigmoid: bool) -> tuple[torch.Tensor, torch.Tensor]:
    preds, targets = preds.detach().float().cpu(), targets.detach().float().cpu()
    if preds.shape != targets.shape or preds.dim() != 2:
        raise TrainingError(f"multi-label metrics need (N, C) predictions and targets, got "
                            f"{tuple(preds.shape)} and {tuple(targets.shape)}")
    return (torch.sigmoid(preds) if sigmoid else preds), targets


def _thresholds(thresh: float | Sequence[float] | torch.Tensor, n_labels: int) -> torch.Tensor:
    t = torch.as_tensor(thresh, dtype=torch.float32).reshape(-1)
    if t.numel() not in (1, n_labels):
        raise TrainingError(f"{t.numel()} thresholds for {n_labels} labels")
    return t.expand(n_labels)


def accuracy_multi(preds: torch.Tensor, targets: torch.Tensor,
                   thresh: float | Sequence[float] = 0.5, sigmoid: bool = True) -> float:
    """Fraction of (image, label) decisions right: label predicted iff score > ``thresh``."""
    probs, targets = _multi(preds, targets, sigmoid)
    if targets.numel() == 0:
        return float("nan")
    decided = probs > _thresholds(thresh, probs.shape[1])
    return float((decided == targets.bool()).float().mean())


def f1_per_label(preds: torch.Tensor, targets: torch.Tensor,
                 thresh: float | Sequence[float] = 0.5, sigmoid: bool = True) -> list[float]:
    """F1 of each label at ``thresh``; NaN for a label never true and never predicted."""
    probs, targets = _multi(preds, targets, sigmoid)
    decided = (probs > _thresholds(thresh, probs.shape[1])).float()
    tp = (decided * targets).sum(0)
    wrong = (decided != targets).float().sum(0)  # false positives + false negatives
    denom = 2 * tp + wrong
    return [float(2 * t / d) if d > 0 else float("nan") for t, d in zip(tp, denom, strict=True)]


def f1_macro(preds: torch.Tensor, targets: torch.Tensor,
             thresh: float | Sequence[float] = 0.5, sigmoid: bool = True) -> float:
    """Mean of the per-label F1 scores that are defined."""
    values = [v for v in f1_per_label(preds, targets, thresh, sigmoid) if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def f1_micro(preds: torch.Tensor, targets: torch.Tensor,
             thresh: float | Sequence[float] = 0.5, sigmoid: bool = True) -> float:
    """F1 over all (image, label) decisions pooled."""
    probs, targets = _multi(preds, targets, sigmoid)
    decided = (probs > _thresholds(thresh, probs.shape[1])).float()
    tp = float((decided * targets).sum())
    denom = 2 * tp + float((decided != targets).float().sum())
    return 2 * tp / denom if denom > 0 else float("nan")


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Per label: sum over distinct score cut-offs of (recall gain) × precision; NaN without
    positives. Monotone in the scores, so logits and probabilities give the same value."""
    scores, targets = _multi(scores, targets, sigmoid=False)
    result = []
    for s, t in zip(scores.T, targets.T, strict=True):
        positives = float(t.sum())
        if positives == 0:
            result.append(float("nan"))
            continue
        order = torch.argsort(s, descending=True, stable=True)
        s, t = s[order], t[order]
        tp, seen = torch.cumsum(t, 0), torch.arange(1, len(t) + 1, dtype=torch.float32)
        # Tied scores are one cut-off: keep only the last position of each run of equal scores.
        last = torch.ones_like(s, dtype=torch.bool)
        last[:-1] = s[1:] != s[:-1]
        precision, recall = (tp / seen)[last], (tp / positives)[last]
        gains = torch.diff(recall, prepend=torch.zeros(1))
        result.append(float((gains * precision).sum()))
    return result


def mean_average_precision(preds: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean of the per-label average precisions, over labels with a positive example."""
    values = [v for v in average_precision(preds, targets) if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


# --- regression ------------------------------------------------------------------------------

def _regression(preds: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    preds, targets = preds.detach().float().cpu(), targets.detach().float().cpu()
    if preds.shape != targets.shape:
        raise TrainingError(f"regression metrics got predictions {tuple(preds.shape)} for "
                            f"targets {tuple(targets.shape)}")
    return preds, targets


def mse(preds: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean squared error over every output of every sample."""
    preds, targets = _regression(preds, targets)
    return float(((preds - targets) ** 2).mean()) if targets.numel() else float("nan")


def mae(preds: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean absolute error over every output of every sample."""
    preds, targets = _regression(preds, targets)
    return float((preds - targets).abs().mean()) if targets.numel() else float("nan")


def baseline_mse(train_targets: torch.Tensor, targets: torch.Tensor) -> float:
    """MSE of always predicting the training mean: the trivial answer a model must beat."""
    mean = train_targets.detach().float().cpu().mean(dim=0, keepdim=True)
    return mse(mean.expand_as(targets), targets)


def point_distances(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(N, P)`` Euclidean distances between predicted and true points, columns (x, y) pairs."""
    preds, targets = _regression(preds, targets)
    if preds.dim() != 2 or preds.shape[1] % 2:
        raise TrainingError(f"point outputs must be (N, 2P), got {tuple(preds.shape)}")
    diff = (preds - targets).reshape(len(preds), -1, 2)
    return diff.pow(2).sum(-1).sqrt()


def mean_point_distance(preds: torch.Tensor, targets: torch.Tensor, scale: float = 1.0) -> float:
    """Mean distance between predicted and true points, times ``scale`` (e.g. pixels per unit)."""
    d = point_distances(preds, targets)
    return float(d.mean()) * scale if d.numel() else float("nan")


METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {
    "accuracy": accuracy,
    "error_rate": error_rate,
    "accuracy_multi": accuracy_multi,
    "f1_macro": f1_macro,
    "f1_micro": f1_micro,
    "mean_average_precision": mean_average_precision,
    "mse": mse,
    "mae": mae,
}


def get_metric(name: str) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """The metric function called ``name``."""
    if name not in METRICS:
        raise TrainingError(f"unknown metric {name!r}; choose from {sorted(METRICS)}")
    return METRICS[name]
