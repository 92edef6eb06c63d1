"""Staged fine-tuning, the fast.ai recipe (lesson 1-6; fastai's ``Learner.fine_tune``).

Set the head's start (``start_head``) and validate it as epoch 0; freeze the body and train the
head with one-cycle at ``base_lr`` (for ``freeze_epochs``, possibly none); halve ``base_lr``;
unfreeze; train every layer group with discriminative LRs ``slice(base_lr / lr_mult, base_lr)``.

``base_lr="auto"`` takes the frozen stage's LR from a rule (``auto_rule``, default ``AUTO_RULE``)
on a sweep of the head over cached body features (``training.fit.head_sweep``: a few hundred head
steps, nearly free, the same with or without ``precompute``), times ``auto_mult``, and multiplies
it by ``unfrozen_factor`` after unfreezing (0.5 by default, as fastai's ``fine_tune`` halves a
number). Each task's option model holds its own three values (``training.recipes.options``).
Measured on ants/bees (``benchmarks/lr_rules.py``): a second, full-model sweep
after unfreezing cost more than the training and its valley (~2e-4) trained worse than the
halved head LR. ``base_lr="slide"`` (or another rule) runs the finder over the module being
fitted, as before, and goes on as if you had passed the number. The unfrozen stage follows
fastai's ``fine_tune`` (30% warm-up from ``lr_max / 5``); the frozen stage warms up for 25% of its
steps, not fastai's 99%, which spent a small data set's few frozen steps all warming up.
Each stage's ``LRChoice`` says where its LR came from.

``schedule=Sgdr(...)`` trains both stages under SGDR instead of one-cycle, at the same LRs
(discriminative after unfreezing); each stage must last a whole number of cycles.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from training.errors import TrainingError
from training.evaluation.plots import plot_learning_curve, plot_lr_find, plot_lr_schedule
from training.fit.early_stopping import EarlyStopping, TimeBudget
from training.fit.head_sweep import lr_find_head
from training.fit.learner import EpochRecord, Learner
from training.fit.lr_finder import SUGGESTERS, LRFinderResult, lr_find
from training.fit.precompute import precomputed_body
from training.fit.schedule import Sgdr, cycle_spans, layer_groups_of, lrs_per_group

FROZEN, UNFROZEN, STARTED = "frozen", "unfrozen", "start"
#: The finder rule ``base_lr="auto"`` applies to the cached-feature head sweep.
AUTO_RULE = "valley"
#: The unfrozen stage's top LR as a multiple of the frozen stage's (fastai's ``fine_tune``).
UNFROZEN_FACTOR = 0.5


@dataclass(frozen=True)
class LRChoice:
    """Why a stage trained at its top LR.

    source: ``given`` (a number, × ``factor`` after unfreezing), ``finder`` (``rule`` applied to a
    sweep of ``sweep_iterations`` steps, over cached body features or not) or ``frozen`` (the
    frozen stage's LR × ``factor``).
    suggestions: every rule's value on that sweep (the frozen stage's, for ``frozen``).
    """

    lr: float
    source: str
    rule: str | None = None
    suggestions: dict[str, float] = field(default_factory=dict)
    sweep_iterations: int | None = None
    cached_features: bool = False
    factor: float = 1.0
    #: ``finder``: the rule's suggestion was multiplied by this (``rule_mult``).
    rule_mult: float = 1.0

    def to_dict(self) -> dict:
        return {"lr": self.lr, "source": self.source, "rule": self.rule,
                "suggestions": dict(self.suggestions), "sweep_iterations": self.sweep_iterations,
                "cached_features": self.cached_features, "factor": self.factor,
                "rule_mult": self.rule_mult, "why": self.why()}

    def why(self) -> str:
        """One line a person reads in ``history.json``: where this stage's LR came from."""
        if self.source == "given":
            return f"given: {self.lr:.3g}" + (f" x {self.factor:g}" if self.factor != 1 else "")
        if self.source == "finder":
            sweep = "a head sweep on cached body features" if self.cached_features \
                else "a sweep of the module being fitted"
            mult = f" x {self.rule_mult:g}" if self.rule_mult != 1 else ""
            factor = f" x {self.factor:g}" if self.factor != 1 else ""
            return (f"finder: {self.rule}{mult} of {sweep} ({self.sweep_iterations} iterations)"
                    f"{factor} = {self.lr:.3g}")
        return f"frozen stage's LR x {self.factor:g} = {self.lr:.3g}"


