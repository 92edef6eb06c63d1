"""The ``delta`` table format: a scoring run's parts committed to a Delta Lake table in one
transaction, on local disk or any object store (``deltalake``, the Rust implementation: no JVM,
no catalog, no lock table; S3 commits with conditional PUTs).

Layout of a table ``<out>/<table>`` (partitioned by ``run_date``)::

    _delta_log/<version>.json, *.checkpoint.parquet        the transaction log
    run_date=YYYY-MM-DD/<run_id>/part-<shard>-<seq>.parquet  a run's parts

Shards write their parts under a prefix of their run (:mod:`scoring.part_writer`, unchanged):
files no log entry names, which no Delta reader lists. The planner then commits exactly the files
the shards reported — every part's rows read from its footer and checked against the shards' —
as ``add`` actions of one ``WRITE`` commit that also removes the date's earlier files (a
``replaceWhere`` of ``run_date``). Each commit carries the run's lineage (run id, model, bundle
sha256, host, options) in its commit info, so ``DeltaTable.history()`` says who wrote a date.

Two runs of one date: the pending partition remembers the table version and the date's files it
saw at plan time; the commit is attempted on a fresh snapshot with no automatic rebase
(``max_commit_retries=0``), and retried on a newer one only while the date's files are still those
it saw. So of two overlapping runs of one date the first to commit wins and the other fails with
one line; runs of other dates never conflict. A failed or killed run's files stay invisible and
are deleted by :func:`scoring.delta_maintenance.vacuum` once older than its retention.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from export.storage import (
    as_local,
    filesystem,
    is_url,
    join,
    modified_time,
    ref_text,
    remove_tree,
)
from scoring.errors import PartitionError
from scoring.fault_hook import fault_point
from scoring.part_writer import IN_PROGRESS_SUFFIX

if TYPE_CHECKING:
    from deltalake import DeltaTable

    from scoring.options import RuntimeOptions
    from scoring.partition import PendingPartition

PARTITION_COLUMN = "run_date"
DELTA_LOG = "_delta_log"
#: Commits attempted on ever newer snapshots while other dates' runs commit in between.
COMMIT_TRIES = 30
LINEAGE_PREFIX = "lensflow."
#: A checkpoint every this many commits (Delta's default is 100: a nightly table's reader would
#: replay up to 100 JSON commits, each one GET on object storage).
CHECKPOINT_INTERVAL = 10
_READERS = 16  # concurrent footer reads at commit


def table_format_for(out: str | Path, options: RuntimeOptions | None) -> str:
    """The run's table format: as asked, else ``delta`` on object storage, ``parquet`` on disk."""
    asked = options.table_format if options is not None else None
    return asked or ("delta" if is_url(out) else "parquet")


def options_lineage(options: RuntimeOptions | None) -> str:
    """The options as JSON for a commit's lineage (a list of user ids as its length)."""
    if options is None:
        return "{}"
    values = options.model_dump(mode="json")
    if isinstance(values.get("users"), list):
        values["users"] = f"{len(values['users'])} ids"
    return json.dumps(values, sort_keys=True)


def table_uri(out: str | Path, table: str) -> str:
    """Where a table lives, as deltalake takes it: a URL, or an absolute local path."""
    return join(ref_text(out), table) if is_url(out) else str(as_local(out).absolute() / table)


def storage_options(uri: str) -> dict[str, str]:
    """What deltalake needs beyond the environment it reads itself (``AWS_*``): the endpoint
    fsspec's own setting names, and plain HTTP for an ``http://`` endpoint (MinIO, tests)."""
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or os.environ.get("FSSPEC_S3_ENDPOINT_URL"))
    options = {}
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    return options


def open_delta(uri: str, version: int | None = None) -> DeltaTable | None:
    """The table at ``uri`` (its newest version, or ``version``), or None where there is none."""
    from deltalake import DeltaTable

    options = storage_options(uri)
    if not DeltaTable.is_deltatable(uri, options):
        return None
    return DeltaTable(uri, version=version, storage_options=options)


def is_delta(out: str | Path, table: str) -> bool:
    """Whether ``<out>/<table>`` is a Delta table (has a transaction log)."""
    if is_url(out):
        fs, path = filesystem(join(table_uri(out, table), DELTA_LOG))
        return bool(fs.exists(path))
    return (as_local(out) / table / DELTA_LOG).is_dir()


def delta_schema(schema: pa.Schema) -> pa.Schema:
    """A run's part schema as the table's: no key/value metadata, ``run_date`` appended."""
    return pa.schema([f.remove_metadata() for f in schema] +
                     [pa.field(PARTITION_COLUMN, pa.date32())])


