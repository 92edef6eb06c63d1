"""Hive-partitioned Parquet output: one writer per partition, an all-or-nothing commit per run date.

Layout under an output root ``<out>``::

    <table>/run_date=YYYY-MM-DD/part-<shard>-<seq>.parquet, _SUCCESS   what readers see
    _staging/<table>/run_date=YYYY-MM-DD/<run_id>/                      a run's parts, until commit
    _staging/<table>/run_date=YYYY-MM-DD.lock                          the writer's lock
    _runs/<run_id>.json                                                 a run's record (shards.py)

Staging sits outside every table directory, so no reader's glob (``<out>/<table>/*/*.parquet``,
pyarrow or Spark discovery) lists it, yet on the same file system, so the finished directory moves
into place with one rename: the Hadoop ``FileOutputCommitter`` idea, ``_SUCCESS`` written last.
An earlier partition of the date is swapped out with one ``renameat2(RENAME_EXCHANGE)`` on Linux,
so some complete partition is visible at every instant; elsewhere it is renamed aside first, and a
crash between the two renames is repaired (the old partition put back) by the next run. A
replacement numbers its parts after the partition it replaces, so a reader that listed the old
files and opens them after the swap gets "file not found", never a mix of the two runs.

One writer per (table, date): the planner holds an exclusive ``flock`` on the lock file from
:func:`open_partition` to the commit or abort; the kernel drops it when the process dies, however
it dies. A second run fails at once naming the holder. Every :func:`open_partition` also removes
the staging of dead runs (lock free) of every table and date of its output root. Several
processes may fill one partition: each shard writes its own parts through
:meth:`PendingPartition.part_writer` (:mod:`scoring.part_writer`), and the planner commits once
all shards are done.

The ``delta`` table format (the default for an output root that is a URL) commits the same parts
to a Delta Lake table instead, in one log commit per table and run (:mod:`scoring.delta_table`);
``parquet`` on a URL is the earlier commit record (:mod:`scoring.object_commit`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from datetime import date, datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from export.pins import fsync_path
from export.storage import filesystem, is_url, join, ref_text
from scoring import delta_read, delta_table, object_commit
from scoring.errors import PartitionError
from scoring.fault_hook import fault_point
from scoring.options import RuntimeOptions
from scoring.part_writer import IN_PROGRESS_SUFFIX, PartWriter
from scoring.staging import (
    STAGING_DIR,
    SUCCESS_MARKER,
    clear_dead_runs,
    clear_legacy_staging,
    clear_staging,
    lock_partition,
    swap_into_place,
    unlock,
)

REQUIRED_METADATA = ("model_name", "model_version", "bundle_sha256")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_PART_SEQ = re.compile(r"part-\d+-(\d+)\.parquet")


def new_run_id() -> str:
    """A sortable, unique run id: UTC timestamp plus 8 random hex digits."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def partition_dir(out: str | Path, table: str, run_date: date) -> Path | str:
    """A local partition's directory; on object storage, the date's commit record."""
    if is_url(out):
        return object_commit.record_url(ref_text(out), table, run_date)
    return Path(out) / table / f"run_date={run_date.isoformat()}"


@dataclass(frozen=True)
class CommittedPartition:
    """What a commit made visible: a partition directory, or an object store's commit record."""

    path: Path | str
    run_id: str
    files: int
    rows: int
    #: The Delta table version the run's commit made (None: a ``parquet`` partition).
    version: int | None = None

    def to_dict(self) -> dict:
        return asdict(self) | {"path": str(self.path)}

    def record_fields(self) -> dict:
        """What a run record adds for this partition beyond path, files and rows."""
        return {} if self.version is None else {"format": "delta", "version": self.version}