@dataclass(frozen=True)
class StartedHead:
    """What ``start_head`` reports of the start it set: its training loss (None: not measured)
    and, when it has them already, its validation outputs and targets (a head applied to cached
    validation features: the start's validation then needs no pass through the body)."""

    train_loss: float | None = None
    valid_outputs: tuple[torch.Tensor, torch.Tensor] | None = None


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
    lr_choice: dict[str, LRChoice] = field(default_factory=dict)
    schedule: Sgdr | None = None
    time_budget: dict | None = None

    def to_dict(self) -> dict:
        return {
            "history": [r.to_dict() for r in self.history],
            "lr_finds": {stage: r.to_dict() for stage, r in self.lr_finds.items()},
            "stage_lrs": {stage: list(lrs) for stage, lrs in self.stage_lrs.items()},
            "best_epoch": self.best_epoch,
            "best_metrics": dict(self.best_metrics),
            "stopped_early": self.stopped_early,
            "plots": dict(self.plots),
            "lr_choice": {stage: c.to_dict() for stage, c in self.lr_choice.items()},
            "schedule": self.schedule.to_dict() if self.schedule else {"schedule": "one_cycle"},
            "cycles": cycle_spans(self.history),
            "time_budget": self.time_budget,
        }


@dataclass
class _Run:
    """What the stages of one ``fine_tune`` call accumulate for its result."""

    learner: Learner
    early_stopping: EarlyStopping | None
    plots_dir: Path | None
    schedule: Sgdr | None = None
    budget: TimeBudget | None = None
    records: list[EpochRecord] = field(default_factory=list)
    lr_finds: dict[str, LRFinderResult] = field(default_factory=dict)
    stage_lrs: dict[str, list[float]] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)
    lr_choice: dict[str, LRChoice] = field(default_factory=dict)

    @property
    def stopped(self) -> bool:
        return (self.early_stopping is not None and self.early_stopping.stopped_early) or \
            (self.budget is not None and self.budget.stopped)

    def budget_allows_stage(self) -> bool:
        """Whether another stage may start: always without a budget; with one, when an epoch
        as long as the last trained one still fits (before the first: when any time is left)."""
        if self.budget is None or self.budget.allows_another():
            return True
        self.budget.stop(self.records[-1].epoch if self.records else None)
        self.learner.emit(event="time_budget", epoch=self.budget.stopped_epoch,
                          **self.budget.to_dict())
        return False

    def find_lr(self, stage: str, rule: str, *, head_only: bool = False,
                train_plain=None, rule_mult: float = 1.0, features=None) -> float:
        """``rule``'s suggestion × ``rule_mult`` from a sweep of the module being fitted, or with
        ``head_only`` of the head on cached body features."""
        if head_only:
            result = lr_find_head(self.learner, train_plain, suggestion=rule, features=features)
        else:
            result = lr_find(self.learner, suggestion=rule)
        self.lr_finds[stage] = result
        if self.plots_dir is not None:
            path = plot_lr_find(result, Path(self.plots_dir) / f"lr_find_{stage}.png")
            self.plots[f"lr_find_{stage}"] = str(path)
        self.learner.emit(event="lr_found", stage=stage, suggestions=result.suggestions,
                          lr=result.suggestion)
        lr = result.suggestion * rule_mult
        self.lr_choice[stage] = LRChoice(
            lr, "finder", rule, dict(result.suggestions), len(result.lrs),
            cached_features=head_only or self.learner.train_module is not self.learner.model,
            rule_mult=rule_mult)
        return lr

    def scale(self, stage: str, factor: float) -> float:
        """The stage's chosen LR × ``factor``, recorded in its choice."""
        choice = self.lr_choice[stage]
        self.lr_choice[stage] = replace(choice, lr=choice.lr * factor,
                                        factor=choice.factor * factor)
        return self.lr_choice[stage].lr

    def given(self, stage: str, lr: float) -> float:
        self.lr_choice[stage] = LRChoice(lr, "given")
        return lr

    def from_frozen(self, stage: str, lr: float, factor: float) -> float:
        """``lr × factor``: from the frozen stage's choice, or a number given with none."""
        frozen = self.lr_choice.get(FROZEN, LRChoice(lr, "given"))
        source = FROZEN if FROZEN in self.lr_choice else "given"
        self.lr_choice[stage] = LRChoice(lr * factor, source, frozen.rule,
                                         dict(frozen.suggestions), factor=factor,
                                         rule_mult=frozen.rule_mult)
        return lr * factor

    def start(self, start_head: Callable[[], StartedHead | None]) -> None:
        """Set the head's start, and validate it as an epoch of its own (stage ``start``, no
        training step) that early stopping may keep: a fitted start can beat every epoch of
        fine-tuning on a small or far-from-ImageNet set, and is then what the run returns."""
        started = start_head() or StartedHead()
        record = self.learner.record_start(STARTED, started.train_loss, started.valid_outputs)
        self.records.append(record)
        if self.early_stopping is not None:
            self.early_stopping.update(record, self.learner.model, judge=False)

    def fit(self, stage: str, epochs: int, lrs: slice, **one_cycle) -> None:
        """A stage under one-cycle (with ``one_cycle``'s shape), or SGDR when scheduled."""
        self.stage_lrs[stage] = lrs_per_group(lrs, len(layer_groups_of(self.learner.model)))
        if self.schedule is not None:
            self.records += self.learner.fit_sgdr(
                epochs, lrs, self.schedule, early_stopping=self.early_stopping, stage=stage,
                budget=self.budget)
            return
        self.records += self.learner.fit_one_cycle(
            epochs, lrs, early_stopping=self.early_stopping, stage=stage, budget=self.budget,
            **one_cycle
        )

    def result(self) -> FineTuneResult:
        if self.plots_dir is not None and self.records:
            path = Path(self.plots_dir) / "learning_curve.png"
            self.plots["learning_curve"] = str(plot_learning_curve(self.learner.history, path))
            path = Path(self.plots_dir) / "lr_schedule.png"
            self.plots["lr_schedule"] = str(plot_lr_schedule(self.learner.lr_log, path))
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
            lr_choice=self.lr_choice,
            schedule=self.schedule,
            time_budget=None if self.budget is None else self.budget.to_dict(),
        )


