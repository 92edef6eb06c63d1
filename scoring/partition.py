"""Hive-partitioned Parquet output with an all-or-nothing commit per run date.

Layout: ``<out>/<table>/run_date=YYYY-MM-DD/part-*.parquet`` plus ``_SUCCESS``. Parts are written
into a hidden sibling directory ``<out>/<table>/.run_date=YYYY-MM-DD-<run_id>.tmp/`` — hidden so
that Hive-style readers (pyarrow's dataset discovery ignores the prefixes ``.`` and ``_``, Spark and
Hive do likewise) never list it — and the finished directory is renamed into place in one step, the
Hadoop ``FileOutputCommitter`` idea (write to a temporary location, commit by rename, mark with
``_SUCCESS``).

Replacing an earlier partition of the same date: on Linux the new and old directories are swapped
with one ``renameat2(RENAME_EXCHANGE)`` call, so some complete partition is visible at every
instant. Where that call is missing (other systems, some file systems) the old directory is renamed
aside and the new one renamed in: between those two ``rename`` calls — microseconds, no I/O of data
— the date has no partition at all; a reader then sees "no data for that date", never half of one.
A crash inside that window leaves the old partition under a hidden ``.old`` name, which the next
run of the same table and date puts back before it starts.

``_SUCCESS`` is the last file written, inside the temporary directory just before the rename, so a
visible partition always carries it. Several processes may fill one partition: the flow calls
``open_partition`` once, each shard writes its own parts through ``PendingPartition.part_writer``,
and the planner calls ``commit_partition`` once all shards are done (a run in one process is
the same, with its shards in turn). One run per table and date at a
time: a new run removes any temporary directory another run of that date left behind.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import date, datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from scoring.errors import PartitionError

SUCCESS_MARKER = "_SUCCESS"
REQUIRED_METADATA = ("model_name", "model_version", "bundle_sha256")
_IN_PROGRESS_SUFFIX = ".inprogress"
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
Batch = pa.RecordBatch | pa.Table | dict


def new_run_id() -> str:
    """A sortable, unique run id: UTC timestamp plus 8 random hex digits."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def partition_dir(out: str | Path, table: str, run_date: date) -> Path:
    return Path(out) / table / f"run_date={run_date.isoformat()}"


@dataclass(frozen=True)
class CommittedPartition:
    """What a commit made visible."""

    path: Path
    run_id: str
    files: int
    rows: int

    def to_dict(self) -> dict:
        return asdict(self) | {"path": str(self.path)}


@dataclass(frozen=True)
class PendingPartition:
    """A partition being filled: its temporary directory and the schema (with metadata) of parts.

    Picklable, so a flow can hand it to shard tasks running in other processes or machines that see
    the same file system.
    """

    out: Path
    table: str
    run_date: date
    run_id: str
    schema: pa.Schema
    rows_per_file: int = 1_000_000
    row_group_rows: int = 65_536

    @property
    def table_dir(self) -> Path:
        return self.out / self.table

    @property
    def final_dir(self) -> Path:
        return partition_dir(self.out, self.table, self.run_date)

    @property
    def temp_dir(self) -> Path:
        return self.table_dir / f".run_date={self.run_date.isoformat()}-{self.run_id}.tmp"

    def part_writer(self, shard: int) -> PartWriter:
        """Writer of ``part-{shard:05d}-{seq:04d}.parquet``; a retried shard replaces its parts."""
        if shard < 0:
            raise PartitionError(f"shard must be >= 0, got {shard}")
        prefix = f"part-{shard:05d}-"
        for stale in self.temp_dir.glob(f"{prefix}*"):
            stale.unlink()
        for stale in self.temp_dir.glob(f".{prefix}*"):
            stale.unlink()
        return PartWriter(self, lambda seq: f"{prefix}{seq:04d}.parquet")


