"""Nightly recommendation scoring from a collab bundle alone: top-k per user and the full table.

One path, plan → shards → commit (:mod:`scoring.shards`): :func:`plan_rec_run` verifies the
bundle, chooses the users and opens the pending partition(s), one job per contiguous block of
users; :func:`score_user_shard` scores a block wherever it runs; :func:`finish_rec_run` commits
the top-k (then the full) partition. :func:`score_recommendations` does all three, with the shards
in this process unless a ``run_shards`` says otherwise.

Users are scored in blocks through the bundle's ``model`` graph (int64 user indices (B,) →
``scores`` (B, n_items)), so memory is one block of scores whatever the number of users; the
tables' rows are built by :mod:`scoring.rec_tables`. Every file carries the model name, version,
bundle sha256 and run id in its metadata.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np

from export.bundle import Bundle, load_bundle, resolve_bundle
from export.errors import ExportError
from export.runtime import Runtime
from export.storage import absolute
from scoring.bundle_cache import cached_bundle, cached_for, keep, parity_metadata, where
from scoring.errors import BundleRefError, ScoringError
from scoring.options import RecScoreOptions, resolve_options
from scoring.partition import PendingPartition, abort_partition, new_run_id, open_partition
from scoring.rec_tables import (
    FULL_TABLE,
    TOPK_TABLE,
    CollabVocab,
    SeenItems,
    UnknownUserError,
    full_rows,
    full_schema,
    select_users,
    topk_rows,
    topk_schema,
)
from scoring.run_health.gate import HealthCheck, health_line
from scoring.run_health.profile import Distribution, RunProfile
from scoring.run_health.rec_profile import RecProfiler
from scoring.shards import (
    Progress,
    RunPlan,
    RunResult,
    RunShards,
    ShardJob,
    ShardResult,
    check_visible,
    commit_run,
    plan_user_shards,
    run_plan,
    runtimes_used,
    shard_runtime,
    with_runtime,
)

__all__ = ["FULL_TABLE", "TOPK_TABLE", "RecScoreSummary", "UnknownUserError", "full_schema",
           "score_recommendations", "topk_schema"]
#: Scores held per block (64 MiB of float32): caps users per block on wide catalogues.
MAX_BLOCK_SCORES = 1 << 24


@dataclass(frozen=True)
class RecScoreSummary(RunResult):
    """What one recommendation scoring run did."""

    users_scored: int
    unknown_users: int
    items: int
    top_k: int
    topk_rows: int
    full_rows: int
    seconds: float
    rows_per_s: float
    topk_partition: str | None
    full_partition: str | None
    run_id: str
    model: str
    runtime: str
    #: The run's health against its trailing runs (``RunHealth.report_dict()``), None when off.
    health: dict | None = None

    def health_line(self) -> str:
        """The breaker's one line ("" with run health off)."""
        return health_line(self.health)

    def summary_line(self) -> str:
        full = f", {self.full_rows:,} full-table rows -> {self.full_partition}" \
            if self.full_partition else ""
        topk = f"top-{self.top_k} ({self.topk_rows:,} rows) -> {self.topk_partition}" \
            if self.topk_partition else "no top-k"
        return (f"scored {self.users_scored:,} users × {self.items:,} items "
                f"({self.unknown_users} unknown skipped) with {self.model} via {self.runtime} in "
                f"{self.seconds:.1f} s: {topk}{full}")


@dataclass(frozen=True, eq=False)
class UserShardJob(ShardJob):
    """Everything a worker needs to score one block of users (picklable).

    users: dense user indices of the bundle's vocabulary, in output order.
    topk, full: the pending partitions of ``recommendations_topk`` / ``_full`` (None: skip).
    threads: as :class:`scoring.image_scoring.ImageShardJob`.
    """

    users: np.ndarray
    topk: PendingPartition | None
    full: PendingPartition | None
    options: RecScoreOptions
    threads: int | None = None


@dataclass(frozen=True, eq=False)
class RecRunPlan(RunPlan):
    """The user shards of one recommendation run and the partitions they fill."""

    unknown_users: int
    items: int
    top_k: int


