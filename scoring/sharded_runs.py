"""A scoring run cut into shards: plan it, let anything run the shards, commit it once.

``plan_image_run`` / ``plan_rec_run`` do the single-process part — verify the bundle and pin its
sha256, list the files (or choose the users), open the pending partition(s) — and return one
picklable job per shard for :func:`scoring.shards.score_image_shard` /
:func:`scoring.shards.score_user_shard`, run wherever (a loop, threads, a Dask cluster).
``finish_*`` commits only when every planned shard reported in and the parts hold exactly the
rows the shards reported writing; otherwise nothing becomes visible. ``abort_run`` drops what the
shards wrote. The summaries are the ones the single-process scorers return.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from scoring.bundle_cache import keep
from scoring.errors import PartitionError, ScoringError
from scoring.image_rows import IMAGE_PREDICTIONS_SCHEMA
from scoring.image_scoring import (
    TABLE,
    ScoreSummary,
    files_to_score,
    open_image_bundle,
)
from scoring.image_scoring import partition_metadata as image_metadata
from scoring.partition import (
    CommittedPartition,
    PendingPartition,
    abort_partition,
    commit_partition,
    new_run_id,
    open_partition,
)
from scoring.recommendations import (
    FULL_TABLE,
    TOPK_TABLE,
    CollabVocab,
    RecScoreSummary,
    full_schema,
    open_collab_bundle,
    select_users,
    topk_schema,
)
from scoring.recommendations import partition_metadata as rec_metadata
from scoring.shards import (
    ImageShardJob,
    ShardResult,
    UserShardJob,
    plan_image_shards,
    plan_user_shards,
)


@dataclass(frozen=True, eq=False)
class ImageRunPlan:
    """The shards of one image-folder run and the partition they fill."""

    jobs: tuple[ImageShardJob, ...]
    pending: PendingPartition
    files: int
    skipped_incremental: int
    model: str
    started_at: float

    @property
    def to_score(self) -> int:
        return sum(len(job.files) for job in self.jobs)


@dataclass(frozen=True, eq=False)
class RecRunPlan:
    """The user shards of one recommendation run and the partitions they fill."""

    jobs: tuple[UserShardJob, ...]
    topk: PendingPartition | None
    full: PendingPartition | None
    unknown_users: int
    items: int
    top_k: int
    model: str
    started_at: float

    @property
    def to_score(self) -> int:
        return sum(len(job.users) for job in self.jobs)

    @property
    def pendings(self) -> list[PendingPartition]:
        return [p for p in (self.topk, self.full) if p is not None]


def plan_image_run(
    folder: str | Path,
    model_ref: str | Path,
    out: str | Path,
    *,
    shards: int = 1,
    run_date: date | None = None,
    run_id: str | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    runtime: str = "onnx",
    device: str = "auto",
    top_k: int = 5,
    incremental: bool = False,
    threads: int | None = None,
) -> ImageRunPlan:
    """Verify the bundle, list the files, open the partition; one job per non-empty shard."""
    started = time.time()
    _check_positive(batch_size=batch_size, top_k=top_k, shards=shards)
    run_date = run_date or datetime.now(timezone.utc).date()
    # Absolute paths: a worker's working directory is not the planner's.
    folder, out = Path(folder).absolute(), Path(out).absolute()
    bundle = keep(open_image_bundle(model_ref))
    files, to_score = files_to_score(folder, out, bundle, run_date, incremental=incremental)
    # The parts of each shard overwrite "runtime" with the runtime and device that really ran.
    pending = open_partition(out, TABLE, run_date, IMAGE_PREDICTIONS_SCHEMA,
                             image_metadata(bundle, f"{runtime}/{device}"),
                             run_id=run_id or new_run_id())
    jobs = tuple(
        ImageShardJob(shard=shard, folder=str(folder), files=tuple(part),
                      bundle_path=str(bundle.path.absolute()), bundle_sha256=bundle.sha256,
                      pending=pending,
                      batch_size=batch_size, workers=workers, runtime=runtime, device=device,
                      top_k=top_k, threads=threads)
        for shard, part in plan_image_shards(to_score, shards))
    return ImageRunPlan(jobs, pending, len(files), len(files) - len(to_score),
                        f"{bundle.name}/{bundle.version}", started)


def finish_image_run(plan: ImageRunPlan, results: Sequence[ShardResult]) -> ScoreSummary:
    """Commit the partition once every shard is in; the run's summary."""
    try:
        _check_results([job.shard for job in plan.jobs], results)
        committed = _commit(plan.pending, [job.shard for job in plan.jobs], results)
    except BaseException:
        abort_run(plan)
        raise
    seconds = time.time() - plan.started_at
    scored = sum(r.scored for r in results)
    return ScoreSummary(
        files=plan.files, scored=scored, failed=sum(r.failed for r in results),
        skipped_incremental=plan.skipped_incremental, rows=committed.rows,
        seconds=round(seconds, 3), images_per_s=round(scored / seconds, 2) if seconds else 0.0,
        partition=str(committed.path), run_id=committed.run_id, model=plan.model,
        runtime=_runtimes(results))


