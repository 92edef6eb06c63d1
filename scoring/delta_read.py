"""Reading the ``delta`` scoring tables, and the checks a run record makes against them.

Any Delta reader reads these tables (DuckDB ``delta_scan``, Polars ``read_delta``, Spark,
``deltalake``); these helpers are what lensflow itself needs: one date's rows as a run wrote them
(:func:`read_date`), every current file by date (:func:`files_by_date`, for ``--incremental``),
a pyarrow dataset of a version (:func:`open_dataset`), and whether a run is still the one a date
shows (:func:`run_still_current`).
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from export.storage import filesystem, is_url
from scoring.delta_table import PARTITION_COLUMN, date_files, open_delta, table_uri
from scoring.errors import PartitionError


def _table(out: str | Path, table: str, version: int | None = None):
    uri = table_uri(out, table)
    dt = open_delta(uri, version)
    if dt is None:
        raise PartitionError(f"{uri}: not a Delta table (no _delta_log)")
    return uri, dt


def _open(url: str):
    if not is_url(url):
        return url
    fs, path = filesystem(url)
    return fs.open(path, "rb")


def read_date(out: str | Path, table: str, run_date: date, columns: list[str] | None = None,
              version: int | None = None) -> pa.Table:
    """Every row of one date, files in name order (the parts in shard order), as
    :func:`scoring.partition.read_partition` reads a ``parquet`` partition."""
    uri, dt = _table(out, table, version)
    files = date_files(dt, run_date)
    if not files:
        raise PartitionError(f"{uri}: no committed rows for {PARTITION_COLUMN}="
                             f"{run_date.isoformat()}")
    return pa.concat_tables([pq.read_table(_open(f), columns=columns) for f in files])


def files_by_date(out: str | Path, table: str) -> list[tuple[str, list[Path | str]]]:
    """``(run_date=..., its file URLs or paths)`` of the current snapshot, oldest date first."""
    uri = table_uri(out, table)
    dt = open_delta(uri)
    if dt is None:
        return []
    by_date: dict[str, list[Path | str]] = {}
    for file in sorted(dt.file_uris()):
        day = file[len(uri):].strip("/").split("/", 1)[0]
        by_date.setdefault(day, []).append(file if is_url(file) else Path(file))
    return sorted(by_date.items())


def open_dataset(out: str | Path, table: str, version: int | None = None) -> ds.Dataset:
    """A version of the table (default the newest) as a pyarrow dataset, ``run_date`` a column."""
    _, dt = _table(out, table, version)
    return dt.to_pyarrow_dataset()


def run_still_current(out: str | Path, table: str, run_date: date, run_id: str,
                      version: int) -> bool:
    """Whether the date still shows the rows run ``run_id`` committed at ``version``: that commit
    is in the log and no later lensflow commit wrote the date (compaction does not count)."""
    uri = table_uri(out, table)
    dt = open_delta(uri)
    if dt is None or dt.version() < version:
        return False
    day = run_date.isoformat()
    for entry in dt.history(dt.version() - version + 1):
        if entry.get("lensflow.run_date") == day:
            return entry.get("lensflow.run_id") == run_id and int(entry["version"]) == version
    return False