def date_files(dt: DeltaTable, run_date: date) -> list[str]:
    """The files (absolute paths or URLs) of one date in the table's snapshot, in name order."""
    return sorted(dt.file_uris([(PARTITION_COLUMN, "=", run_date.isoformat())]))


def files_digest(files: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(files)).encode()).hexdigest()


def plan_fields(pending: PendingPartition, evolve: bool) -> dict:
    """What a pending partition remembers of the table at plan time (its version and the date's
    files); refuses a run whose columns would change the table unless ``evolve``."""
    uri = table_uri(pending.out, pending.table)
    dt = open_delta(uri)
    if dt is None:
        return {"base_version": -1, "base_files": files_digest([])}
    check_schema(uri, dt, pending.schema, evolve)
    return {"base_version": dt.version(), "base_files": files_digest(date_files(dt,
                                                                                pending.run_date))}


def check_schema(uri: str, dt: DeltaTable, schema: pa.Schema, evolve: bool) -> None:
    """One line naming the first column that differs, unless schema evolution was asked for."""
    from deltalake import Schema

    theirs = _column_types(dt.schema())
    ours = _column_types(Schema.from_arrow(delta_schema(schema)))
    if evolve or list(theirs.items()) == list(ours.items()):
        return
    diff = next((f"column {n!r}: table {theirs.get(n, 'absent')}, run {ours.get(n, 'absent')}"
                 for n in [*ours, *theirs] if theirs.get(n) != ours.get(n)),
                "column order differs")
    raise PartitionError(f"delta table {uri}: this run's schema would change the table "
                         f"({diff}); not writing (schema_evolution=true allows it)")


def _column_types(schema) -> dict[str, str]:
    """``{column: Delta type}`` (``string``, ``array<string>``, ``timestamp``...)."""
    def text(kind) -> str:
        if isinstance(kind, str):
            return kind
        if kind.get("type") == "array":
            return f"array<{text(kind['elementType'])}>"
        return json.dumps(kind, sort_keys=True)

    return {f["name"]: text(f["type"]) for f in json.loads(schema.to_json())["fields"]}


def run_prefix(pending: PendingPartition) -> str | Path:
    """Where a run's parts go inside the table: no log entry names them until the commit."""
    return join(pending.out, pending.table, f"{PARTITION_COLUMN}={pending.run_date.isoformat()}",
                pending.run_id)


def prepare_run_dir(pending: PendingPartition) -> None:
    if not is_url(pending.out):
        try:
            Path(run_prefix(pending)).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PartitionError(f"out {pending.out}: cannot create {run_prefix(pending)}: "
                                 f"{err.strerror}") from None


def discard_run(pending: PendingPartition) -> None:
    """Delete an uncommitted run's parts (never named by the log, so never visible)."""
    prefix = run_prefix(pending)
    if is_url(pending.out):
        remove_tree(str(prefix))
    else:
        import shutil

        shutil.rmtree(prefix, ignore_errors=True)


def run_parts(pending: PendingPartition) -> list[tuple[str, int, int, int]]:
    """``(name, bytes, rows, mtime ms)`` of every finished part of the run, footers read at once;
    a part still being written (or left so by a crash) is a :class:`PartitionError`."""
    prefix = run_prefix(pending)
    if is_url(pending.out):
        fs, root = filesystem(str(prefix))
        listed = fs.find(root, detail=True)
    else:
        import fsspec

        fs, root = fsspec.filesystem("file"), str(prefix)
        listed = fs.find(root, detail=True) if Path(root).is_dir() else {}
    writing = [PurePosixPath(p).name for p in listed if p.endswith(IN_PROGRESS_SUFFIX)]
    if writing:
        raise PartitionError(f"{prefix}: parts still being written or left by a crash: "
                             f"{writing[0]}")
    paths = sorted(p for p in listed if PurePosixPath(p).name.startswith("part-")
                   and p.endswith(".parquet"))

    def rows(path: str) -> int:
        with fs.open(path, "rb") as f:
            return pq.read_metadata(f).num_rows

    with ThreadPoolExecutor(_READERS) as pool:
        counts = list(pool.map(rows, paths))
    return [(PurePosixPath(p).name, int(listed[p]["size"]), n,
             int(modified_time(listed[p]) * 1000)) for p, n in zip(paths, counts, strict=True)]


