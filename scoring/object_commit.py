"""The partition commit on object storage, where no directory can be renamed into place: the
``parquet`` table format on a URL, kept for tables written before ``delta`` became the default
there (:mod:`scoring.delta_table`); its readers also read a Delta table.

An output root that is a URL (``s3://bucket/scores``) is laid out so that one small object,
written last with one PUT, decides what a reader sees::

    <table>/_parts/run_date=YYYY-MM-DD/<run_id>/part-<shard>-<seq>.parquet   a run's parts
    <table>/_commits/run_date=YYYY-MM-DD.json                                 the commit record
    _runs/<run_id>.json                                                       the run's record

Shards write their parts under a prefix no other run uses. The planner checks that every part is
there with the rows the shards reported, then PUTs the date's commit record naming the run, every
part and its row count: a PUT replaces an object whole and S3, GCS and Azure read it back strongly
consistent, so a reader that reads the record sees the old run or the new one, never half of one
nor both. The replaced run's parts are deleted after the PUT (a reader that listed them before
gets "not found", never a mix); parts no record names (a killed run's) are deleted by a later run
once they are :data:`ORPHAN_GRACE_S` old — a live run elsewhere is never younger than that.

There is no lock: object stores have no lock that dies with its holder, and a lease a killed run
left behind would hold the next night's rerun. Two runs of one date may overlap; the record each
writes is whole, so the last one committed is the partition, whole, and the other run's parts are
never visible. Readers: :func:`table_parts` (URLs, for DuckDB or Spark) and :func:`open_table`
(a pyarrow dataset with the ``run_date`` column), described in ``docs/object_storage.md``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timezone
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from export.storage import (
    ORPHAN_GRACE_S,
    filesystem,
    full_url,
    is_url,
    join,
    modified_time,
    remove_tree,
)
from scoring.errors import PartitionError
from scoring.fault_hook import fault_point

PARTS_DIR = "_parts"
COMMITS_DIR = "_commits"
#: Extra reads of a commit record whose read failed, before that is an error.
READ_TRIES = 3
_RETRY_WAIT_S = 0.2
_READERS = 16  # concurrent footer reads at commit


def parts_prefix(out: str, table: str, run_date: date, run_id: str) -> str:
    return join(out, table, PARTS_DIR, f"run_date={run_date.isoformat()}", run_id)


def record_url(out: str, table: str, run_date: date) -> str:
    return join(out, table, COMMITS_DIR, f"run_date={run_date.isoformat()}.json")


def read_commit(url: str) -> dict | None:
    """A commit record, or None when the date has none (or an unreadable one)."""
    fs, path = filesystem(url)
    try:
        record = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as err:
        raise PartitionError(f"{url}: commit record is not JSON ({err})") from None
    return record if isinstance(record, dict) else None


def part_rows(prefix: str) -> dict[str, int]:
    """``{part name: rows}`` of the Parquet parts under a run's prefix, footers read at once."""
    fs, root = filesystem(prefix)
    paths = sorted(fs.glob(f"{root}/part-*.parquet"))

    def rows(path: str) -> int:
        with fs.open(path, "rb") as f:
            return pq.read_metadata(f).num_rows

    with ThreadPoolExecutor(_READERS) as pool:
        return dict(zip((PurePosixPath(p).name for p in paths), pool.map(rows, paths),
                        strict=True))


def remove_shard_parts(prefix: str, shard: int) -> None:
    """What an earlier attempt of this shard wrote (a retried shard replaces its parts)."""
    fs, root = filesystem(prefix)
    stale = fs.glob(f"{root}/part-{shard:05d}-*.parquet")
    if stale:
        fs.rm(stale)


def commit_record(out: str, table: str, run_date: date, run_id: str, parts: dict[str, int],
                  metadata: dict[str, str]) -> tuple[str, int]:
    """PUT the record that makes a run's parts the partition of its date; then delete the parts
    of the run it replaced. Returns ``(record URL, rows)``."""
    url = record_url(out, table, run_date)
    prefix = parts_prefix(out, table, run_date, run_id)
    base = join(out, table)
    rows = sum(parts.values())
    body = {
        "format": 1, "table": table, "run_date": run_date.isoformat(), "run_id": run_id,
        "files": len(parts), "rows": rows,
        "parts": [{"path": f"{prefix[len(base) + 1:]}/{name}", "rows": n}
                  for name, n in sorted(parts.items())],
        "model_name": metadata["lensflow.model_name"],
        "model_version": metadata["lensflow.model_version"],
        "bundle_sha256": metadata["lensflow.bundle_sha256"],
        "committed_at": datetime.now(timezone.utc).isoformat(),
    }
    previous = read_commit(url)
    fault_point("before-swap")
    fs, path = filesystem(url)
    fs.pipe_file(path, (json.dumps(body, indent=1) + "\n").encode())
    fault_point("after-swap")
    if previous and previous.get("run_id") != run_id:
        remove_tree(parts_prefix(out, table, run_date, previous["run_id"]))
    return url, rows


def commit_pending(pending, expected_shards) -> tuple[str, str, int, int]:
    """Commit a pending partition's parts by their record (every expected shard's parts there);
    ``(record URL, run id, files, rows)``."""
    parts = part_rows(pending.temp_dir)
    if not parts and expected_shards is None:
        raise PartitionError(f"{pending.temp_dir}: no parts (was this partition already "
                             "committed or aborted?)")
    if expected_shards is not None:
        missing = [s for s in expected_shards if not any(name.startswith(f"part-{s:05d}-")
                                                         for name in parts)]
        if missing:
            raise PartitionError(f"{pending.temp_dir}: no part from shard(s) {missing}")
    meta = {k.decode(): v.decode() for k, v in (pending.schema.metadata or {}).items()}
    url, rows = commit_record(pending.out, pending.table, pending.run_date, pending.run_id,
                              parts, meta)
    return url, pending.run_id, len(parts), rows


