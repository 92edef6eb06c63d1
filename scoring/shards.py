"""Shards of a scoring run: plan them, run them anywhere, commit the run once.

Every scoring run has the MapReduce shape (Dean & Ghemawat, 2004) with Hadoop's output committer:
a planner splits the input into shards, any process that sees the same file system scores a shard
into ``part-<shard>-<seq>.parquet`` files of the run's hidden temporary directory
(:meth:`scoring.partition.PendingPartition.part_writer`), and the planner commits the partition
once every shard is in. A retried shard (its worker died, its disk hiccupped) first deletes its
own earlier parts, so the committed partition holds every row exactly once. A run in one process
is the same run with its shards scored one after another (:func:`shards_in_process`); threads or
a Dask cluster only change where the shards run (a ``run_shards`` callable).

- Image folders split by a stable hash of each file's relative path: for a given shard count the
  same file always lands in the same shard, whatever else the folder holds or the order it was
  listed in, and whichever machine plans.
- User tables split into contiguous blocks of the users to score, so parts in shard order list
  users in the same order as a single-shard run.

Workers keep verified bundles and loaded runtimes per process (:mod:`scoring.bundle_cache`).

A run is one commit: it commits its partitions one after another (each one rename), then writes
its record ``<out>/_runs/<run_id>.json`` last, atomically — run id, date, model, bundle sha256,
times, and every partition with its files and rows. A downstream job that needs every table from
one run reads :func:`current_run`: the newest record of the date whose partitions all still carry
its run id in their ``_SUCCESS``. A run killed between two partitions leaves no record.
On object storage the record is one PUT, and a partition is "still visible" while its date's
commit record names the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow.parquet as pq

from export.bundle import Bundle
from export.errors import BundleIntegrityError
from export.runtime import Runtime, open_bundle_graph
from export.runtime import RuntimeUnavailableError as ExportRuntimeError
from export.storage import filesystem, is_url, join, ref_text
from scoring import object_commit
from scoring.bundle_cache import cached_for, where
from scoring.delta_read import run_still_current
from scoring.errors import BundleRefError, PartitionError, RuntimeUnavailableError, ScoringError
from scoring.fault_hook import fault_point
from scoring.image_folder import ImageFile
from scoring.partition import (
    CommittedPartition,
    PendingPartition,
    abort_partition,
    commit_delta,
    commit_partition,
    release_partition,
)
from scoring.run_health.profile import RunProfile
from scoring.staging import SUCCESS_MARKER

RUNS_DIR = "_runs"
Progress = Callable[[dict], None]
Summary = TypeVar("Summary")


class RunResult:
    """Base of the frozen dataclasses a run reports (shard results, run summaries): they
    serialise to Prefect artifacts and flow results as plain dicts."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ShardResult(RunResult):
    """What one shard wrote: rows per table, and where it ran."""

    shard: int
    items: int
    scored: int
    failed: int
    rows: dict[str, int]
    seconds: float
    runtime: str
    worker: str
    #: What the shard scored, profiled (scoring.run_health); None when run health is off.
    profile: RunProfile | None = field(default=None, kw_only=True)


@dataclass(frozen=True, eq=False)
class ShardJob:
    """What every shard job names: its number, and the bundle (path and pinned manifest sha256)
    that every shard of the run must score with."""

    shard: int
    bundle_path: str
    bundle_sha256: str


@dataclass(frozen=True, eq=False)
class RunPlan:
    """A planned run: one picklable job per shard, the pending partitions they fill, and how
    many files or users they score in all."""

    jobs: tuple
    pendings: tuple[PendingPartition, ...]
    to_score: int
    model: str
    started_at: float
    #: The run's health (scoring.run_health.gate.RunHealth), judged after the shards; the run
    #: record stores it.
    health: Any = field(default=None, kw_only=True)


#: ``run_shards(score_shard, jobs, progress)``: call ``score_shard(job, progress)`` for every
#: job, wherever, and return the results in job order.
RunShards = Callable[[Callable[..., ShardResult], Sequence[Any], Progress], list[ShardResult]]


def shards_in_process(score_shard: Callable[..., ShardResult], jobs: Sequence[Any],
                      progress: Progress) -> list[ShardResult]:
    """The default ``run_shards``: every shard in this process, one after another."""
    return [score_shard(job, progress) for job in jobs]