def lineage(pending: PendingPartition, rows: int, files: int) -> dict[str, str]:
    """The commit info a run adds to the log: who wrote this date, with what, how."""
    meta = {k.decode(): v.decode() for k, v in (pending.schema.metadata or {}).items()
            if k.decode().startswith(LINEAGE_PREFIX)}
    meta.pop("lensflow.runtime", None)  # the planned one; each part names the one that ran
    return meta | {
        "lensflow.run_id": pending.run_id, "lensflow.table": pending.table,
        "lensflow.run_date": pending.run_date.isoformat(), "lensflow.rows": str(rows),
        "lensflow.files": str(files), "lensflow.host": socket.gethostname(),
        "lensflow.options": pending.lineage,
    }


def commit_run_parts(pending: PendingPartition, expected_shards: list[int] | None,
                     expected_rows: int | None) -> tuple[str, int, int, int]:
    """Commit the run's parts as the date's files in one Delta commit; ``(table URI, version,
    files, rows)``. The rows in the parts' footers must equal ``expected_rows``."""
    parts = run_parts(pending)
    if expected_shards is not None:
        missing = [s for s in expected_shards
                   if not any(name.startswith(f"part-{s:05d}-") for name, *_ in parts)]
        if missing:
            raise PartitionError(f"{run_prefix(pending)}: no part from shard(s) {missing}")
    rows = sum(n for _, _, n, _ in parts)
    if expected_rows is not None and rows != expected_rows:
        raise PartitionError(f"{run_prefix(pending)}: parts hold {rows} rows but the shards "
                             f"wrote {expected_rows}; not committing")
    from deltalake.transaction import AddAction

    day = pending.run_date.isoformat()
    base = f"{PARTITION_COLUMN}={day}/{pending.run_id}"
    actions = [AddAction(f"{base}/{name}", size, {PARTITION_COLUMN: day}, mtime, True,
                         json.dumps({"numRecords": n}))
               for name, size, n, mtime in parts]
    version = _commit_actions(pending, actions, lineage(pending, rows, len(parts)))
    return table_uri(pending.out, pending.table), version, len(parts), rows


def _commit_actions(pending: PendingPartition, actions: list, info: dict[str, str]) -> int:
    """One ``WRITE`` commit replacing the date, on the newest snapshot; retried on a newer one
    while only other dates changed, refused once this date changed since the run was planned."""
    from deltalake import CommitProperties
    from deltalake.exceptions import CommitFailedError

    uri = table_uri(pending.out, pending.table)
    schema = delta_schema(pending.schema)
    day = pending.run_date.isoformat()
    for _ in range(COMMIT_TRIES):
        dt = _table_for_commit(uri, schema)
        check_schema(uri, dt, pending.schema, pending.evolve_schema)
        if files_digest(date_files(dt, pending.run_date)) != pending.base_files:
            raise PartitionError(_overtaken(uri, dt, pending))
        version = dt.version() + 1  # no rebase: the commit lands there or fails
        fault_point("before-swap")
        try:
            dt.create_write_transaction(
                actions, "overwrite", schema, partition_by=[PARTITION_COLUMN],
                partition_filters=[(PARTITION_COLUMN, "=", day)],
                commit_properties=CommitProperties(custom_metadata=info, max_commit_retries=0))
        except CommitFailedError:
            time.sleep(0.05)  # another commit took that version: look again on a newer one
            continue
        fault_point("after-swap")
        return version
    raise PartitionError(f"delta table {uri}: no commit of run_date={day} after {COMMIT_TRIES} "
                         "tries (other runs kept committing); not committed")


def _table_for_commit(uri: str, schema: pa.Schema) -> DeltaTable:
    """The newest snapshot; the table is created (empty, version 0) by the first run to commit."""
    from deltalake import DeltaTable

    dt = open_delta(uri)
    if dt is not None:
        return dt
    try:
        return DeltaTable.create(
            uri, schema, mode="ignore", partition_by=[PARTITION_COLUMN],
            configuration={"delta.checkpointInterval": str(CHECKPOINT_INTERVAL)},
            storage_options=storage_options(uri))
    except Exception:  # noqa: BLE001 — another run created it first: read theirs
        dt = open_delta(uri)
        if dt is None:
            raise
        return dt


def _overtaken(uri: str, dt: DeltaTable, pending: PendingPartition) -> str:
    """The one line of a run whose date another run committed after it was planned."""
    day = pending.run_date.isoformat()
    other = next((h for h in dt.history(max(1, dt.version() - pending.base_version))
                  if h.get("lensflow.run_date") == day), {})
    who = f"run {other['lensflow.run_id']} (version {other['version']})" if other \
        else f"another writer (table version {dt.version()})"
    return (f"{pending.table} run_date={day} under {pending.out} was committed by {who} after "
            f"run {pending.run_id} started; not committing (rerun to replace it)")