def discard_run(out: str, table: str, run_date: date, run_id: str) -> None:
    """Delete a run's parts (an aborted run; never a committed one)."""
    record = read_commit(record_url(out, table, run_date))
    if record and record.get("run_id") == run_id:
        return
    remove_tree(parts_prefix(out, table, run_date, run_id))


def clear_dead_runs(out: str, table: str, *, grace_s: float = ORPHAN_GRACE_S) -> list[str]:
    """Delete the parts of runs no commit record names, once their newest part is ``grace_s``
    old; returns the run prefixes removed."""
    fs, root = filesystem(join(out, table, PARTS_DIR))
    newest: dict[str, float] = {}
    for path, info in fs.find(root, detail=True).items():
        rel = PurePosixPath(path).relative_to(root).parts
        if len(rel) < 3:
            continue
        run = f"{rel[0]}/{rel[1]}"
        newest[run] = max(newest.get(run, 0.0), modified_time(info))
    commits_fs, commits_root = filesystem(join(out, table, COMMITS_DIR))
    committed_days = {PurePosixPath(p).stem for p in commits_fs.glob(f"{commits_root}/*.json")}
    runs_per_day = Counter(run.split("/")[0] for run in newest)
    removed = []
    now = time.time()
    for run in sorted(newest):
        day, run_id = run.split("/")
        if now - newest[run] < grace_s:
            continue
        # One GET per date only where a date holds more than its committed run's parts.
        if day in committed_days and (runs_per_day[day] == 1 or (read_commit(
                join(out, table, COMMITS_DIR, f"{day}.json")) or {}).get("run_id") == run_id):
            continue
        remove_tree(f"{full_url(fs, root)}/{run}")
        removed.append(run)
    return removed


# --- readers ---------------------------------------------------------------------------------

def committed_records(out: str, table: str) -> list[dict]:
    """The commit record of every date of a table, oldest date first.

    A record whose read fails is read again (:data:`READ_TRIES` more times, a short wait
    between), then is one :class:`PartitionError`: a reader must never see a table with a
    date silently missing.
    """
    fs, root = filesystem(join(out, table, COMMITS_DIR))
    paths = sorted(fs.glob(f"{root}/run_date=*.json"))
    if not paths:
        return []
    fetched = fs.cat(paths, on_error="return")  # concurrent GETs; a failed one is its error
    records = []
    for path in paths:
        raw = fetched.get(path)
        if not isinstance(raw, bytes):
            raw = _read_again(fs, path, raw)
        try:
            record = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise PartitionError(f"{full_url(fs, path)}: commit record is not JSON ({err})") \
                from None
        if not isinstance(record, dict) or not isinstance(record.get("parts"), list):
            raise PartitionError(f"{full_url(fs, path)}: not a commit record (no 'parts' list)")
        records.append(record)
    return records


def _read_again(fs, path: str, error: object) -> bytes:
    """Read a commit record whose first read failed; after the retries, one error line."""
    for attempt in range(READ_TRIES):
        time.sleep(_RETRY_WAIT_S * (attempt + 1))
        try:
            return fs.cat_file(path)
        except Exception as err:  # noqa: BLE001 — any failed GET is retried, then reported
            error = err
    raise PartitionError(
        f"{full_url(fs, path)}: commit record unreadable after {READ_TRIES + 1} tries "
        f"({type(error).__name__}: {error}); the date's rows cannot be listed") from None


def record_parts(out: str, table: str, record: dict) -> list[str]:
    """The part URLs a commit record names."""
    return [join(out, table, part["path"]) for part in record["parts"]]


def table_parts(out: str, table: str) -> list[str]:
    """Every part URL of every committed date of a table: what DuckDB or Spark should read (of a
    Delta table, the files of its newest version, which hold no ``run_date`` column)."""
    from scoring.delta_read import files_by_date
    from scoring.delta_table import is_delta

    if is_delta(out, table):
        return [str(f) for _, files in files_by_date(out, table) for f in files]
    return [url for record in committed_records(out, table)
            for url in record_parts(out, table, record)]


def open_table(out: str, table: str) -> ds.Dataset:
    """The committed rows of a table as a pyarrow dataset, ``run_date`` a column as in a Hive
    read of a local table."""
    from scoring.delta_read import open_dataset
    from scoring.delta_table import is_delta

    if is_delta(out, table):  # the same helper for a table of either format
        return open_dataset(out, table)
    if not is_url(out):
        raise PartitionError(f"{out}: open_table reads object storage; read a local table with "
                             "pyarrow.dataset(..., partitioning='hive')")
    fs, base = filesystem(join(out, table, PARTS_DIR))
    parts = [filesystem(url)[1] for url in table_parts(out, table)]
    return ds.dataset(parts, filesystem=arrow_filesystem(fs), format="parquet",
                      partitioning=ds.partitioning(pa.schema([("run_date", pa.date32())]),
                                                   flavor="hive"),
                      partition_base_dir=base)


def arrow_filesystem(fs) -> pa.fs.FileSystem:
    """An fsspec file system as a pyarrow one."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))