def score_recommendations(model: str | Path, out: str | Path,
                          options: RecScoreOptions | None = None, *,
                          run_date: date | None = None, run_id: str | None = None,
                          progress: Progress | None = None, run_shards: RunShards | None = None,
                          **overrides) -> RecScoreSummary:
    """Write ``recommendations_topk`` (and with ``full_table`` ``recommendations_full``).

    overrides: option fields as keywords (``top_k=3``), applied over ``options``; ``users`` may
    be a file of raw user ids (one per line) or a list of ids.
    progress: called with ``{"event": "start", "total": users}``, ``{"event": "advance",
        "n": k}`` and ``{"event": "end"}``.
    run_shards: where the shards run (:data:`scoring.shards.RunShards`); default here, in turn.
    """
    options = resolve_options(RecScoreOptions, options, overrides)
    plan = plan_rec_run(model, out, options, run_date=run_date, run_id=run_id)
    return run_plan(plan, score_user_shard, finish_rec_run, run_shards, progress,
                    health=HealthCheck.from_options(options, extra=users_skipped))


def users_skipped(plan: RecRunPlan) -> RunProfile:
    """The planner's part of a run's profile: the users it skipped as unknown."""
    return RunProfile((Distribution.categorical("recommendations.users",
                                                {"unknown": plan.unknown_users}),))


def plan_rec_run(model: str | Path, out: str | Path, options: RecScoreOptions | None = None, *,
                 run_date: date | None = None, run_id: str | None = None,
                 threads: int | None = None) -> RecRunPlan:
    """Verify the bundle, choose the users, open the partition(s); one job per user block."""
    started = time.time()
    options = options or RecScoreOptions()
    if options.top_k == 0 and not options.full_table:
        raise ScoringError(f"need top_k >= 1 or full_table (got top_k={options.top_k}, "
                           f"full_table={options.full_table})")
    run_date = run_date or datetime.now(timezone.utc).date()
    run_id = run_id or new_run_id()
    out = absolute(out)
    bundle = keep(open_collab_bundle(model))
    parity = parity_metadata(bundle, model, options.allow_failed_parity)
    vocab = CollabVocab.from_manifest(bundle.manifest)
    chosen, unknown = select_users(vocab, options.users, strict=options.strict)
    meta = partition_metadata(bundle, f"{options.runtime}/{options.device}", vocab.id_type,
                              options.top_k) | parity
    topk = open_partition(out, TOPK_TABLE, run_date, topk_schema(vocab.id_type), meta,
                          run_id=run_id, options=options) if options.top_k else None
    try:
        full = open_partition(out, FULL_TABLE, run_date, full_schema(vocab.id_type), meta,
                              run_id=run_id, options=options) if options.full_table else None
    except BaseException:
        if topk is not None:  # a long-lived flow process must not keep the top-k date locked
            abort_partition(topk)
        raise
    jobs = tuple(
        UserShardJob(shard=shard, users=block, bundle_path=bundle.ref,
                     bundle_sha256=bundle.sha256, topk=topk, full=full, options=options,
                     threads=threads)
        for shard, block in plan_user_shards(np.asarray(chosen), options.shards or 1))
    return RecRunPlan(jobs, tuple(p for p in (topk, full) if p is not None), len(chosen),
                      f"{bundle.name}/{bundle.version}", started, unknown_users=unknown,
                      items=len(vocab.items), top_k=options.top_k)


