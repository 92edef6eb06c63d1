"""Housekeeping of the ``delta`` scoring tables: their history, vacuum, compaction, checkpoints
(``lensflow table history|vacuum|optimize``).

- **History**: every run's commit carries its lineage (:func:`scoring.delta_table.lineage`), so
  :func:`history` answers "which run, model and bundle wrote date D, and when".
- **Vacuum** deletes the files no current version needs once they are older than the retention:
  files a rerun replaced (time travel to the versions that still name them keeps working until
  then) and the parts of runs that died before their commit (never visible). The default is
  Delta's own, 7 days; anything under :data:`MIN_RETENTION_HOURS` (the grace a live run gets,
  ``ORPHAN_GRACE_S``) is refused unless the caller says no run is live and no reader reads old
  versions.
- **Optimize** rewrites a date's many small parts into few files (``OPTIMIZE``, a commit that
  changes no row), then writes a checkpoint. Runs commit a checkpoint every
  :data:`CHECKPOINT_INTERVAL` commits anyway (set when the table is created).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path

from export.storage import ORPHAN_GRACE_S
from scoring.delta_table import CHECKPOINT_INTERVAL, PARTITION_COLUMN, open_delta, table_uri
from scoring.errors import PartitionError

#: Delta's default ``delta.deletedFileRetentionDuration``: a week of time travel.
DEFAULT_RETENTION_HOURS = 7 * 24
MIN_RETENTION_HOURS = ORPHAN_GRACE_S // 3600
__all__ = ["CHECKPOINT_INTERVAL", "Commit", "checkpoint", "history", "optimize", "vacuum"]
_LINEAGE_COLUMNS = ("run_id", "run_date", "model_name", "model_version", "bundle_sha256",
                    "host", "rows", "files")


@dataclass(frozen=True)
class Commit:
    """One entry of a table's log, with the lensflow lineage when a scoring run wrote it."""

    version: int
    committed_at: str
    operation: str
    run_id: str | None = None
    run_date: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    bundle_sha256: str | None = None
    host: str | None = None
    rows: str | None = None
    files: str | None = None
    options: dict | None = None

    def line(self) -> str:
        who = (f" run {self.run_id} run_date={self.run_date} {self.model_name}/"
               f"{self.model_version} bundle sha256:{(self.bundle_sha256 or '')[:12]} on "
               f"{self.host}, {self.rows} rows in {self.files} files") if self.run_id else ""
        return f"v{self.version} {self.committed_at} {self.operation}{who}"


def _table(out: str | Path, table: str):
    uri = table_uri(out, table)
    dt = open_delta(uri)
    if dt is None:
        raise PartitionError(f"{uri}: not a Delta table (no _delta_log)")
    return uri, dt


def history(out: str | Path, table: str, limit: int | None = None,
            run_date: date | None = None) -> list[Commit]:
    """The table's commits, newest first (only those of scoring runs of ``run_date`` if given)."""
    _, dt = _table(out, table)
    commits = []
    for entry in dt.history(limit):
        lineage = {c: entry.get(f"lensflow.{c}") for c in _LINEAGE_COLUMNS}
        if run_date is not None and lineage["run_date"] != run_date.isoformat():
            continue
        options = entry.get("lensflow.options")
        stamp = datetime.fromtimestamp(entry["timestamp"] / 1000, timezone.utc)
        commits.append(Commit(int(entry["version"]), stamp.isoformat(timespec="seconds"),
                              entry.get("operation", ""), **lineage,
                              options=json.loads(options) if options else None))
    return commits


def vacuum(out: str | Path, table: str, retention_hours: float = DEFAULT_RETENTION_HOURS, *,
           dry_run: bool = False, allow_short: bool = False) -> list[str]:
    """Delete (or with ``dry_run`` list) the files no version within the retention needs: those
    replaced by reruns and those of runs that died; returns them."""
    uri, dt = _table(out, table)
    if retention_hours < MIN_RETENTION_HOURS and not allow_short:
        raise PartitionError(
            f"{uri}: retention {retention_hours:g} h is under the {MIN_RETENTION_HOURS} h a live "
            f"run may take to commit; vacuum would delete its parts (allow_short: none is live "
            f"and no reader reads older versions)")
    return dt.vacuum(retention_hours=int(retention_hours), dry_run=dry_run,
                     enforce_retention_duration=False, full=True)


def optimize(out: str | Path, table: str, run_date: date | None = None,
             target_size: int | None = None) -> dict:
    """Compact small parts (of one date, or every date) into few files; then a checkpoint.
    Returns deltalake's metrics (files added and removed)."""
    _, dt = _table(out, table)
    filters = [(PARTITION_COLUMN, "=", run_date.isoformat())] if run_date else None
    metrics = dt.optimize.compact(partition_filters=filters, target_size=target_size)
    dt = _table(out, table)[1]
    dt.create_checkpoint()
    return metrics


def checkpoint(out: str | Path, table: str) -> int:
    """Write a checkpoint of the newest version (readers then skip replaying the log); it."""
    _, dt = _table(out, table)
    dt.create_checkpoint()
    return dt.version()