def _with_lensflow_metadata(
    schema: pa.Schema, metadata: dict[str, str], table: str, run_date: date, run_id: str
) -> pa.Schema:
    keyed = {k if "." in k else f"lensflow.{k}": str(v) for k, v in metadata.items()}
    missing = [k for k in REQUIRED_METADATA if f"lensflow.{k}" not in keyed]
    if missing:
        raise ValueError(f"partition metadata lacks {', '.join(missing)}")
    keyed |= {
        "lensflow.table": table,
        "lensflow.run_id": run_id,
        "lensflow.run_date": run_date.isoformat(),
    }
    existing = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    return schema.with_metadata(existing | keyed)


def open_partition(
    out: str | Path,
    table: str,
    run_date: date,
    schema: pa.Schema,
    metadata: dict[str, str],
    *,
    rows_per_file: int = 1_000_000,
    run_id: str | None = None,
) -> PendingPartition:
    """Create the hidden temporary directory of a run, after clearing what crashed runs left."""
    run_id = run_id or new_run_id()
    if not _RUN_ID.fullmatch(run_id):
        raise PartitionError(f"run_id {run_id!r} may hold only letters, digits, '_', '.', '-'")
    if rows_per_file < 1:
        raise PartitionError(f"rows_per_file must be >= 1, got {rows_per_file}")
    pending = PendingPartition(
        out=Path(out),
        table=table,
        run_date=run_date,
        run_id=run_id,
        schema=_with_lensflow_metadata(schema, metadata, table, run_date, run_id),
        rows_per_file=rows_per_file,
    )
    pending.table_dir.mkdir(parents=True, exist_ok=True)
    _recover_and_clean(pending)
    pending.temp_dir.mkdir()
    return pending


def _recover_and_clean(pending: PendingPartition) -> None:
    stem = f".run_date={pending.run_date.isoformat()}-"
    leftovers = sorted(pending.table_dir.glob(f"{stem}*.old"))
    if not pending.final_dir.exists():
        # A crash between the two renames of the fallback commit: put the old partition back.
        for old in reversed(leftovers):
            if (old / SUCCESS_MARKER).exists():
                os.rename(old, pending.final_dir)
                break
    for stale in [*leftovers, *pending.table_dir.glob(f"{stem}*.tmp")]:
        if stale.exists():
            shutil.rmtree(stale)