def plan_rec_run(
    model_ref: str | Path,
    out: str | Path,
    *,
    shards: int = 1,
    top_k: int = 10,
    full_table: bool = False,
    users=None,
    strict: bool = False,
    run_date: date | None = None,
    run_id: str | None = None,
    runtime: str = "onnx",
    device: str = "auto",
    block_size: int = 1024,
    threads: int | None = None,
) -> RecRunPlan:
    """Verify the bundle, choose the users, open the partition(s); one job per user block.

    users, strict: as :func:`scoring.recommendations.score_recommendations`.
    """
    started = time.time()
    _check_positive(block_size=block_size, shards=shards)
    if top_k < 0 or (top_k == 0 and not full_table):
        raise ScoringError(f"need top_k >= 1 or full_table (got top_k={top_k}, "
                           f"full_table={full_table})")
    run_date = run_date or datetime.now(timezone.utc).date()
    run_id = run_id or new_run_id()
    out = Path(out).absolute()
    bundle = keep(open_collab_bundle(model_ref))
    vocab = CollabVocab.from_manifest(bundle.manifest)
    chosen, unknown = select_users(vocab, users, strict=strict)
    meta = rec_metadata(bundle, f"{runtime}/{device}", vocab.id_type, top_k)
    topk = open_partition(out, TOPK_TABLE, run_date, topk_schema(vocab.id_type), meta,
                          run_id=run_id) if top_k else None
    full = open_partition(out, FULL_TABLE, run_date, full_schema(vocab.id_type), meta,
                          run_id=run_id) if full_table else None
    jobs = tuple(
        UserShardJob(shard=shard, users=block, bundle_path=str(bundle.path.absolute()),
                     bundle_sha256=bundle.sha256, topk=topk, full=full, top_k=top_k,
                     block_size=block_size, runtime=runtime, device=device, threads=threads)
        for shard, block in plan_user_shards(np.asarray(chosen), shards))
    return RecRunPlan(jobs, topk, full, unknown, len(vocab.items), top_k,
                      f"{bundle.name}/{bundle.version}", started)


def finish_rec_run(plan: RecRunPlan, results: Sequence[ShardResult]) -> RecScoreSummary:
    """Commit the top-k (then the full) partition once every shard is in; the run's summary."""
    shard_ids = [job.shard for job in plan.jobs]
    committed: dict[str, CommittedPartition] = {}
    try:
        _check_results(shard_ids, results)
        for pending in plan.pendings:
            committed[pending.table] = _commit(pending, shard_ids, results)
    except BaseException:
        abort_run(plan)
        raise
    seconds = time.time() - plan.started_at
    rows = {table: c.rows for table, c in committed.items()}
    topk, full = committed.get(TOPK_TABLE), committed.get(FULL_TABLE)
    return RecScoreSummary(
        users_scored=sum(r.scored for r in results), unknown_users=plan.unknown_users,
        items=plan.items, top_k=plan.top_k, topk_rows=rows.get(TOPK_TABLE, 0),
        full_rows=rows.get(FULL_TABLE, 0), seconds=round(seconds, 3),
        rows_per_s=round(sum(rows.values()) / seconds, 1) if seconds else 0.0,
        topk_partition=str(topk.path) if topk else None,
        full_partition=str(full.path) if full else None,
        run_id=plan.pendings[0].run_id, model=plan.model, runtime=_runtimes(results))


def abort_run(plan: ImageRunPlan | RecRunPlan) -> None:
    """Drop every part the shards wrote; the visible partitions stay as they were."""
    for pending in (plan.pendings if isinstance(plan, RecRunPlan) else [plan.pending]):
        abort_partition(pending)


def _check_results(shards: list[int], results: Sequence[ShardResult]) -> None:
    got = sorted(r.shard for r in results)
    if got != sorted(shards):
        raise ScoringError(f"shard results {got} do not match the planned shards {sorted(shards)}")


def _commit(pending: PendingPartition, shards: list[int],
            results: Sequence[ShardResult]) -> CommittedPartition:
    """Commit after checking the parts hold exactly the rows the shards reported: a stale part
    of a failed attempt would otherwise duplicate rows."""
    expected = sum(r.rows.get(pending.table, 0) for r in results)
    parts = sorted(pending.temp_dir.glob("part-*.parquet"))
    found = sum(pq.read_metadata(p).num_rows for p in parts)
    if found != expected:
        raise PartitionError(f"{pending.temp_dir}: parts hold {found} rows but the shards wrote "
                             f"{expected}; not committing")
    return commit_partition(pending, expected_shards=shards)


def _runtimes(results: Sequence[ShardResult]) -> str:
    return ", ".join(sorted({r.runtime for r in results}))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ScoringError(f"{name} must be >= 1, got {value}")