@dataclass(frozen=True)
class PendingPartition:
    """A partition being filled: its staging directory and the schema (with metadata) of parts.

    Picklable, so a flow can hand it to shard tasks running in other processes or machines that see
    the same file system (or the same object store: ``out`` a URL). first_seq: the first part
    number, past those of the partition it will replace.
    """

    out: Path | str
    table: str
    run_date: date
    run_id: str
    schema: pa.Schema
    rows_per_file: int = 1_000_000
    row_group_rows: int = 65_536
    first_seq: int = 0
    #: ``parquet`` (rename, or a commit record on a URL) or ``delta`` (a Delta Lake commit).
    table_format: str = "parquet"
    #: delta: the table version and a digest of the date's files when the run was planned.
    base_version: int = -1
    base_files: str = ""
    evolve_schema: bool = False
    #: The run's options as JSON, for the commit's lineage.
    lineage: str = "{}"

    @property
    def delta(self) -> bool:
        return self.table_format == "delta"

    @property
    def remote(self) -> bool:
        """Whether the table lives on object storage (commit by record, not rename)."""
        return is_url(self.out)

    @property
    def table_dir(self) -> Path | str:
        return join(self.out, self.table)

    @property
    def final_dir(self) -> Path | str:
        return partition_dir(self.out, self.table, self.run_date)

    @property
    def staging_dir(self) -> Path:
        """Where every run of this table and date stages (its runs' directories, ``.old``)."""
        return self.out / STAGING_DIR / self.table / f"run_date={self.run_date.isoformat()}"

    @property
    def temp_dir(self) -> Path | str:
        """Where this run's parts are written (on object storage, where they stay)."""
        if self.delta:
            return delta_table.run_prefix(self)
        if self.remote:
            return object_commit.parts_prefix(self.out, self.table, self.run_date, self.run_id)
        return self.staging_dir / self.run_id

    @property
    def lock_path(self) -> Path:
        return self.staging_dir.with_name(self.staging_dir.name + ".lock")

    def part_writer(self, shard: int) -> PartWriter:
        """Writer of ``part-{shard:05d}-{seq:04d}.parquet``; a retried shard replaces its parts."""
        if shard < 0:
            raise PartitionError(f"shard must be >= 0, got {shard}")
        prefix = f"part-{shard:05d}-"
        if self.remote:
            object_commit.remove_shard_parts(self.temp_dir, shard)
            return PartWriter(self, lambda seq: f"{prefix}{seq:04d}.parquet")
        for stale in self.temp_dir.glob(f"{prefix}*"):
            stale.unlink()
        for stale in self.temp_dir.glob(f".{prefix}*"):
            stale.unlink()
        return PartWriter(self, lambda seq: f"{prefix}{self.first_seq + seq:04d}.parquet")


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
    options: RuntimeOptions | None = None,
) -> PendingPartition:
    """Take the partition's lock, clear what dead runs left, create this run's staging directory.

    A partition another live run is writing is a :class:`PartitionError` naming that run. On
    object storage (``out`` a URL) nothing is locked and the parts of dead runs are deleted once
    old enough (:func:`scoring.object_commit.clear_dead_runs`). options: the run's options, whose
    ``table_format`` and ``schema_evolution`` apply here (a delta table is not locked: see
    :mod:`scoring.delta_table`).
    """
    run_id = run_id or new_run_id()
    if not _RUN_ID.fullmatch(run_id):
        raise PartitionError(f"run_id {run_id!r} may hold only letters, digits, '_', '.', '-'")
    if rows_per_file < 1:
        raise PartitionError(f"rows_per_file must be >= 1, got {rows_per_file}")
    pending = PendingPartition(
        out=ref_text(out) if is_url(out) else Path(out),
        table=table,
        run_date=run_date,
        run_id=run_id,
        schema=_with_lensflow_metadata(schema, metadata, table, run_date, run_id),
        rows_per_file=rows_per_file,
        table_format=delta_table.table_format_for(out, options),
        evolve_schema=bool(options and options.schema_evolution),
        lineage=delta_table.options_lineage(options),
    )
    if pending.delta:
        _check_out(pending.out)
        pending = replace(pending, **delta_table.plan_fields(pending, pending.evolve_schema))
        delta_table.prepare_run_dir(pending)
        return pending
    if pending.remote:
        object_commit.clear_dead_runs(pending.out, table)
        return pending
    _make_dirs(pending.out, [pending.table_dir, pending.lock_path.parent])
    lock_partition(pending)
    try:
        clear_staging(pending.final_dir, pending.staging_dir)
        clear_legacy_staging(pending.table_dir)
        clear_dead_runs(pending.out)
        pending = replace(pending, first_seq=_next_seq(pending.final_dir))
        pending.temp_dir.mkdir(parents=True)
    except BaseException:
        unlock(pending.lock_path)
        raise
    return pending


def _check_out(out: str | Path) -> None:
    if not is_url(out):
        _make_dirs(Path(out), [Path(out)])


