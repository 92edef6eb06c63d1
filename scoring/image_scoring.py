"""Nightly scoring of an image folder with a bundle, to the ``image_predictions`` Parquet table.

One path, plan → shards → commit (:mod:`scoring.shards`): :func:`plan_image_run` verifies the
bundle and pins its sha256, lists the files and opens the pending partition;
:func:`score_image_shard` scores one shard's files into its parts, wherever it runs;
:func:`finish_image_run` commits. :func:`score_image_folder` does all three, with the shards in
this process unless a ``run_shards`` says otherwise.

Decoding runs in DataLoader worker processes while the runtime scores the previous batch, so the
model rarely waits for JPEGs. One row per image file in sorted path order; a file that cannot be
decoded gets ``error`` and no prediction, and the run goes on. ``incremental`` skips files whose
(path, size, mtime) an earlier committed partition already scored without error with the same
model version.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from export.bundle import Bundle, load_bundle, resolve_bundle
from export.errors import ExportError
from export.manifest import IMAGE_TASKS
from export.pixels import IMAGE_SUFFIXES, Preprocessing
from export.runtime import Runtime, cuda_present
from export.storage import absolute, is_url
from scoring.bundle_cache import cached_bundle, keep, parity_metadata, where
from scoring.errors import BundleRefError, ImageFolderError
from scoring.image_folder import FolderWalk, ImageFile, walk_folder
from scoring.image_rows import IMAGE_PREDICTIONS_SCHEMA, RowBuilder, already_scored
from scoring.options import ImageScoreOptions, resolve_options
from scoring.partition import PendingPartition, new_run_id, open_partition
from scoring.run_health.gate import HealthCheck, health_line
from scoring.run_health.image_profile import ImageProfiler, pixel_sample
from scoring.shards import (
    Progress,
    RunPlan,
    RunResult,
    RunShards,
    ShardJob,
    ShardResult,
    check_visible,
    commit_run,
    plan_image_shards,
    run_plan,
    runtimes_used,
    shard_runtime,
    with_runtime,
)

if TYPE_CHECKING:  # torch: imported when a shard decodes
    from scoring.image_batches import DecodedBatch

TABLE = "image_predictions"
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreSummary(RunResult):
    """What one image-folder scoring run did."""

    files: int
    scored: int
    failed: int
    skipped_incremental: int
    rows: int
    seconds: float
    images_per_s: float
    partition: str
    run_id: str
    model: str
    runtime: str
    #: Entries the folder walk passed by (symlink loops, vanished files, unreadable folders).
    skipped_walk: int = 0
    #: The run's health against its trailing runs (``RunHealth.report_dict()``), None when off.
    health: dict | None = None

    def health_line(self) -> str:
        """The breaker's one line ("" with run health off)."""
        return health_line(self.health)

    def summary_line(self) -> str:
        walk = f", {self.skipped_walk} passed by in the walk" if self.skipped_walk else ""
        return (
            f"scored {self.scored} of {self.files} images ({self.failed} failed, "
            f"{self.skipped_incremental} skipped as already scored{walk}) with {self.model} via "
            f"{self.runtime} in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s) "
            f"-> {self.partition}"
        )


@dataclass(frozen=True, eq=False)
class ImageRunPlan(RunPlan):
    """The shards of one image-folder run and the partition they fill."""

    files: int
    skipped_incremental: int
    skipped_walk: int = 0

    @property
    def pending(self) -> PendingPartition:
        return self.pendings[0]


@dataclass(frozen=True, eq=False)
class ImageShardJob(ShardJob):
    """Everything a worker needs to score one shard of an image folder (picklable).

    options.workers: DataLoader decoding processes; None: one per spare core in a normal process,
    none inside a daemonic one (a Dask worker), which may not start children.
    threads: ONNX Runtime intra-op threads; None: every core available (on a Dask worker the
    flow sets its ``OMP_NUM_THREADS``).
    """

    folder: str
    files: tuple[ImageFile, ...]
    pending: PendingPartition
    options: ImageScoreOptions
    threads: int | None = None


