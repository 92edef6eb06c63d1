"""Nightly scoring of an image folder with a bundle, to the ``image_predictions`` Parquet table.

Decoding runs in DataLoader worker processes while the runtime scores the previous batch, so the
model rarely waits for JPEGs. One row per image file in sorted path order; a file that cannot be
decoded gets ``error`` and no prediction, and the run goes on. Rows land in one partition per run
date through :mod:`scoring.partition`, so a reader sees the whole night's output or the previous
one. ``incremental`` skips files whose (path, size, mtime) an earlier committed partition already
scored without error with the same model version.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import date, datetime, timezone
from pathlib import Path

from torch.utils.data import DataLoader

from export.bundle import Bundle, load_bundle, resolve_bundle
from export.errors import ExportError
from export.loader_workers import available_cores, worker_context
from export.manifest import IMAGE_TASKS
from export.pixels import IMAGE_SUFFIXES, Preprocessing
from scoring.errors import BundleRefError, ImageFolderError, ScoringError
from scoring.image_folder import (
    DecodedBatch,
    DecodedImages,
    ImageFile,
    collate_decoded,
    walk_images,
)
from scoring.image_rows import IMAGE_PREDICTIONS_SCHEMA, RowBuilder, already_scored
from scoring.partition import PartitionWriter, new_run_id
from scoring.runtime import Runtime, open_runtime

TABLE = "image_predictions"
#: Below this many files, worker start-up costs more than decoding in the main process.
TINY_FOLDER = 128


@dataclass(frozen=True)
class ScoreSummary:
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

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_line(self) -> str:
        return (
            f"scored {self.scored} of {self.files} images ({self.failed} failed, "
            f"{self.skipped_incremental} skipped as already scored) with {self.model} via "
            f"{self.runtime} in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s) "
            f"-> {self.partition}"
        )


def open_image_bundle(model_ref: str | Path) -> Bundle:
    """Resolve and verify an image bundle; any problem is one :class:`BundleRefError` line."""
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


def default_workers(n_files: int) -> int:
    """Decoding processes: none for a tiny folder, else one per spare core (at least one)."""
    if n_files < TINY_FOLDER:
        return 0
    return max(1, min(8, available_cores() - 1))


def score_image_folder(
    folder: str | Path,
    model_ref: str | Path,
    out: str | Path,
    *,
    run_date: date | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    runtime: str = "onnx",
    device: str = "auto",
    top_k: int = 5,
    incremental: bool = False,
    run_id: str | None = None,
    progress: Callable[[dict], None] | None = None,
) -> ScoreSummary:
    """Score every image under ``folder`` into ``<out>/image_predictions/run_date=.../``.

    progress: called with ``{"event": "start", "total": n}``, ``{"event": "advance", "n": k}``
    and ``{"event": "end"}``.
    """
    started = time.perf_counter()
    _check_positive(batch_size=batch_size, top_k=top_k)
    run_date = run_date or datetime.now(timezone.utc).date()
    run_id = run_id or new_run_id()
    bundle = open_image_bundle(model_ref)
    files, to_score = files_to_score(folder, out, bundle, run_date, incremental=incremental)
    # Workers start decoding now, while the runtime loads and plans its graph.
    batches = decoded_batches(to_score, bundle, batch_size, workers)
    rt = open_runtime(bundle, runtime, device)
    builder = RowBuilder(bundle, top_k=top_k, output=score_output_name(rt.output_names))
    notify = progress or (lambda event: None)
    notify({"event": "start", "total": len(to_score)})
    with PartitionWriter(out, TABLE, run_date, IMAGE_PREDICTIONS_SCHEMA,
                         partition_metadata(bundle, rt.describe()), run_id=run_id) as writer:
        scored, failed = write_scored_batches(batches, to_score, rt, builder, writer, notify)
    notify({"event": "end"})
    seconds = time.perf_counter() - started
    return ScoreSummary(
        files=len(files), scored=scored, failed=failed,
        skipped_incremental=len(files) - len(to_score), rows=writer.rows,
        seconds=round(seconds, 3), images_per_s=round(scored / seconds, 2) if seconds else 0.0,
        partition=str(writer.path), run_id=run_id, model=f"{bundle.name}/{bundle.version}",
        runtime=rt.describe(),
    )


def files_to_score(folder: str | Path, out: str | Path, bundle: Bundle, run_date: date, *,
                   incremental: bool) -> tuple[list[ImageFile], list[ImageFile]]:
    """(every image file under ``folder``, those to score this run).

    incremental: leave out files an earlier committed partition scored with this model version.
    """
    files = walk_images(folder)
    if not files:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ImageFolderError(f"{folder}: no image files ({suffixes}) in it or below it")
    if not incremental:
        return files, files
    done = already_scored(out, TABLE, bundle, exclude_date=run_date)
    return files, [f for f in files if (f.relpath, f.size, f.mtime_ns // 1000) not in done]


def partition_metadata(bundle: Bundle, runtime: str) -> dict[str, str]:
    """Key/value metadata of every ``image_predictions`` part: the model and the runtime."""
    return {"model_name": bundle.name, "model_version": bundle.version,
            "bundle_sha256": bundle.sha256, "task": bundle.task, "runtime": runtime}


def write_scored_batches(batches: Iterable[DecodedBatch], files: list[ImageFile], rt: Runtime,
                         builder: RowBuilder, writer, notify: Callable[[dict], None]
                         ) -> tuple[int, int]:
    """Run each decoded batch through the graph and write its rows; (scored, failed) files.

    writer: anything with ``write(columns)`` (a ``PartitionWriter`` or a shard's ``PartWriter``).
    """
    scored = failed = 0
    for batch in batches:
        outputs = rt.run(batch.images.numpy())[builder.output] if len(batch.indices) else None
        writer.write(builder.rows(files, batch, outputs))
        scored += len(batch.indices)
        failed += len(batch.failed)
        notify({"event": "advance", "n": len(batch.indices) + len(batch.failed)})
    return scored, failed


def decoded_batches(files: list[ImageFile], bundle: Bundle, batch_size: int,
                    workers: int | None) -> Iterator[DecodedBatch]:
    """Batches of ``files`` decoded as the bundle's preprocessing says, in file order.

    workers: DataLoader decoding processes (None: :func:`default_workers`, 0: this process).
    """
    if not files:
        return iter(())
    workers = default_workers(len(files)) if workers is None else workers
    dataset = DecodedImages(files, Preprocessing.from_dict(bundle.manifest["preprocessing"]))
    return iter(DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                           collate_fn=collate_decoded, prefetch_factor=4 if workers else None,
                           multiprocessing_context=(worker_context("scoring.image_folder")
                                                    if workers else None)))


def score_output_name(names: list[str]) -> str:
    """The graph output that holds the scores: ``scores`` when named so, else the first."""
    if "scores" in names:
        return "scores"
    return names[0]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ScoringError(f"{name} must be >= 1, got {value}")