def run_plan(plan: RunPlan, score_shard: Callable[..., ShardResult],
             finish: Callable[[Any, Sequence[ShardResult]], Summary],
             run_shards: RunShards | None = None, progress: Progress | None = None,
             health: Any = None) -> Summary:
    """Run every shard of ``plan`` with ``run_shards``, then ``finish`` (commit) it; any failure
    drops what the shards wrote.

    health: a :class:`scoring.run_health.gate.HealthCheck`, which judges the shards' profiles
    before the commit (a refused run raises, and nothing is committed) and writes the run's
    ``run_health`` rows after it.

    progress: called with ``{"event": "start", "total": n}``, ``{"event": "advance", "n": k}``
    and ``{"event": "end"}``.
    """
    notify = progress or _ignore
    notify({"event": "start", "total": plan.to_score})
    try:
        results = (run_shards or shards_in_process)(score_shard, plan.jobs, notify)
        if health is not None:
            plan = replace(plan, health=health.judge(plan, results))
        summary = finish(plan, results)
    except BaseException:
        abort_run(plan)
        raise
    if health is not None:
        health.record(plan)
    notify({"event": "end"})
    return summary


def _ignore(event: dict) -> None:
    pass


def commit_run(plan: RunPlan, results: Sequence[ShardResult]) -> dict[str, CommittedPartition]:
    """Commit every partition of the plan once each planned shard reported in, then write the
    run's record; by table. The partitions stay locked until the record is written."""
    shards = [job.shard for job in plan.jobs]
    try:
        got = sorted(r.shard for r in results)
        if got != sorted(shards):
            raise ScoringError(f"shard results {got} do not match the planned shards "
                               f"{sorted(shards)}")
        committed = {p.table: _commit(p, shards, results) for p in plan.pendings}
        fault_point("before-record")
        write_run_record(plan, committed)
    except BaseException:
        abort_run(plan)
        raise
    for pending in plan.pendings:
        release_partition(pending)
    return committed


def _relative(path: Path | str, out: Path | str) -> str:
    if is_url(out):
        return str(path)[len(str(out)) + 1:]
    return str(Path(path).relative_to(out))