class PartWriter:
    """Streams record batches into numbered Parquet files of at most ``rows_per_file`` rows.

    Batches are buffered up to ``row_group_rows`` rows (so row groups are not as small as the
    caller's batches) and each file is written under a hidden in-progress name, renamed when
    closed; memory stays bounded by one row group whatever the number of rows.
    """

    def __init__(self, pending: PendingPartition, name_of: Callable[[int], str]):
        self.pending = pending
        self._name_of = name_of
        self._seq = 0
        self._writer: pq.ParquetWriter | None = None
        self._path: Path | None = None
        self._rows_in_file = 0
        self._buffer: list[pa.RecordBatch] = []
        self._buffered = 0
        self.rows = 0
        self.files: list[Path] = []

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, data: Batch) -> None:
        """Append rows: a record batch, a table, or a dict of columns (cast to the schema)."""
        table = _as_table(data, self.pending.schema)
        for batch in table.to_batches():
            self._buffer.append(batch)
            self._buffered += batch.num_rows
            if self._buffered >= self.pending.row_group_rows:
                self._flush()

    def close(self) -> list[Path]:
        """Flush and finish the open file; writes one empty file if no row came, so the schema is
        always there to read."""
        self._flush()
        if self._writer is None and not self.files:
            self._open_file()
        self._close_file()
        return self.files

    def abort(self) -> None:
        """Drop the file being written (finished files stay for the caller to discard)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._path is not None:
            _in_progress(self._path).unlink(missing_ok=True)
            self._path = None

    def _flush(self) -> None:
        if not self._buffered:
            return
        table = pa.Table.from_batches(self._buffer, schema=self.pending.schema)
        self._buffer, self._buffered = [], 0
        offset = 0
        while offset < table.num_rows:
            if self._writer is None:
                self._open_file()
            room = self.pending.rows_per_file - self._rows_in_file
            chunk = table.slice(offset, room)
            self._writer.write_table(chunk, row_group_size=self.pending.row_group_rows)
            self._rows_in_file += chunk.num_rows
            self.rows += chunk.num_rows
            offset += chunk.num_rows
            if self._rows_in_file >= self.pending.rows_per_file:
                self._close_file()

    def _open_file(self) -> None:
        self._path = self.pending.temp_dir / self._name_of(self._seq)
        self._seq += 1
        self._writer = pq.ParquetWriter(_in_progress(self._path), self.pending.schema)
        self._rows_in_file = 0

    def _close_file(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        os.rename(_in_progress(self._path), self._path)
        self.files.append(self._path)
        self._writer, self._path = None, None


def _in_progress(path: Path) -> Path:
    return path.with_name(f".{path.name}{_IN_PROGRESS_SUFFIX}")


def _as_table(data: Batch, schema: pa.Schema) -> pa.Table:
    if isinstance(data, dict):
        return pa.Table.from_pydict(data, schema=schema)
    table = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
    return table.select(schema.names).cast(schema)


def commit_partition(
    pending: PendingPartition, *, expected_shards: Iterable[int] | None = None
) -> CommittedPartition:
    """Make the filled temporary directory the partition of its date, replacing any earlier one.

    expected_shards: shard numbers that must each have written at least one part.
    """
    temp = pending.temp_dir
    if not temp.is_dir():
        raise PartitionError(f"{temp} is gone: was this partition already committed or aborted?")
    writing = sorted(p.name for p in temp.glob(f".*{_IN_PROGRESS_SUFFIX}"))
    if writing:
        raise PartitionError(f"{temp}: parts still being written or left by a crash: {writing[0]}")
    parts = sorted(temp.glob("part-*.parquet"))
    if expected_shards is not None:
        missing = [s for s in expected_shards if not any(temp.glob(f"part-{s:05d}-*.parquet"))]
        if missing:
            raise PartitionError(f"{temp}: no part from shard(s) {missing}")
    rows = sum(pq.read_metadata(p).num_rows for p in parts)
    _write_success(temp, pending, len(parts), rows)
    for path in [*parts, temp / SUCCESS_MARKER]:
        _fsync_path(path)
    _fsync_path(temp)
    _swap_into_place(temp, pending.final_dir)
    _fsync_path(pending.table_dir)
    return CommittedPartition(pending.final_dir, pending.run_id, len(parts), rows)


def abort_partition(pending: PendingPartition) -> None:
    """Discard everything written for this run; the visible partition is untouched."""
    shutil.rmtree(pending.temp_dir, ignore_errors=True)


def _write_success(temp: Path, pending: PendingPartition, files: int, rows: int) -> None:
    body = {
        "run_id": pending.run_id,
        "files": files,
        "rows": rows,
        "committed_at": datetime.now(timezone.utc).isoformat(),
    }
    (temp / SUCCESS_MARKER).write_text(json.dumps(body) + "\n")


def _swap_into_place(temp: Path, final: Path) -> None:
    if not final.exists():
        os.rename(temp, final)
        return
    if _exchange(temp, final):
        shutil.rmtree(temp)  # now holds the previous partition
        return
    aside = temp.with_name(temp.name.removesuffix(".tmp") + ".old")
    os.rename(final, aside)
    os.rename(temp, final)  # the only window with no partition: between these two calls
    shutil.rmtree(aside)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux ``renameat2(RENAME_EXCHANGE)``; False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def committed_partitions(out: str | Path, table: str) -> list[Path]:
    """Visible partition directories of a table that carry ``_SUCCESS``, oldest date first."""
    table_dir = Path(out) / table
    if not table_dir.is_dir():
        return []
    return sorted(
        p for p in table_dir.glob("run_date=*") if p.is_dir() and (p / SUCCESS_MARKER).exists()
    )


def read_partition(
    out: str | Path, table: str, run_date: date, columns: list[str] | None = None
) -> pa.Table:
    """All rows of one committed partition, parts in name order."""
    path = partition_dir(out, table, run_date)
    if not (path / SUCCESS_MARKER).exists():
        raise PartitionError(f"{path} is not a committed partition (no {SUCCESS_MARKER})")
    parts = sorted(path.glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in parts])
