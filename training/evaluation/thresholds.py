"""Decision thresholds of a multi-label model, chosen on validation predictions after training.

A sigmoid output of 0.5 is rarely the best place to say "this label is present": fast.ai's
PASCAL lesson sweeps the threshold of ``accuracy_multi`` and keeps the best. We sweep
0.05…0.95 in steps of 0.05, pick the best value of the chosen metric (ties go to the threshold
nearest 0.5, the least tuned answer), and optionally one threshold per label by that label's own
score — per-label tuning on a small validation set overfits easily, so it is opt-in. The choice
goes into the manifest's ``thresholds``: one number, or one per label in class order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure

from training.errors import TrainingError
from training.evaluation import metrics
from training.evaluation.plots import save_figure

CANDIDATES = tuple(round(0.05 * i, 2) for i in range(1, 20))
THRESHOLD_METRICS = {
    "accuracy_multi": metrics.accuracy_multi,
    "f1_macro": metrics.f1_macro,
    "f1_micro": metrics.f1_micro,
}
_MAX_LABEL_CURVES = 12


@dataclass(frozen=True)
class ThresholdChoice:
    """The sweep and what it chose.

    values: the metric at each candidate used for every label; per_label: the chosen threshold
    of each label (None unless asked for) and per_label_value the metric with them.
    """

    metric: str
    candidates: tuple[float, ...]
    values: tuple[float, ...]
    best: float
    best_value: float
    per_label: dict[str, float] | None = None
    per_label_value: float | None = None
    label_curves: dict[str, tuple[float, ...]] | None = None

    def manifest_value(self) -> float | list[float]:
        """What the manifest's ``thresholds`` holds: one float, or one per label."""
        return list(self.per_label.values()) if self.per_label else self.best

    def to_dict(self) -> dict:
        return {
            "metric": self.metric,
            "candidates": list(self.candidates),
            "values": list(self.values),
            "best": self.best,
            "best_value": self.best_value,
            "per_label": None if self.per_label is None else dict(self.per_label),
            "per_label_value": self.per_label_value,
        }


def _best(candidates: Sequence[float], values: Sequence[float]) -> tuple[float, float]:
    finite = [(v, -abs(t - 0.5), -t, t) for t, v in zip(candidates, values, strict=True)
              if not math.isnan(v)]
    if not finite:
        return 0.5, float("nan")
    value, _, _, threshold = max(finite)
    return threshold, value


def _label_score(metric: str, probs: torch.Tensor, targets: torch.Tensor, t: float) -> float:
    """The per-label counterpart of ``metric`` for one column."""
    if metric == "accuracy_multi":
        return metrics.accuracy_multi(probs, targets, t, sigmoid=False)
    return metrics.f1_per_label(probs, targets, t, sigmoid=False)[0]


def choose_threshold(
    probs: torch.Tensor,
    targets: torch.Tensor,
    classes: Sequence[str],
    *,
    metric: str = "accuracy_multi",
    per_label: bool = False,
    candidates: Sequence[float] = CANDIDATES,
) -> ThresholdChoice:
    """Sweep ``candidates`` over validation probabilities ``(N, C)`` and multi-hot targets."""
    if metric not in THRESHOLD_METRICS:
        raise TrainingError(f"threshold metric must be one of {sorted(THRESHOLD_METRICS)}, "
                            f"got {metric!r}")
    if probs.shape != targets.shape or probs.shape[1] != len(classes):
        raise TrainingError(f"threshold sweep: {tuple(probs.shape)} probabilities, "
                            f"{tuple(targets.shape)} targets, {len(classes)} labels")
    fn = THRESHOLD_METRICS[metric]
    values = tuple(fn(probs, targets, t, sigmoid=False) for t in candidates)
    best, best_value = _best(candidates, values)
    if not per_label:
        return ThresholdChoice(metric, tuple(candidates), values, best, best_value)
    chosen, curves = {}, {}
    for j, name in enumerate(classes):
        column = (probs[:, j:j + 1], targets[:, j:j + 1])
        curves[name] = tuple(_label_score(metric, *column, t) for t in candidates)
        threshold, value = _best(candidates, curves[name])
        chosen[name] = best if math.isnan(value) else threshold  # label absent from validation
    per_label_value = fn(probs, targets, list(chosen.values()), sigmoid=False)
    return ThresholdChoice(metric, tuple(candidates), values, best, best_value, chosen,
                           per_label_value, curves)


def plot_threshold_sweep(choice: ThresholdChoice, path: str | Path) -> Path:
    """The metric against the threshold, the chosen one starred; per-label curves when tuned."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    if choice.label_curves:
        for name, curve in list(choice.label_curves.items())[:_MAX_LABEL_CURVES]:
            ax.plot(choice.candidates, curve, linewidth=0.8, alpha=0.6, label=name)
    ax.plot(choice.candidates, choice.values, "o-", color="black", label="all labels")
    ax.plot([choice.best], [choice.best_value], "*", color="C3", markersize=14,
            label=f"chosen {choice.best:.2f}: {choice.best_value:.4f}")
    ax.set_xlabel("threshold")
    ax.set_ylabel(choice.metric)
    ax.legend(loc="best", fontsize="small")
    return save_figure(fig, path)
