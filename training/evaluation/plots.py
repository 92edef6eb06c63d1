"""PNG plots of a training run: LR finder, learning curve, LR schedule, confusion matrix.

Drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through pyplot, so
nothing leaks into pyplot's global figure list and no display is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from training.fit.learner import EpochRecord
from training.fit.lr_finder import SKIP_END, LRFinderResult


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parents created) through the Agg canvas."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def plot_lr_find(result: LRFinderResult, path: str | Path) -> Path:
    """Smoothed loss against LR (log scale), each suggestion marked on the curve."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    keep = max(len(result.lrs) - SKIP_END, 2)
    lrs, losses = np.asarray(result.lrs[:keep]), np.asarray(result.losses[:keep])
    ax.plot(lrs, losses)
    for (name, lr), color in zip(result.suggestions.items(), ["C1", "C2", "C3", "C4", "C5"],
                                 strict=False):
        loss = np.interp(np.log10(lr), np.log10(lrs), losses)
        marker = "*" if name == result.chosen else "o"
        ax.plot([lr], [loss], marker, color=color, markersize=10, label=f"{name}: {lr:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    ax.legend(loc="best")
    return save_figure(fig, path)


def plot_learning_curve(history: Sequence[EpochRecord | dict], path: str | Path) -> Path:
    """Train and validation loss per epoch, a dashed line where a new stage starts."""
    records = [r.to_dict() if isinstance(r, EpochRecord) else dict(r) for r in history]
    epochs = [r["epoch"] for r in records]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(epochs, [r["train_loss"] for r in records], "o-", label="train loss")
    ax.plot(epochs, [r["valid_loss"] for r in records], "o-", label="valid loss")
    for prev, rec in zip(records, records[1:], strict=False):
        if rec["stage"] != prev["stage"]:
            ax.axvline(rec["epoch"] - 0.5, color="grey", linestyle="--")
            ax.annotate(rec["stage"] or "stage", (rec["epoch"] - 0.5, 1), xycoords=("data",
                        "axes fraction"), xytext=(3, -12), textcoords="offset points")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(loc="best")
    return save_figure(fig, path)


def plot_lr_schedule(lr_log: Sequence[tuple[str, int | None, Sequence[float]]],
                     path: str | Path) -> Path:
    """The LR of the head and the first layer group at every step (log scale); a dashed line at
    each new stage, a dotted one at each SGDR warm restart.

    lr_log: ``Learner.lr_log``, one (stage, cycle, LR per layer group) per applied step.
    """
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    steps = np.arange(len(lr_log))
    ax.plot(steps, [lrs[-1] for _, _, lrs in lr_log], label="head")
    if lr_log and len(lr_log[0][2]) > 1:
        ax.plot(steps, [lrs[0] for _, _, lrs in lr_log], label="first layer group")
    for step, (prev, cur) in enumerate(zip(lr_log, lr_log[1:], strict=False), start=1):
        if cur[0] != prev[0]:
            ax.axvline(step - 0.5, color="grey", linestyle="--")
            ax.annotate(cur[0] or "stage", (step - 0.5, 1), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points")
        elif cur[1] is not None and cur[1] != prev[1]:
            ax.axvline(step - 0.5, color="C3", linestyle=":", label="warm restart"
                       if "warm restart" not in ax.get_legend_handles_labels()[1] else None)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.legend(loc="best")
    return save_figure(fig, path)


def plot_confusion_matrix(
    cm: torch.Tensor | np.ndarray, classes: Sequence[str], path: str | Path
) -> Path:
    """Counts with actual classes as rows and predicted classes as columns."""
    cm = np.asarray(cm)
    size = max(4.0, 0.6 * len(classes) + 2)
    fig = Figure(figsize=(size, size))
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, labels=list(classes), rotation=90)
    ax.set_yticks(ticks, labels=list(classes))
    threshold = cm.max() / 2 if cm.size else 0
    for i, j in np.ndindex(cm.shape):
        ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                color="white" if cm[i, j] > threshold else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    return save_figure(fig, path)