def score_image_folder(folder: str | Path, model: str | Path, out: str | Path,
                       options: ImageScoreOptions | None = None, *, run_date: date | None = None,
                       run_id: str | None = None, progress: Progress | None = None,
                       run_shards: RunShards | None = None, **overrides) -> ScoreSummary:
    """Score every image under ``folder`` into ``<out>/image_predictions/run_date=.../``.

    overrides: option fields as keywords (``batch_size=8``), applied over ``options``.
    progress: called with ``{"event": "start", "total": n}``, ``{"event": "advance", "n": k}``
    and ``{"event": "end"}``.
    run_shards: where the shards run (:data:`scoring.shards.RunShards`); default here, in turn.
    """
    options = resolve_options(ImageScoreOptions, options, overrides)
    plan = plan_image_run(folder, model, out, options, run_date=run_date, run_id=run_id)
    return run_plan(plan, score_image_shard, finish_image_run, run_shards, progress,
                    health=HealthCheck.from_options(options))


def plan_image_run(folder: str | Path, model: str | Path, out: str | Path,
                   options: ImageScoreOptions | None = None, *, run_date: date | None = None,
                   run_id: str | None = None, threads: int | None = None) -> ImageRunPlan:
    """Verify the bundle, list the files, open the partition; one job per non-empty shard."""
    started = time.time()
    options = options or ImageScoreOptions()
    run_date = run_date or datetime.now(timezone.utc).date()
    # Absolute paths: a worker's working directory is not the planner's.
    folder, out = absolute(folder), absolute(out)
    bundle = keep(open_image_bundle(model))
    parity = parity_metadata(bundle, model, options.allow_failed_parity)
    walk, to_score = files_to_score(folder, out, bundle, run_date,
                                    incremental=options.incremental)
    files = walk.files
    # The parts of each shard overwrite "runtime" with the runtime and device that really ran.
    pending = open_partition(out, TABLE, run_date, IMAGE_PREDICTIONS_SCHEMA,
                             partition_metadata(bundle, f"{options.runtime}/{options.device}")
                             | parity,
                             run_id=run_id or new_run_id(), options=options)
    jobs = tuple(
        ImageShardJob(shard=shard, folder=str(folder), files=tuple(part),
                      bundle_path=bundle.ref, bundle_sha256=bundle.sha256,
                      pending=pending, options=options, threads=threads)
        for shard, part in plan_image_shards(to_score, options.shards or 1))
    return ImageRunPlan(jobs, (pending,), len(to_score), f"{bundle.name}/{bundle.version}", started,
                        files=len(files), skipped_incremental=len(files) - len(to_score),
                        skipped_walk=len(walk.skipped))


def score_image_shard(job: ImageShardJob, progress: Progress | None = None) -> ShardResult:
    """Score the shard's files into ``part-<shard>-*.parquet`` of the pending partition.

    progress: called with ``{"event": "advance", "n": k}`` after each batch.
    """
    started = time.perf_counter()
    check_visible(job.pending)
    if job.files and not is_url(job.folder) and not Path(job.folder).is_dir():
        raise ImageFolderError(f"folder {job.folder}: not visible on {where()} (every worker "
                               f"must see the images at the same path)")
    bundle = cached_bundle(job.bundle_path, job.bundle_sha256, open_image_bundle)
    files, options = list(job.files), job.options
    workers = 0 if multiprocessing.current_process().daemon else options.workers
    spec = Preprocessing.from_dict(bundle.manifest["preprocessing"])
    # torch: imported by a shard, so that planning (and its one-line refusals) runs without it.
    from scoring.image_batches import decoded_batches, gpu_decoded_batches

    profiled = options.on_drift != "off"
    if options.gpu_decode and options.device != "cpu" and cuda_present():
        batches = gpu_decoded_batches(files, spec, options.batch_size)
    else:  # decoding workers start now, while the runtime loads (a no-op when it is cached)
        batches = decoded_batches(files, spec, options.batch_size, workers,
                                  measure_inputs=profiled)
    rt = shard_runtime(bundle, options.runtime, options.device, job.threads)
    builder = RowBuilder(bundle, top_k=options.top_k, output=score_output_name(rt.output_names))
    profiler = ImageProfiler(builder.task, builder.classes, builder.thresholds) \
        if profiled else None
    pending = with_runtime(job.pending, rt)
    with pending.part_writer(job.shard) as writer:
        scored, failed = write_scored_batches(batches, files, rt, builder, writer,
                                              progress or (lambda event: None), profiler)
    return ShardResult(job.shard, len(files), scored, failed, {pending.table: writer.rows},
                       round(time.perf_counter() - started, 3), rt.describe(), where(),
                       profile=profiler.profile() if profiler else None)


