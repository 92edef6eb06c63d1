"""Prefect artifacts of a run: plots, metrics, parity, scoring summary and live progress.

Every result object already serialises itself (``to_dict()``, ``to_markdown()``); this module only
lays those out as artifacts, keyed so the UI's Artifacts page keeps one history per kind. Plots
are embedded in markdown as PNG data URIs: the image travels with the artifact, so the UI shows
it without the server reaching the worker's disk.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from pathlib import Path
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def scalar_rows(values: Mapping) -> list[dict]:
    """``{"metric": name, "value": text}`` rows of the scalar entries of a mapping."""
    return [{"metric": str(k), "value": _cell(v)} for k, v in values.items()
            if isinstance(v, str | int | float | bool) or v is None]


def publish_metrics(metrics: Mapping, *, key: str, description: str) -> UUID:
    """Table artifact of the scalar metrics (nested ones such as a confusion matrix are left
    to the plots)."""
    return create_table_artifact(scalar_rows(metrics), key=key, description=description)


def plots_markdown(plots: Mapping[str, Path]) -> str:
    """Markdown with each PNG embedded as a data URI, under its name."""
    sections = []
    for name, path in plots.items():
        path = Path(path)
        if not path.is_file():
            sections.append(f"### {name}\n\n_missing: {path}_")
            continue
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        sections.append(f"### {name}\n\n![{name}](data:image/png;base64,{data})")
    return "\n\n".join(sections) if sections else "_no plots were written_"


def publish_plots(plots: Mapping[str, Path], *, key: str, description: str) -> UUID:
    """Markdown artifact of the training plots (LR finder, learning curve, confusion matrix)."""
    return create_markdown_artifact(plots_markdown(plots), key=key, description=description)


def publish_markdown(text: str, *, key: str, description: str) -> UUID:
    """Markdown artifact of a report that renders itself (``ParityReport.to_markdown()``)."""
    return create_markdown_artifact(text, key=key, description=description)


def summary_markdown(title: str, summary: Mapping, line: str | None = None) -> str:
    """A two-column table of a summary's scalar fields, under a title and its one-line recap."""
    rows = "\n".join(f"| {r['metric']} | {r['value']} |" for r in scalar_rows(summary))
    recap = f"{line}\n\n" if line else ""
    return f"## {title}\n\n{recap}| field | value |\n| --- | --- |\n{rows}\n"


class ProgressArtifact:
    """A ``progress(event)`` callback that keeps a Prefect progress artifact up to date.

    Understands the scoring functions' events: ``start`` (``total``), ``advance`` (``n``) and
    ``end``. Updates are throttled to one per ``every_s`` seconds so a fast scorer does not turn
    into an API load test; the last one (100 %) is always sent.
    """

    def __init__(self, *, key: str, description: str, every_s: float = 2.0) -> None:
        self.key = key
        self.description = description
        self.every_s = every_s
        self.total = 0
        self.done = 0
        self.artifact_id: UUID | None = None
        self._last_sent = 0.0

    @property
    def percent(self) -> float:
        return 100.0 * min(self.done, self.total) / self.total if self.total else 0.0

    def __call__(self, event: Mapping) -> None:
        kind = event.get("event")
        if kind == "start":
            self.total = int(event.get("total") or 0)
            self.done = 0
            self._send(force=True)
        elif kind == "advance":
            self.done += int(event.get("n", 1))
            self._send(force=False)
        elif kind == "end":
            self.done = self.total
            self._send(force=True)

    def _send(self, *, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_sent < self.every_s:
            return
        self._last_sent = now
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(self.percent, key=self.key,
                                                        description=self.description)
        else:
            update_progress_artifact(self.artifact_id, self.percent)


class TrainingProgress(ProgressArtifact):
    """The training loop's ``progress(event)``: one log line per stage and epoch, and a progress
    artifact over all planned epochs (early stopping jumps it to 100 %).

    Understands the Learner's events: ``fit_start``, ``batch``, ``epoch_end``, ``early_stop``,
    ``time_budget``.
    """

    def __init__(self, *, key: str, description: str, total_epochs: int, log,
                 every_s: float = 2.0) -> None:
        super().__init__(key=key, description=description, every_s=every_s)
        self.total = max(1, total_epochs)
        self.log = log
        self.epochs_done = 0

    def __call__(self, event: Mapping) -> None:
        kind = event.get("event")
        if kind == "fit_start":
            self.log.info("stage %s: %s epochs, lr_max %s", event.get("stage"),
                          event.get("epochs"), event.get("lr_max"))
        elif kind == "batch" and event.get("batches"):
            self.done = self.epochs_done + (event.get("batch", 0) + 1) / event["batches"]
            self._send(force=self.artifact_id is None)
        elif kind == "epoch_end":
            record = event.get("record", event)
            if record.get("lrs"):  # a validated head start is logged but trained no epoch
                self.epochs_done += 1
            self.done = self.epochs_done
            metrics = " ".join(f"{k}={_cell(v)}" for k, v in record.get("metrics", {}).items())
            self.log.info("%s epoch %s: train_loss=%s valid_loss=%s %s (%.1fs)",
                          record.get("stage"), record.get("epoch"),
                          _cell(record.get("train_loss")), _cell(record.get("valid_loss")),
                          metrics, record.get("seconds", 0.0))
            self._send(force=True)
        elif kind == "head_init":
            self.log.info("head: %s", event.get("why"))
        elif kind == "lr_found":
            self.log.info("LR finder (%s stage): lr %s, suggestions %s", event.get("stage"),
                          _cell(event.get("lr")), event.get("suggestions"))
        elif kind == "early_stop":
            self.log.info("early stop after epoch %s; best epoch %s restored",
                          event.get("epoch"), event.get("best_epoch"))
        elif kind == "time_budget":
            self.log.info("%s", event.get("why"))
        elif kind == "end":
            self.done = self.total
            self._send(force=True)


def publish_run_health(out: str, run_date, run_id: str, *, key: str, description: str
                       ) -> UUID | None:
    """Markdown artifact of one scoring run's health (today-vs-baseline bars), from its
    ``run_health`` rows; None when the run wrote none (run health off)."""
    from scoring.run_health.render import health_markdown, reports_from_rows
    from scoring.run_health.table import read_health

    reports = [r for r in reports_from_rows(read_health(out, run_date)) if r["run_id"] == run_id]
    if not reports:
        return None
    return create_markdown_artifact(health_markdown(reports[-1]), key=key,
                                    description=description)