def _make_dirs(out: Path, dirs: list[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise PartitionError(f"out {out}: is a file, not a directory")
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PartitionError(f"out {out}: cannot create {d}: {err.strerror}") from None
    if not os.access(out, os.W_OK):
        raise PartitionError(f"out {out}: not writable")


def _next_seq(final: Path) -> int:
    seqs = [int(m.group(1)) for p in final.glob("part-*.parquet")
            if (m := _PART_SEQ.fullmatch(p.name))]
    return max(seqs) + 1 if seqs else 0


def commit_partition(
    pending: PendingPartition, *, expected_shards: Iterable[int] | None = None,
    release: bool = True,
) -> CommittedPartition:
    """Make the filled staging directory the partition of its date, replacing any earlier one.

    expected_shards: shard numbers that must each have written at least one part.
    release: drop the partition's lock once committed (a multi-table run keeps every lock until
    its run record is written, then calls :func:`release_partition`).
    """
    if pending.delta:
        return commit_delta(pending, expected_shards)
    if pending.remote:
        return CommittedPartition(*object_commit.commit_pending(pending, expected_shards))
    temp = pending.temp_dir
    if not temp.is_dir():
        raise PartitionError(f"{temp} is gone: was this partition already committed or aborted?")
    writing = sorted(p.name for p in temp.glob(f".*{IN_PROGRESS_SUFFIX}"))
    if writing:
        raise PartitionError(f"{temp}: parts still being written or left by a crash: {writing[0]}")
    parts = sorted(temp.glob("part-*.parquet"))
    if expected_shards is not None:
        missing = [s for s in expected_shards if not any(temp.glob(f"part-{s:05d}-*.parquet"))]
        if missing:
            raise PartitionError(f"{temp}: no part from shard(s) {missing}")
    rows = sum(pq.read_metadata(p).num_rows for p in parts)
    _write_success(temp, pending, parts, rows)
    for path in [*parts, temp / SUCCESS_MARKER]:
        fsync_path(path)
    fsync_path(temp)
    fault_point("before-swap")
    swap_into_place(temp, pending.final_dir)
    fsync_path(pending.table_dir)
    fault_point("after-swap")
    if release:
        release_partition(pending)
    return CommittedPartition(pending.final_dir, pending.run_id, len(parts), rows)


def commit_delta(pending: PendingPartition, expected_shards: Iterable[int] | None = None,
                 expected_rows: int | None = None) -> CommittedPartition:
    """One Delta commit of the run's parts, replacing the date (:mod:`scoring.delta_table`)."""
    uri, version, files, rows = delta_table.commit_run_parts(
        pending, None if expected_shards is None else list(expected_shards), expected_rows)
    return CommittedPartition(uri, pending.run_id, files, rows, version)


def abort_partition(pending: PendingPartition) -> None:
    """Discard everything written for this run and free the partition; the visible one stays."""
    if pending.delta:
        delta_table.discard_run(pending)
        return
    if pending.remote:
        object_commit.discard_run(pending.out, pending.table, pending.run_date, pending.run_id)
        return
    shutil.rmtree(pending.temp_dir, ignore_errors=True)
    release_partition(pending)


def release_partition(pending: PendingPartition) -> None:
    """Let the next run of this table and date start (a no-op outside the planner's process)."""
    if pending.remote or pending.delta:
        return
    unlock(pending.lock_path)


def _write_success(temp: Path, pending: PendingPartition, parts: list[Path], rows: int) -> None:
    meta = {k.decode(): v.decode() for k, v in (pending.schema.metadata or {}).items()}
    body = {
        "run_id": pending.run_id,
        "table": pending.table,
        "run_date": pending.run_date.isoformat(),
        "files": len(parts),
        "rows": rows,
        "parts": [p.name for p in parts],
        "model_name": meta["lensflow.model_name"],
        "model_version": meta["lensflow.model_version"],
        "bundle_sha256": meta["lensflow.bundle_sha256"],
        "committed_at": datetime.now(timezone.utc).isoformat(),
    }
    (temp / SUCCESS_MARKER).write_text(json.dumps(body) + "\n")


def committed_partitions(out: str | Path, table: str) -> list[Path]:
    """Visible partition directories of a table that carry ``_SUCCESS``, oldest date first
    (local tables; see :func:`committed_part_files` for any table)."""
    table_dir = Path(out) / table
    if not table_dir.is_dir():
        return []
    return sorted(
        p for p in table_dir.glob("run_date=*") if p.is_dir() and (p / SUCCESS_MARKER).exists()
    )


def committed_part_files(out: str | Path, table: str) -> list[tuple[str, list[Path | str]]]:
    """``(run_date=..., its part files)`` of every committed partition, oldest date first, on a
    local disk or object storage, of either table format."""
    if delta_table.is_delta(out, table):
        return delta_read.files_by_date(out, table)
    if is_url(out):
        return [(f"run_date={r['run_date']}", object_commit.record_parts(ref_text(out), table, r))
                for r in object_commit.committed_records(ref_text(out), table)]
    return [(p.name, sorted(p.glob("part-*.parquet"))) for p in committed_partitions(out, table)]


def open_input(part: Path | str):
    """A file opened for reading: a local path as is, a URL through its file system."""
    if not is_url(part):
        return part
    fs, path = filesystem(part)
    return fs.open(path, "rb")


def read_partition(
    out: str | Path, table: str, run_date: date, columns: list[str] | None = None
) -> pa.Table:
    """All rows of one committed partition, parts in name order (a Delta table's date as it
    is now)."""
    if delta_table.is_delta(out, table):
        return delta_read.read_date(out, table, run_date, columns)
    if is_url(out):
        record = object_commit.read_commit(partition_dir(out, table, run_date))
        if record is None:
            raise PartitionError(f"{partition_dir(out, table, run_date)}: no commit record")
        parts = object_commit.record_parts(ref_text(out), table, record)
        return pa.concat_tables([pq.read_table(open_input(p), columns=columns) for p in parts])
    path = partition_dir(out, table, run_date)
    if not (path / SUCCESS_MARKER).exists():
        raise PartitionError(f"{path} is not a committed partition (no {SUCCESS_MARKER})")
    parts = sorted(path.glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in parts])
