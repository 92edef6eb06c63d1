"""The circuit breaker: judge a scored run against its trailing runs before it commits.

Baseline: the profiles stored in the run records (``<out>/_runs/<run_id>.json``) of the last
``drift_runs`` committed runs of the same table and model name, pooled. Any version counts, so a
new model version is judged against what its predecessor wrote (how a release that swapped two
classes is caught); a model name with no committed history has no baseline and passes
(``no_baseline``). Refused runs leave no record, so they never join a baseline.

Decisions: ``ok`` (nothing flagged), ``no_baseline``, ``warned`` (flagged, ``on_drift: warn``:
committed and marked), ``accepted`` (flagged, ``on_drift: fail`` with ``accept_drift``:
committed), ``refused`` (flagged, ``on_drift: fail``: nothing committed,
:class:`DriftRefusedError`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from scoring.errors import ScoringError
from scoring.run_health.drift import DriftThresholds, MeasureDrift, compare
from scoring.run_health.figures import figures
from scoring.run_health.profile import RunProfile, merge_profiles
from scoring.run_health.table import write_health

#: Distributions named in the one-line refusal.
WORST_NAMED = 3
_log = logging.getLogger(__name__)


class DriftRefusedError(ScoringError):
    """The breaker refused to commit a run whose output drifted (``on_drift: fail``)."""

    def __init__(self, message: str, health: RunHealth) -> None:
        super().__init__(message)
        self.health = health


@dataclass(frozen=True)
class RunHealth:
    """A run's profile, its drift against the baseline, and what the breaker decided."""

    table: str
    run_id: str
    model: str
    on_drift: str
    decision: str
    baseline_runs: tuple[str, ...]
    drift: tuple[MeasureDrift, ...]
    #: (name, today, baseline or None) of every single-number figure.
    figures: tuple[tuple[str, float, float | None], ...]
    profile: RunProfile

    @property
    def flagged(self) -> tuple[MeasureDrift, ...]:
        """Flagged distributions, worst (largest PSI) first."""
        return tuple(sorted((d for d in self.drift if d.flagged), key=lambda d: -d.psi))

    def summary_line(self) -> str:
        if self.decision == "no_baseline":
            return f"run health: no baseline yet for {self.table} of {self.model}"
        against = f"against the last {len(self.baseline_runs)} run(s)"
        if not self.flagged:
            return f"run health: ok {against} ({len(self.drift)} distributions)"
        worst = "; ".join(d.line() for d in self.flagged[:WORST_NAMED])
        more = len(self.flagged) - WORST_NAMED
        return (f"run health: {self.decision}, {len(self.flagged)} of {len(self.drift)} "
                f"distributions drifted {against}: {worst}" + (f"; {more} more" if more > 0
                                                               else ""))

    def to_dict(self) -> dict:
        return {"table": self.table, "run_id": self.run_id, "model": self.model,
                "on_drift": self.on_drift, "decision": self.decision,
                "baseline_runs": list(self.baseline_runs),
                "drift": [_drift_dict(d) for d in self.drift],
                "figures": [list(f) for f in self.figures],
                "profile": self.profile.to_dict()}

    def report_dict(self) -> dict:
        """What reports draw (everything but the profile's raw counts), with the one line."""
        return {k: v for k, v in self.to_dict().items() if k != "profile"} | {
            "summary": self.summary_line()}

    @classmethod
    def from_dict(cls, data: dict) -> RunHealth:
        return cls(data["table"], data["run_id"], data["model"], data["on_drift"],
                   data["decision"], tuple(data["baseline_runs"]),
                   tuple(MeasureDrift(**{k: tuple(v) if isinstance(v, list) else
                                         math.nan if v is None else v
                                         for k, v in d.items()}) for d in data["drift"]),
                   tuple(tuple(f) for f in data["figures"]),
                   RunProfile.from_dict(data["profile"]))


def _drift_dict(d: MeasureDrift) -> dict:
    """Plain JSON: tuples as lists, and no NaN (a side with no rows has no PSI)."""
    return {k: list(v) if isinstance(v, tuple) else
            None if isinstance(v, float) and math.isnan(v) else v for k, v in d.__dict__.items()}