def fine_tune(
    learner: Learner,
    epochs: int,
    base_lr: float | str = "auto",
    freeze_epochs: int = 1,
    lr_mult: float = 100,
    *,
    find_lr_again: bool = False,
    early_stopping: EarlyStopping | None = None,
    precompute: bool = False,
    plots_dir: Path | None = None,
    train_plain=None,
    freeze_pct_start: float = 0.25,
    pct_start: float = 0.3,
    div: float = 5.0,
    schedule: Sgdr | None = None,
    auto_rule: str = AUTO_RULE,
    auto_mult: float = 1.0,
    unfrozen_factor: float = UNFROZEN_FACTOR,
    head_features: tuple | None = None,
    start_head: Callable[[], StartedHead | None] | None = None,
    time_budget: TimeBudget | None = None,
) -> FineTuneResult:
    """Train the head on a frozen body, then the whole model with discriminative LRs.

    base_lr: a float; ``"auto"`` for ``auto_rule`` × ``auto_mult`` on a head sweep over cached
    body features (models with ``.body`` and ``.head``; others sweep the model), then
    × ``unfrozen_factor`` after unfreezing; or a
    suggestion rule (``valley``, ``steep``, ``minimum``, ``slide``): that rule's suggestion from
    one finder run over the module being fitted, then used exactly like a float you passed.
    find_lr_again: with ``"auto"``, the unfrozen stage's top LR is a fresh full-model finder's
    suggestion instead of half the frozen stage's. precompute: train the head on cached body
    features (``train_plain``: an un-augmented train loader for the cache, and for the auto
    head sweep). plots_dir: write LR finder and learning curves and the LR schedule.
    schedule: ``Sgdr(cycle_len, cycle_mult)`` for warm restarts in both stages instead of
    one-cycle; each stage's epochs must end a cycle (checked before any training).
    auto_rule, auto_mult: the rule ``"auto"`` applies and the multiple of its suggestion
    (each task's options hold its own). unfrozen_factor: the unfrozen stage's top LR as a
    multiple of the frozen stage's. head_features: the training samples' body features and
    targets (``head_sweep.train_features``) when the caller has them already: the auto head
    sweep reuses them instead of another body pass. start_head: sets the head's starting
    weights (``training.models.head_init``); called once the first stage's LR is chosen, just
    before that stage trains, because the finder rules were chosen on sweeps of a fresh head: a
    head that starts near its optimum has no descent for a sweep to find. It returns a
    ``StartedHead`` (or None); the start is then validated as an epoch of stage ``start`` that
    early stopping may restore. time_budget: training stops after the epoch past which another
    would overrun it, and a stage starts only while an epoch as long as the last one fits; the
    best epoch is restored as after early stopping.
    """
    auto = base_lr == "auto"
    if auto and auto_rule not in SUGGESTERS:
        raise TrainingError(f"auto_rule must be one of {', '.join(SUGGESTERS)}, got "
                            f"{auto_rule!r}")
    if not (auto_mult > 0 and unfrozen_factor > 0):
        raise TrainingError(f"auto_mult and unfrozen_factor must be positive, got {auto_mult}, "
                            f"{unfrozen_factor}")
    rule = auto_rule if auto else (base_lr if base_lr in SUGGESTERS else None)
    if rule is None and (isinstance(base_lr, str) or not base_lr > 0):
        raise TrainingError(f"base_lr must be a positive number, 'auto' or one of "
                            f"{', '.join(SUGGESTERS)}, got {base_lr!r}")
    if epochs < 0 or freeze_epochs < 0 or epochs + freeze_epochs == 0:
        raise TrainingError(f"nothing to train: epochs={epochs}, freeze_epochs={freeze_epochs}")
    if schedule is not None:
        for n in (freeze_epochs, epochs):
            if n:
                schedule.cycle_lengths(n)
    run = _Run(learner, early_stopping, plots_dir, schedule, time_budget)
    lr = None if rule else float(base_lr)
    head_only = auto and _has_body_and_head(learner.model)

    if freeze_epochs:
        learner.freeze()
        with precomputed_body(learner, train_plain, head_features) if precompute \
                else contextlib.nullcontext():
            lr = run.find_lr(FROZEN, rule, head_only=head_only, train_plain=train_plain,
                             rule_mult=auto_mult if auto else 1.0, features=head_features) \
                if rule else run.given(FROZEN, lr)
            if start_head is not None:
                run.start(start_head)
                start_head = None
            # slice(lr): the head at lr, BatchNorm layers left trainable in the body at lr / 10.
            if run.budget_allows_stage():
                run.fit(FROZEN, freeze_epochs, slice(lr), pct_start=freeze_pct_start)

    learner.unfreeze()
    if epochs and not run.stopped:
        if lr is None and head_only and not find_lr_again:
            # No frozen stage: the head sweep still sets the scale, × unfrozen_factor as if the
            # head had trained at it first (a whole-model sweep costs more than an epoch).
            lr = run.find_lr(UNFROZEN, rule, head_only=True, train_plain=train_plain,
                             rule_mult=auto_mult, features=head_features)
            lr = run.scale(UNFROZEN, unfrozen_factor)
        elif lr is None or (auto and find_lr_again):
            lr = run.find_lr(UNFROZEN, rule, rule_mult=auto_mult if auto else 1.0)
        else:
            lr = run.from_frozen(UNFROZEN, lr, unfrozen_factor)
        if start_head is not None:  # no frozen stage: the start comes after this stage's sweep
            run.start(start_head)
        if run.budget_allows_stage():
            run.fit(UNFROZEN, epochs, slice(lr / lr_mult, lr), pct_start=pct_start, div=div)
    return run.result()


def _has_body_and_head(model) -> bool:
    return all(isinstance(getattr(model, name, None), nn.Module) for name in ("body", "head"))
