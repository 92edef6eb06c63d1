"""Early stopping with best-weight restore (Prechelt, "Early Stopping — But When?", 1998).

One instance can span several ``fit_one_cycle`` calls (the frozen and unfrozen stages of
``fine_tune``): the patience counter and the best snapshot carry over. The snapshot is a CPU copy
of the whole ``state_dict`` — weights and buffers such as BatchNorm running statistics — so the
restored model is bit-identical to the winning epoch's.

Under SGDR (``Learner.fit_sgdr``) every epoch may still win the snapshot, but patience is judged
only at cycle ends: a cycle whose epochs all failed to improve on the best counts one, so the
loss jump after a warm restart never stops a run, and ``patience`` counts cycles there.

``TimeBudget`` is the other way a fit ends early: wall time. After each epoch, training stops
when another epoch as long as that one would end past the budget; early stopping's best
snapshot (when there is one) is then restored as after any stop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from training.errors import TrainingError

if TYPE_CHECKING:
    from training.fit.learner import EpochRecord

MINIMISED_WORDS = ("loss", "error", "mse", "mae", "rmse")


def monitored_value(record: EpochRecord, monitor: str) -> float:
    """``record``'s value of ``monitor``: ``train_loss``, ``valid_loss`` or a metric name."""
    if monitor in ("train_loss", "valid_loss"):
        return float(getattr(record, monitor))
    if monitor in record.metrics:
        return float(record.metrics[monitor])
    known = ["train_loss", "valid_loss", *record.metrics]
    raise TrainingError(f"early stopping monitor {monitor!r} is not one of {known}")


def _mode_of(name: str) -> str:
    return "min" if any(w in name.lower() for w in MINIMISED_WORDS) else "max"


def keeps_over(record: EpochRecord, best: EpochRecord | None, keep: str) -> bool:
    """Whether ``record`` is better than ``best`` by ``keep`` (maximised or minimised by its
    name), a tie going to the lower ``valid_loss``; a non-finite value never wins."""
    value = monitored_value(record, keep)
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    other = monitored_value(best, keep)
    if value != other:
        return value > other if _mode_of(keep) == "max" else value < other
    return record.valid_loss < best.valid_loss


class EarlyStopping:
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs.

    mode: ``min``, ``max``, or ``auto`` (min when the name says loss/error, else max).
    keep: what chooses the snapshot that is restored, when it is not ``monitor``: a metric
    (maximised or minimised by its name, as ``auto``), ties broken by the lower ``valid_loss``.
    The smooth loss then says when training has stalled, and the measure users judge the model
    by says which epoch they get (Keras's and Lightning's EarlyStopping beside ModelCheckpoint).
    """

    def __init__(
        self,
        monitor: str = "valid_loss",
        mode: str = "auto",
        min_delta: float = 0.0,
        patience: int = 2,
        keep: str | None = None,
    ) -> None:
        if mode == "auto":
            mode = _mode_of(monitor)
        if mode not in ("min", "max"):
            raise TrainingError(f"early stopping mode must be auto, min or max, got {mode!r}")
        if patience < 0 or min_delta < 0:
            raise TrainingError("early stopping patience and min_delta must be >= 0")
        self.monitor = monitor
        self.mode = mode
        self.min_delta = float(min_delta)
        self.patience = int(patience)
        self.keep = None if keep == monitor else keep
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.best_record: EpochRecord | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.epochs_without_improvement = 0
        self.stopped_epoch: int | None = None
        self._improved_since_judged = False

    @property
    def stopped_early(self) -> bool:
        return self.stopped_epoch is not None

    def _improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        if self.mode == "min":
            return value < self.best_value - self.min_delta
        return value > self.best_value + self.min_delta

    def update(self, record: EpochRecord, model: nn.Module, *, judge: bool = True) -> bool:
        """Account for one finished epoch; snapshot ``model`` if it is the best. True = stop.

        judge: whether patience is judged at this epoch (False inside an SGDR cycle): an
        unjudged epoch can win the snapshot but never counts against patience.
        """
        value = monitored_value(record, self.monitor)
        improved = self._improves(value)
        if improved:
            self.best_value = value
            self._improved_since_judged = True
        kept = improved if self.keep is None else keeps_over(record, self.best_record, self.keep)
        if kept:
            self.best_epoch = record.epoch
            self.best_record = record
            self.best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
            }
        if not judge:
            return False
        improved, self._improved_since_judged = self._improved_since_judged, False
        if improved:
            self.epochs_without_improvement = 0
            return False
        self.epochs_without_improvement += 1
        if self.epochs_without_improvement >= self.patience:
            self.stopped_epoch = record.epoch
            return True
        return False

    def restore_best(self, model: nn.Module) -> int | None:
        """Load the best snapshot into ``model`` (in place); return its epoch, None if none."""
        if self.best_state is None:
            return None
        model.load_state_dict(self.best_state)
        return self.best_epoch

    def to_dict(self) -> dict:
        return {
            "monitor": self.monitor,
            "keep": self.keep or self.monitor,
            "mode": self.mode,
            "min_delta": self.min_delta,
            "patience": self.patience,
            "best_epoch": self.best_epoch,
            "best_value": self.best_value,
            "stopped_early": self.stopped_early,
            "stopped_epoch": self.stopped_epoch,
        }


class TimeBudget:
    """``seconds`` of wall time from the budget's creation, on ``clock`` (``time.monotonic``).

    The learner brackets each epoch with ``epoch_began`` and ``epoch_ended``;
    ``allows_another()``: an epoch as long as the last one still ends within the budget (before
    any epoch: some time is left). ``stop(epoch)`` records where it ended training; ``to_dict``
    goes into ``history.json``.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not seconds > 0:
            raise TrainingError(f"the time budget must be positive, got {seconds} s")
        self.seconds = float(seconds)
        self._clock = clock
        self.started = clock()
        self._began = self.started
        self.last_epoch = 0.0
        self.stopped_epoch: int | None = None
        self.left_at_stop: float | None = None

    def left(self) -> float:
        return self.started + self.seconds - self._clock()

    def epoch_began(self) -> None:
        self._began = self._clock()

    def epoch_ended(self) -> None:
        self.last_epoch = self._clock() - self._began

    def allows_another(self) -> bool:
        left = self.left()
        return left > 0 and left >= self.last_epoch

    def stop(self, epoch: int | None) -> None:
        self.stopped_epoch = epoch
        self.left_at_stop = self.left()

    @property
    def stopped(self) -> bool:
        return self.left_at_stop is not None

    def to_dict(self) -> dict:
        out = {"seconds": self.seconds, "stopped": self.stopped,
               "stopped_epoch": self.stopped_epoch}
        if self.stopped:
            out["why"] = (f"time budget of {_seconds(self.seconds)}: stopped after epoch "
                          f"{self.stopped_epoch} with {_seconds(max(self.left_at_stop, 0))} "
                          f"left, less than the last epoch's {_seconds(self.last_epoch)}")
        return out


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 or value == 0 else f"{value:.2g} s"