@dataclass(frozen=True)
class HealthCheck:
    """What the breaker of one run needs: its options, and the measures only the planner knows
    (``extra(plan)``: e.g. users skipped as unknown)."""

    on_drift: str
    accept_drift: bool
    runs: int
    thresholds: DriftThresholds
    extra: Callable[[object], RunProfile] | None = None

    @classmethod
    def from_options(cls, options, extra=None) -> HealthCheck | None:
        """The check ``options`` ask for (a scoring option set); None with ``on_drift: off``."""
        if options.on_drift == "off":
            return None
        return cls(options.on_drift, options.accept_drift, options.drift_runs,
                   DriftThresholds(options.drift_psi, options.drift_js, options.drift_p),
                   extra)

    def judge(self, plan, results: Sequence) -> RunHealth:
        """The run's health; a refused run's rows are written to ``run_health`` and it raises
        :class:`DriftRefusedError` (the caller drops its parts)."""
        first = plan.pendings[0]
        profile = merge_profiles([*(r.profile for r in results),
                                  self.extra(plan) if self.extra else None])
        baseline, runs = trailing_baseline(first.out, first.table, plan.model, first.run_id,
                                           self.runs)
        drift = compare(profile, baseline, self.thresholds) if runs else ()
        health = RunHealth(first.table, first.run_id, plan.model, self.on_drift,
                           self._decision(runs, drift), runs, drift,
                           _figure_pairs(profile, baseline if runs else None), profile)
        if health.decision == "refused":
            try:
                write_health(health, first)
            except (ScoringError, OSError) as err:  # the refusal matters more than its rows
                _log.warning("run %s refused; its run_health rows were not written: %s",
                             first.run_id, err)
            raise DriftRefusedError(
                f"{first.table} {first.run_date} (run {first.run_id}, {plan.model}) not "
                f"committed: {len(health.flagged)} distribution(s) drifted against the last "
                f"{len(runs)} run(s): {'; '.join(d.line() for d in health.flagged[:WORST_NAMED])}"
                f" (rerun with accept_drift / --accept-drift to commit it)", health)
        return health

    def record(self, plan) -> None:
        """Write a committed run's rows to ``run_health``; the run is committed whatever
        happens here, and its record holds the same health, so a failure is only a warning."""
        if getattr(plan, "health", None) is None:
            return
        try:
            write_health(plan.health, plan.pendings[0])
        except (ScoringError, OSError) as err:
            _log.warning("run %s committed, but its run_health rows were not written: %s",
                         plan.health.run_id, err)

    def _decision(self, runs: tuple, drift: tuple[MeasureDrift, ...]) -> str:
        if not runs:
            return "no_baseline"
        if not any(d.flagged for d in drift):
            return "ok"
        if self.on_drift == "warn":
            return "warned"
        return "accepted" if self.accept_drift else "refused"


def _figure_pairs(profile: RunProfile, baseline: RunProfile | None
                  ) -> tuple[tuple[str, float, float | None], ...]:
    before = figures(baseline) if baseline is not None else {}
    return tuple((name, round(value, 6), None if name not in before else round(before[name], 6))
                 for name, value in sorted(figures(profile).items()))


def trailing_baseline(out: str | Path, table: str, model: str, run_id: str, runs: int
                      ) -> tuple[RunProfile, tuple[str, ...]]:
    """(the pooled profile, the run ids) of the last ``runs`` committed runs of ``table`` with
    the model name of ``model`` (``name/version``) that stored a profile."""
    from scoring.shards import _run_records  # the run records' reader (shards imports us)

    name = model.rsplit("/", 1)[0]
    candidates = []
    for text in _run_records(out):
        try:
            record = json.loads(text)
        except ValueError:
            continue
        health = record.get("health") or {}
        if (record.get("run_id") != run_id and table in record.get("partitions", {})
                and str(record.get("model", "")).rsplit("/", 1)[0] == name
                and health.get("table") == table and "profile" in health):
            candidates.append(record)
    candidates.sort(key=lambda r: r.get("committed_at", ""), reverse=True)
    chosen = candidates[:runs]
    return (merge_profiles(RunProfile.from_dict(r["health"]["profile"]) for r in chosen),
            tuple(r["run_id"] for r in chosen))


def health_line(report: dict | None) -> str:
    """The one line of a run's :meth:`RunHealth.report_dict` ("" without one)."""
    return (report or {}).get("summary", "")