def score_user_shard(job: UserShardJob, progress: Progress | None = None) -> ShardResult:
    """Score the shard's users into ``part-<shard>-*.parquet`` of each pending partition.

    progress: called with ``{"event": "advance", "n": k}`` after each block of users.
    """
    started = time.perf_counter()
    for pending in (job.topk, job.full):
        if pending is not None:
            check_visible(pending)
    bundle = cached_bundle(job.bundle_path, job.bundle_sha256, open_collab_bundle)
    vocab = cached_for(bundle, ("vocab",), lambda: CollabVocab.from_manifest(bundle.manifest))
    seen = cached_for(bundle, ("seen",),
                      lambda: SeenItems.from_bundle(bundle, len(vocab.users), len(vocab.items))) \
        if job.topk is not None else None
    rt = shard_runtime(bundle, job.options.runtime, job.options.device, job.threads)
    block = users_per_block(bundle.manifest, len(vocab.items), job.options.block_size)
    topk_out = with_runtime(job.topk, rt).part_writer(job.shard) if job.topk else None
    full_out = with_runtime(job.full, rt).part_writer(job.shard) if job.full else None
    writers = [w for w in (topk_out, full_out) if w is not None]
    profiler = RecProfiler(len(vocab.items)) if job.options.on_drift != "off" else None
    try:
        write_user_blocks(rt, vocab, job.users, block, seen, job.options.top_k, topk_out,
                          full_out, progress or (lambda event: None), profiler)
        for w in writers:
            w.close()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    rows = {w.pending.table: w.rows for w in writers}
    return ShardResult(job.shard, len(job.users), len(job.users), 0, rows,
                       round(time.perf_counter() - started, 3), rt.describe(), where(),
                       profile=profiler.profile() if profiler else None)


def finish_rec_run(plan: RecRunPlan, results: list[ShardResult]) -> RecScoreSummary:
    """Commit the top-k (then the full) partition once every shard is in; the run's summary."""
    committed = commit_run(plan, results)
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
        run_id=plan.pendings[0].run_id, model=plan.model, runtime=runtimes_used(results),
        health=plan.health.report_dict() if plan.health is not None else None)


def open_collab_bundle(model_ref: str | Path) -> Bundle:
    """Resolve and verify a recommender bundle; any problem is one :class:`BundleRefError`."""
    try:
        bundle = load_bundle(resolve_bundle(model_ref))
    except ExportError as err:
        raise BundleRefError(f"model {model_ref}: {err}") from None
    if bundle.task != "collab":
        raise BundleRefError(f"model {model_ref}: task {bundle.task!r} is not 'collab'")
    for key in ("users", "items"):
        if not isinstance(bundle.manifest.get(key), list):
            raise BundleRefError(f"model {model_ref}: manifest has no '{key}' vocabulary")
    return bundle


def partition_metadata(bundle: Bundle, runtime: str, id_type: str, top_k: int) -> dict[str, str]:
    """Key/value metadata of every part of both tables: the model, runtime, id type and k."""
    return {"model_name": bundle.name, "model_version": bundle.version,
            "bundle_sha256": bundle.sha256, "task": "collab", "runtime": runtime,
            "id_type": id_type, "top_k": str(top_k)}


def write_user_blocks(rt: Runtime, vocab: CollabVocab, users: np.ndarray, block: int,
                      seen: SeenItems | None, top_k: int, topk_out, full_out,
                      notify: Progress, profiler: RecProfiler | None = None) -> None:
    """Score ``users`` ``block`` at a time and write each block's rows.

    topk_out, full_out: writers (``write(batch)``) of either table, or None to skip it.
    profiler: gathers the run-health profile of the written rows.
    """
    for lo in range(0, len(users), block):
        users_block = users[lo:lo + block]
        scores = rt.run(users_block)["scores"]
        if full_out is not None:
            full_out.write(full_rows(vocab, users_block, scores))
            if profiler is not None and topk_out is None:
                profiler.add(len(users_block), None, scores)
        if topk_out is not None:
            rows = topk_rows(vocab, users_block, scores, seen, top_k,
                             may_modify=full_out is None)
            topk_out.write(rows)
            if profiler is not None:
                profiler.add(len(users_block), rows, None)
        notify({"event": "advance", "n": len(users_block)})


def users_per_block(manifest: dict, n_items: int, block_size: int) -> int:
    """Users per block: ``block_size``, fewer when a block's scores would pass the cap.

    The MLP model materialises (users, items, hidden) activations inside its graph, so its cap
    is divided by the hidden width.
    """
    model = manifest.get("model") or {}
    width = int(model.get("nn_hidden", 1)) if model.get("use_nn") else 1
    return max(1, min(block_size, MAX_BLOCK_SCORES // max(1, n_items * width)))
