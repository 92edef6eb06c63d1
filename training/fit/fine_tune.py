"""Staged fine-tuning, the fast.ai recipe (lesson 1-6; fastai's ``Learner.fine_tune``).

Freeze the body and train the head with one-cycle at ``base_lr``; halve ``base_lr``; unfreeze;
optionally run the LR finder again; train every layer group with discriminative LRs
``slice(base_lr / lr_mult, base_lr)``. ``base_lr="auto"`` takes each stage's LR from the LR
finder's valley suggestion; ``base_lr="slide"`` (or another rule) takes the frozen stage's LR from
that rule and goes on as if you had passed the number. The unfrozen stage follows fastai's
``fine_tune`` (30% warm-up from ``lr_max / 5``); the frozen stage warms up for 25% of its steps,
not fastai's 99%, which spent a small data set's few frozen steps all warming up.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from training.errors import TrainingError
from training.evaluation.plots import plot_learning_curve, plot_lr_find
from training.fit.early_stopping import EarlyStopping
from training.fit.learner import EpochRecord, Learner
from training.fit.lr_finder import SUGGESTERS, LRFinderResult, lr_find
from training.fit.precompute import precomputed_body
from training.fit.schedule import layer_groups_of, lrs_per_group

FROZEN, UNFROZEN = "frozen", "unfrozen"


@dataclass(frozen=True)
class FineTuneResult:
    """What ``fine_tune`` did: per-epoch history, LR finder runs and LRs per stage, the winner.

    best_epoch: the epoch whose weights the model holds at the end — the early-stopping winner,
    else the last epoch; best_metrics: that epoch's losses and metrics.
    """

    history: tuple[EpochRecord, ...]
    lr_finds: dict[str, LRFinderResult]
    stage_lrs: dict[str, list[float]]
    best_epoch: int | None
    best_metrics: dict[str, float]
    stopped_early: bool
    plots: dict[str, str]

    def to_dict(self) -> dict:
        return {
            "history": [r.to_dict() for r in self.history],
            "lr_finds": {stage: r.to_dict() for stage, r in self.lr_finds.items()},
            "stage_lrs": {stage: list(lrs) for stage, lrs in self.stage_lrs.items()},
            "best_epoch": self.best_epoch,
            "best_metrics": dict(self.best_metrics),
            "stopped_early": self.stopped_early,
            "plots": dict(self.plots),
        }


@dataclass
class _Run:
    """What the stages of one ``fine_tune`` call accumulate for its result."""

    learner: Learner
    early_stopping: EarlyStopping | None
    plots_dir: Path | None
    records: list[EpochRecord] = field(default_factory=list)
    lr_finds: dict[str, LRFinderResult] = field(default_factory=dict)
    stage_lrs: dict[str, list[float]] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)

    @property
    def stopped(self) -> bool:
        return self.early_stopping is not None and self.early_stopping.stopped_early

    def find_lr(self, stage: str, rule: str) -> float:
        result = lr_find(self.learner, suggestion=rule)
        self.lr_finds[stage] = result
        if self.plots_dir is not None:
            path = plot_lr_find(result, Path(self.plots_dir) / f"lr_find_{stage}.png")
            self.plots[f"lr_find_{stage}"] = str(path)
        self.learner.emit(event="lr_found", stage=stage, suggestions=result.suggestions,
                          lr=result.suggestion)
        return result.suggestion

    def fit(self, stage: str, epochs: int, lrs: slice, **one_cycle) -> None:
        self.stage_lrs[stage] = lrs_per_group(lrs, len(layer_groups_of(self.learner.model)))
        self.records += self.learner.fit_one_cycle(
            epochs, lrs, early_stopping=self.early_stopping, stage=stage, **one_cycle
        )

    def result(self) -> FineTuneResult:
        if self.plots_dir is not None and self.records:
            path = Path(self.plots_dir) / "learning_curve.png"
            self.plots["learning_curve"] = str(plot_learning_curve(self.learner.history, path))
        best = self.records[-1] if self.records else None
        if self.early_stopping is not None and self.early_stopping.best_record is not None:
            best = self.early_stopping.best_record
        return FineTuneResult(
            history=tuple(self.records),
            lr_finds=self.lr_finds,
            stage_lrs=self.stage_lrs,
            best_epoch=None if best is None else best.epoch,
            best_metrics={} if best is None else {
                "train_loss": best.train_loss, "valid_loss": best.valid_loss, **best.metrics},
            stopped_early=self.stopped,
            plots=self.plots,
        )


def fine_tune(
    learner: Learner,
    epochs: int,
    base_lr: float | str = "auto",
    freeze_epochs: int = 1,
    lr_mult: float = 100,
    *,
    find_lr_again: bool = True,
    early_stopping: EarlyStopping | None = None,
    precompute: bool = False,
    plots_dir: Path | None = None,
    train_plain=None,
    freeze_pct_start: float = 0.25,
    pct_start: float = 0.3,
    div: float = 5.0,
) -> FineTuneResult:
    """Train the head on a frozen body, then the whole model with discriminative LRs.

    base_lr: a float; ``"auto"`` for the LR finder's valley suggestion in each stage; or a
    suggestion rule (``valley``, ``steep``, ``minimum``, ``slide``): that rule's suggestion from
    one finder run, then used exactly like a float you passed (halved after unfreezing).
    find_lr_again: with ``"auto"``, the unfrozen stage's top LR is a fresh finder's suggestion
    instead of half the frozen stage's. precompute: train the head on cached body features
    (``train_plain``: an un-augmented train loader for the cache). plots_dir: write LR finder
    and learning curves.
    """
    auto = base_lr == "auto"
    rule = "valley" if auto else (base_lr if base_lr in SUGGESTERS else None)
    if rule is None and (isinstance(base_lr, str) or not base_lr > 0):
        raise TrainingError(f"base_lr must be a positive number, 'auto' or one of "
                            f"{', '.join(SUGGESTERS)}, got {base_lr!r}")
    if epochs < 0 or freeze_epochs < 0 or epochs + freeze_epochs == 0:
        raise TrainingError(f"nothing to train: epochs={epochs}, freeze_epochs={freeze_epochs}")
    run = _Run(learner, early_stopping, plots_dir)
    lr = None if rule else float(base_lr)

    if freeze_epochs:
        learner.freeze()
        with precomputed_body(learner, train_plain) if precompute else contextlib.nullcontext():
            lr = run.find_lr(FROZEN, rule) if rule else lr
            # slice(lr): the head at lr, BatchNorm layers left trainable in the body at lr / 10.
            run.fit(FROZEN, freeze_epochs, slice(lr), pct_start=freeze_pct_start)

    learner.unfreeze()
    if epochs and not run.stopped:
        again = lr is None or (auto and find_lr_again)
        lr = run.find_lr(UNFROZEN, rule) if again else lr / 2
        run.fit(UNFROZEN, epochs, slice(lr / lr_mult, lr), pct_start=pct_start, div=div)
    return run.result()
