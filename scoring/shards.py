"""Shards of a scoring run: plan them, and score one into its parts of a pending partition.

Scale-out is the MapReduce shape (Dean & Ghemawat, 2004) with Hadoop's output committer: a
planner splits the input into shards, any process that sees the same file system scores a shard
into ``part-<shard>-<seq>.parquet`` files of the run's hidden temporary directory
(:meth:`scoring.partition.PendingPartition.part_writer`), and the planner commits the partition
once every shard is in. A retried shard (its worker died, its disk hiccupped) first deletes its
own earlier parts, so the committed partition holds every row exactly once.

- Image folders split by a stable hash of each file's relative path: for a given shard count the
  same file always lands in the same shard, whatever else the folder holds or the order it was
  listed in, and whichever machine plans.
- User tables split into contiguous blocks of the users to score, so parts in shard order list
  users in the same order as a single-process run.

Workers keep verified bundles and loaded runtimes per process (:mod:`scoring.bundle_cache`).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from export.bundle import Bundle
from scoring.bundle_cache import cached_bundle, cached_for, where
from scoring.errors import ImageFolderError, PartitionError, ScoringError
from scoring.image_folder import ImageFile
from scoring.image_rows import RowBuilder
from scoring.image_scoring import (
    decoded_batches,
    open_image_bundle,
    score_output_name,
    write_scored_batches,
)
from scoring.partition import PendingPartition
from scoring.recommendations import (
    CollabVocab,
    SeenItems,
    open_collab_bundle,
    users_per_block,
    write_user_blocks,
)
from scoring.runtime import Runtime, open_runtime


def shard_of(relpath: str, shards: int) -> int:
    """The shard of a file: BLAKE2b of its relative path (UTF-8) modulo ``shards``.

    Python's ``hash()`` is salted per process; this is the same on every machine and run.
    """
    digest = hashlib.blake2b(relpath.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def plan_image_shards(files: Sequence[ImageFile], shards: int) -> list[tuple[int, list[ImageFile]]]:
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


@dataclass(frozen=True)
class ShardResult:
    """What one shard wrote: rows per table, and where it ran."""

    shard: int
    items: int
    scored: int
    failed: int
    rows: dict[str, int]
    seconds: float
    runtime: str
    worker: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ImageShardJob:
    """Everything a worker needs to score one shard of an image folder (picklable).

    workers: DataLoader decoding processes; None: one per spare core in a normal process, none
    inside a daemonic one (a Dask worker), which may not start children.
    threads: ONNX Runtime intra-op threads; None: a Dask worker's ``OMP_NUM_THREADS`` (its nanny
    sets 1: one core per worker thread), elsewhere every core available.
    """

    shard: int
    folder: str
    files: tuple[ImageFile, ...]
    bundle_path: str
    bundle_sha256: str
    pending: PendingPartition
    batch_size: int = 64
    workers: int | None = None
    runtime: str = "onnx"
    device: str = "auto"
    top_k: int = 5
    threads: int | None = None


@dataclass(frozen=True, eq=False)
class UserShardJob:
    """Everything a worker needs to score one block of users (picklable).

    users: dense user indices of the bundle's vocabulary, in output order.
    topk, full: the pending partitions of ``recommendations_topk`` / ``_full`` (None: skip).
    """

    shard: int
    users: np.ndarray
    bundle_path: str
    bundle_sha256: str
    topk: PendingPartition | None
    full: PendingPartition | None
    top_k: int = 10
    block_size: int = 1024
    runtime: str = "onnx"
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.topk is None and self.full is None:
            raise ScoringError(f"shard {self.shard}: neither a top-k nor a full table to write")


def score_image_shard(job: ImageShardJob,
                      progress: Callable[[dict], None] | None = None) -> ShardResult:
    """Score the shard's files into ``part-<shard>-*.parquet`` of the pending partition.

    progress: called with ``{"event": "advance", "n": k}`` after each batch.
    """
    started = time.perf_counter()
    _check_visible(job.pending)
    if job.files and not Path(job.folder).is_dir():
        raise ImageFolderError(f"folder {job.folder}: not visible on {where()} (every worker "
                               f"must see the images at the same path)")
    bundle = cached_bundle(job.bundle_path, job.bundle_sha256, open_image_bundle)
    files = list(job.files)
    workers = 0 if multiprocessing.current_process().daemon else job.workers
    # Decoding workers start now, while the runtime loads (a no-op when it is cached).
    batches = decoded_batches(files, bundle, job.batch_size, workers)
    rt = _runtime(bundle, job.runtime, job.device, "model", job.threads)
    builder = RowBuilder(bundle, top_k=job.top_k, output=score_output_name(rt.output_names))
    pending = _with_runtime(job.pending, rt)
    with pending.part_writer(job.shard) as writer:
        scored, failed = write_scored_batches(batches, files, rt, builder, writer,
                                              progress or (lambda event: None))
    return ShardResult(job.shard, len(files), scored, failed, {pending.table: writer.rows},
                       round(time.perf_counter() - started, 3), rt.describe(), where())


def score_user_shard(job: UserShardJob,
                     progress: Callable[[dict], None] | None = None) -> ShardResult:
    """Score the shard's users into ``part-<shard>-*.parquet`` of each pending partition.

    progress: called with ``{"event": "advance", "n": k}`` after each block of users.
    """
    started = time.perf_counter()
    for pending in (job.topk, job.full):
        if pending is not None:
            _check_visible(pending)
    bundle = cached_bundle(job.bundle_path, job.bundle_sha256, open_collab_bundle)
    vocab = cached_for(bundle, ("vocab",), lambda: CollabVocab.from_manifest(bundle.manifest))
    seen = cached_for(bundle, ("seen",),
                      lambda: SeenItems.from_bundle(bundle, len(vocab.users), len(vocab.items))) \
        if job.topk is not None else None
    rt = _runtime(bundle, job.runtime, job.device, "model", job.threads)
    block = users_per_block(bundle.manifest, len(vocab.items), job.block_size)
    topk_out = _with_runtime(job.topk, rt).part_writer(job.shard) if job.topk else None
    full_out = _with_runtime(job.full, rt).part_writer(job.shard) if job.full else None
    writers = [w for w in (topk_out, full_out) if w is not None]
    try:
        write_user_blocks(rt, vocab, job.users, block, seen, job.top_k, topk_out, full_out,
                          progress or (lambda event: None))
        for w in writers:
            w.close()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    rows = {w.pending.table: w.rows for w in writers}
    return ShardResult(job.shard, len(job.users), len(job.users), 0, rows,
                       round(time.perf_counter() - started, 3), rt.describe(), where())


def _runtime(bundle: Bundle, kind: str, device: str, graph: str, threads: int | None) -> Runtime:
    threads = threads or _dask_worker_threads()
    return cached_for(bundle, ("runtime", kind, device, graph, threads),
                      lambda: open_runtime(bundle, kind, device, graph, threads=threads))


def _dask_worker_threads() -> int | None:
    """``OMP_NUM_THREADS`` inside a Dask worker (its nanny sets it to spread cores over worker
    threads), else None: a runtime elsewhere uses every core, as a single-process run does."""
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return None
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return None


def _with_runtime(pending: PendingPartition, rt: Runtime) -> PendingPartition:
    """The pending partition whose parts name the runtime that really ran this shard."""
    metadata = dict(pending.schema.metadata or {})
    metadata[b"lensflow.runtime"] = rt.describe().encode()
    return replace(pending, schema=pending.schema.with_metadata(metadata))


def _check_visible(pending: PendingPartition) -> None:
    if not pending.temp_dir.is_dir():
        raise PartitionError(f"{pending.temp_dir}: not visible on {where()} (out must be on "
                             f"storage every worker mounts at the same path)")