def finish_image_run(plan: ImageRunPlan, results: list[ShardResult]) -> ScoreSummary:
    """Commit the partition once every shard is in; the run's summary."""
    committed = commit_run(plan, results)[TABLE]
    seconds = time.time() - plan.started_at
    scored = sum(r.scored for r in results)
    return ScoreSummary(
        files=plan.files, scored=scored, failed=sum(r.failed for r in results),
        skipped_incremental=plan.skipped_incremental, skipped_walk=plan.skipped_walk,
        rows=committed.rows,
        seconds=round(seconds, 3), images_per_s=round(scored / seconds, 2) if seconds else 0.0,
        partition=str(committed.path), run_id=committed.run_id, model=plan.model,
        runtime=runtimes_used(results),
        health=plan.health.report_dict() if plan.health is not None else None)


def open_image_bundle(model_ref: str | Path) -> Bundle:
    """Resolve an image bundle and run every check of :func:`export.bundle.load_bundle` on it
    (digest record, ``current``'s pin, signature, every file inside the bundle and hashed);
    any problem is one :class:`BundleRefError` line.

    The runtime hashes the graph it loads once more, from the very bytes it loads
    (:func:`export.runtime.open_bundle_graph`), so a file swapped after this check is not run.
    """
    try:
        bundle = load_bundle(resolve_bundle(model_ref))
    except ExportError as err:
        message = str(err) if str(model_ref) in str(err) else f"model {model_ref}: {err}"
        raise BundleRefError(message) from None
    if bundle.task not in IMAGE_TASKS:
        raise BundleRefError(
            f"model {model_ref}: task {bundle.task!r} is not an image task "
            f"({', '.join(IMAGE_TASKS)})")
    pre = bundle.manifest.get("preprocessing") or {}
    if not {"input_size", "resize_size"} <= pre.keys():
        raise BundleRefError(f"model {model_ref}: manifest has no preprocessing input/resize size")
    return bundle


def files_to_score(folder: str | Path, out: str | Path, bundle: Bundle, run_date: date, *,
                   incremental: bool) -> tuple[FolderWalk, list[ImageFile]]:
    """(the walk of ``folder``: its image files and what it passed by; the files to score).

    incremental: leave out files an earlier committed partition scored with this model version.
    """
    walk = walk_folder(folder)
    if walk.skipped:
        _log.warning("%s: %s", folder, walk.skip_line())
    files = list(walk.files)
    if not files:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ImageFolderError(f"{folder}: no image files ({suffixes}) in it or below it")
    if not incremental:
        return walk, files
    done = already_scored(out, TABLE, bundle, exclude_date=run_date, files=files)
    return walk, [f for f in files if (f.relpath, f.size, f.mtime_ns // 1000) not in done]


def partition_metadata(bundle: Bundle, runtime: str) -> dict[str, str]:
    """Key/value metadata of every ``image_predictions`` part: the model and the runtime."""
    return {"model_name": bundle.name, "model_version": bundle.version,
            "bundle_sha256": bundle.sha256, "task": bundle.task, "runtime": runtime}


def write_scored_batches(batches: Iterable[DecodedBatch], files: list[ImageFile], rt: Runtime,
                         builder: RowBuilder, writer, notify: Callable[[dict], None],
                         profiler: ImageProfiler | None = None) -> tuple[int, int]:
    """Run each decoded batch through the graph and write its rows; (scored, failed) files.

    writer: anything with ``write(columns)`` (a shard's ``PartWriter``).
    profiler: gathers the run-health profile of what was written, batch by batch.
    """
    scored = failed = 0
    for batch in batches:
        outputs = rt.run(batch.images)[builder.output] if len(batch.indices) else None
        columns = builder.rows(files, batch, outputs)
        writer.write(columns)
        if profiler is not None:
            profile_batch(profiler, files, batch, outputs, columns)
        scored += len(batch.indices)
        failed += len(batch.failed)
        notify({"event": "advance", "n": len(batch.indices) + len(batch.failed)})
    return scored, failed


def profile_batch(profiler: ImageProfiler, files: list[ImageFile], batch: DecodedBatch,
                  outputs, columns: dict[str, list]) -> None:
    """Add one written batch to the shard's profile (from what is already in memory)."""
    good = batch.indices.tolist()
    values = [v for v in columns["outputs"] if v is not None] if profiler.task == "regression" \
        else None
    profiler.add([files[i].size for i in good], batch.pixels,
                 pixel_sample(batch.images) if good else None, batch.failed,
                 outputs if good else None, values)


def score_output_name(names: list[str]) -> str:
    """The graph output that holds the scores: ``scores`` when named so, else the first."""
    if "scores" in names:
        return "scores"
    return names[0]