def write_run_record(plan: RunPlan, committed: dict[str, CommittedPartition]) -> Path | str:
    """``<out>/_runs/<run_id>.json``, written to a temporary name, synced, then renamed."""
    first = plan.pendings[0]
    meta = {k.decode(): v.decode() for k, v in (first.schema.metadata or {}).items()}
    record = {
        "run_id": first.run_id,
        "run_date": first.run_date.isoformat(),
        "model": plan.model,
        "bundle_sha256": meta["lensflow.bundle_sha256"],
        "started_at": datetime.fromtimestamp(plan.started_at, timezone.utc).isoformat(),
        "committed_at": datetime.now(timezone.utc).isoformat(),
        "host": socket.gethostname(),
        "partitions": {table: {"path": _relative(c.path, first.out), "files": c.files,
                               "rows": c.rows, **c.record_fields()}
                       for table, c in committed.items()},
    }
    if plan.health is not None:  # the next runs' baseline reads its profile from here
        record["health"] = plan.health.to_dict()
    if first.remote:  # one PUT: whole or absent
        url = join(first.out, RUNS_DIR, f"{first.run_id}.json")
        fs, path = filesystem(url)
        fs.pipe_file(path, (json.dumps(record, indent=1) + "\n").encode())
        return url
    runs = first.out / RUNS_DIR
    runs.mkdir(exist_ok=True)
    path, temp = runs / f"{first.run_id}.json", runs / f".{first.run_id}.json.tmp"
    with open(temp, "w") as f:
        f.write(json.dumps(record, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    fd = os.open(runs, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def current_run(out: str | Path, run_date: date, tables: Sequence[str] = ()) -> dict | None:
    """The record of the newest complete run of ``run_date`` that wrote every one of ``tables``:
    complete while every partition it committed still holds its rows (its ``_SUCCESS`` names the
    run id). None if there is none."""
    records = []
    for text in _run_records(out):
        try:
            records.append(json.loads(text))
        except ValueError:
            continue
    for record in sorted(records, key=lambda r: r.get("committed_at", ""), reverse=True):
        if (record.get("run_date") == run_date.isoformat()
                and set(tables) <= set(record.get("partitions", {}))
                and _still_visible(out, record)):
            return record
    return None


def _run_records(out: str | Path) -> list[bytes]:
    if is_url(out):
        fs, root = filesystem(join(ref_text(out), RUNS_DIR))
        paths = fs.glob(f"{root}/*.json")
        return list(fs.cat(paths).values()) if paths else []
    texts = []
    for path in Path(out).glob(f"{RUNS_DIR}/*.json"):
        try:
            texts.append(path.read_bytes())
        except OSError:
            continue
    return texts


def _still_visible(out: str | Path, record: dict) -> bool:
    delta = {t: p for t, p in record["partitions"].items() if p.get("format") == "delta"}
    if delta:  # a run writes every table in one format
        day = date.fromisoformat(record["run_date"])
        return all(run_still_current(out, table, day, record["run_id"], int(part["version"]))
                   for table, part in delta.items())
    if is_url(out):
        return all((object_commit.read_commit(join(ref_text(out), part["path"])) or {})
                   .get("run_id") == record["run_id"] for part in record["partitions"].values())
    for part in record["partitions"].values():
        try:
            success = json.loads((Path(out) / part["path"] / SUCCESS_MARKER).read_text())
        except (OSError, ValueError):
            return False
        if success.get("run_id") != record["run_id"]:
            return False
    return True


def abort_run(plan: RunPlan) -> None:
    """Drop every part the shards wrote; the visible partitions stay as they were."""
    for pending in plan.pendings:
        abort_partition(pending)


def _commit(pending: PendingPartition, shards: list[int],
            results: Sequence[ShardResult]) -> CommittedPartition:
    """Commit after checking the parts hold exactly the rows the shards reported: a stale part
    of a failed attempt would otherwise duplicate rows."""
    expected = sum(r.rows.get(pending.table, 0) for r in results)
    if pending.delta:  # the footers are read once, by the commit
        return commit_delta(pending, shards, expected)
    if pending.remote:
        found = sum(object_commit.part_rows(pending.temp_dir).values())
    else:
        parts = sorted(pending.temp_dir.glob("part-*.parquet"))
        found = sum(pq.read_metadata(p).num_rows for p in parts)
    if found != expected:
        raise PartitionError(f"{pending.temp_dir}: parts hold {found} rows but the shards wrote "
                             f"{expected}; not committing")
    return commit_partition(pending, expected_shards=shards, release=False)


def runtimes_used(results: Sequence[ShardResult]) -> str:
    """The runtimes (``kind/device``) the shards of a run really ran on."""
    return ", ".join(sorted({r.runtime for r in results}))


def shard_of(relpath: str, shards: int) -> int:
    """The shard of a file: BLAKE2b of its relative path (UTF-8) modulo ``shards``.

    Python's ``hash()`` is salted per process; this is the same on every machine and run.
    """
    digest = hashlib.blake2b(relpath.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def plan_image_shards(files: Sequence[ImageFile], shards: int
                      ) -> list[tuple[int, list[ImageFile]]]:
    """``(shard, files)`` of every non-empty shard, in shard order; files keep their order.

    With no files at all, shard 0 with no files: it still writes the (empty) part that carries
    the schema.
    """
    _check_shards(shards)
    buckets: dict[int, list[ImageFile]] = {}
    for f in files:
        buckets.setdefault(shard_of(f.relpath, shards), []).append(f)
    return sorted(buckets.items()) or [(0, [])]


def plan_user_shards(users: np.ndarray, shards: int) -> list[tuple[int, np.ndarray]]:
    """``(shard, users)``: contiguous blocks of near-equal size, at most one per user."""
    _check_shards(shards)
    blocks = np.array_split(np.asarray(users, dtype=np.int64), max(1, min(shards, len(users))))
    return list(enumerate(blocks))


def _check_shards(shards: int) -> None:
    if shards < 1:
        raise ScoringError(f"shards must be >= 1, got {shards}")


def shard_runtime(bundle: Bundle, kind: str, device: str, threads: int | None) -> Runtime:
    """The bundle's ``model`` graph in ``kind`` on ``device``, loaded once per process.

    threads: ONNX Runtime intra-op threads (default every core this process may use).
    """

    def load() -> Runtime:
        try:
            return open_bundle_graph(bundle, kind, device, "model", threads=threads)
        except ExportRuntimeError as err:
            raise RuntimeUnavailableError(str(err)) from None
        except BundleIntegrityError as err:  # the graph's bytes are not the exported ones
            raise BundleRefError(str(err)) from None

    return cached_for(bundle, ("runtime", kind, device, "model", threads), load)


def with_runtime(pending: PendingPartition, rt: Runtime) -> PendingPartition:
    """The pending partition whose parts name the runtime that really ran this shard."""
    metadata = dict(pending.schema.metadata or {})
    metadata[b"lensflow.runtime"] = rt.describe().encode()
    return replace(pending, schema=pending.schema.with_metadata(metadata))


def check_visible(pending: PendingPartition) -> None:
    """Refuse to score into a temporary directory this process cannot see (object storage is
    seen alike from everywhere)."""
    if not pending.remote and not pending.temp_dir.is_dir():
        raise PartitionError(f"{pending.temp_dir}: not visible on {where()} (out must be on "
                             f"storage every worker mounts at the same path)")
