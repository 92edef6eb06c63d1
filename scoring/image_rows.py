"""Rows of the ``image_predictions`` table: its pinned schema, predictions per task, and the
(path, size, mtime) keys an incremental run can skip.

Per task, columns that do not apply stay null:

* ``single_label``: ``pred_label``/``pred_score`` (arg-max class) and ``topk_labels``/
  ``topk_scores`` (best ``top_k`` classes, best first).
* ``multi_label``: ``labels`` (classes whose probability is above the manifest's threshold),
  ``probabilities`` (every class, manifest order) and the top-k columns.
* ``regression``: ``outputs`` (the graph's outputs). When the manifest's ``targets`` says they
  are points in the model's centre crop (``kind: points``, ``frame: input_crop_normalised``),
  they are mapped back to pixels of the original upright image: x, y pairs in original units.

A row whose file could not be decoded has ``error`` and nulls in every prediction column.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from export.bundle import Bundle
from export.manifest import point_frame, thresholds_for
from export.pixels import from_model_frame, upright_size
from export.storage import filesystem, is_url
from scoring.errors import BundleRefError
from scoring.image_folder import ImageFile
from scoring.object_commit import arrow_filesystem
from scoring.partition import committed_part_files, open_input

if TYPE_CHECKING:  # torch: imported when a shard decodes
    from scoring.image_batches import DecodedBatch

_TS = pa.timestamp("us", tz="UTC")
IMAGE_PREDICTIONS_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("file_size", pa.int64(), nullable=False),
    pa.field("mtime", _TS, nullable=False),
    pa.field("pred_label", pa.string()),
    pa.field("pred_score", pa.float32()),
    pa.field("topk_labels", pa.list_(pa.string())),
    pa.field("topk_scores", pa.list_(pa.float32())),
    pa.field("labels", pa.list_(pa.string())),
    pa.field("probabilities", pa.list_(pa.float32())),
    pa.field("outputs", pa.list_(pa.float32())),
    pa.field("error", pa.string()),
    pa.field("model_name", pa.string(), nullable=False),
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("bundle_sha256", pa.string(), nullable=False),
    pa.field("scored_at", _TS, nullable=False),
])
_PREDICTION_COLUMNS = ("pred_label", "pred_score", "topk_labels", "topk_scores", "labels",
                       "probabilities", "outputs")


class RowBuilder:
    """Turns a decoded batch and the graph's output into table rows, in file order."""

    def __init__(self, bundle: Bundle, *, top_k: int, output: str = "scores"):
        self.task = bundle.task
        self.classes = list(bundle.manifest.get("classes") or [])
        self.output = output
        self.top_k = min(top_k, len(self.classes)) if self.classes else 0
        self.thresholds = (thresholds_for(bundle.manifest, len(self.classes))
                           if self.task == "multi_label" else None)
        self.point_frame = point_frame(bundle.manifest)
        self.where = f"bundle {bundle.path}"
        self.constants = {"model_name": bundle.name, "model_version": bundle.version,
                          "bundle_sha256": bundle.sha256}
        if self.task != "regression" and not self.classes:
            raise BundleRefError(f"{self.where}: task {self.task} but no classes in the manifest")

    def rows(self, files: list[ImageFile], batch: DecodedBatch,
             outputs: np.ndarray | None) -> dict[str, list]:
        paths = [files[i].path for i in batch.indices.tolist()]
        predictions = self._predictions(outputs, paths) if outputs is not None else []
        by_index: dict[int, dict] = dict(zip(batch.indices.tolist(), predictions, strict=True))
        by_index |= {i: {"error": error} for i, error in batch.failed}
        now = datetime.now(timezone.utc)
        columns: dict[str, list] = {f.name: [] for f in IMAGE_PREDICTIONS_SCHEMA}
        for i in sorted(by_index):
            file, values = files[i], by_index[i]
            row = {"path": file.relpath, "file_size": file.size,
                   "mtime": file.mtime_ns // 1000,  # exact µs: incremental runs compare it
                   "scored_at": now, **self.constants}
            for name in columns:
                columns[name].append(row.get(name, values.get(name)))
        return columns

    def _predictions(self, outputs: np.ndarray, paths: list[Path]) -> list[dict]:
        outputs = np.asarray(outputs, dtype=np.float32).reshape(len(outputs), -1)
        if self.task == "regression" and self.point_frame is not None:
            return [{"outputs": from_model_frame(row, upright_size(open_input(path)),
                                                 self.point_frame)}
                    for row, path in zip(outputs, paths, strict=True)]
        if self.task == "regression":
            return [{"outputs": row.tolist()} for row in outputs]
        if outputs.shape[1] != len(self.classes):
            raise BundleRefError(f"{self.where}: the graph gives {outputs.shape[1]} scores but "
                                 f"the manifest lists {len(self.classes)} classes")
        best = np.argsort(-outputs, axis=1, kind="stable")[:, : self.top_k]
        rows = []
        for scores, top in zip(outputs, best, strict=True):
            row = {"topk_labels": [self.classes[j] for j in top],
                   "topk_scores": scores[top].tolist()}
            if self.task == "single_label":
                row |= {"pred_label": self.classes[top[0]], "pred_score": float(scores[top[0]])}
            else:
                row |= {"labels": [c for c, s, t in zip(self.classes, scores, self.thresholds,
                                                        strict=True) if s > t],
                        "probabilities": scores.tolist()}
            rows.append(row)
        return rows


def already_scored(out: str | Path, table: str, bundle: Bundle, *, exclude_date: date,
                   files: Iterable[ImageFile] | None = None) -> set[tuple[str, int, int]]:
    """(path, file_size, mtime in µs) of files an earlier committed partition scored without error
    with this model name and version; the partition of ``exclude_date`` is left out because the
    run that asks is about to replace it.

    Bounded work: only the key columns are read, with the model and error filter pushed down to
    Parquet, and a part another model wrote is passed by on its footer alone. files: the files
    the run found; given, only their keys are kept, and partitions are read newest first until
    every file still unresolved was modified after the last row of every older partition was
    scored (footer statistics): no older partition can hold those keys.
    """
    skip = f"run_date={exclude_date.isoformat()}"
    model = (bundle.name, bundle.version)
    partitions = []
    for name, part_files in committed_part_files(out, table):
        if name == skip:
            continue
        footers = [(f, *_footer(f)) for f in part_files]
        ours = [(f, last) for f, written_by, last in footers if written_by in (model, None)]
        if ours:
            partitions.append(([f for f, _ in ours], max(last for _, last in ours)))
    # Newest first; with each, the latest scoring time of it and every older partition.
    newest_first, latest = [], -1
    for parts, last in partitions:
        latest = max(latest, last)
        newest_first.insert(0, (parts, latest))
    same_model = ((ds.field("model_name") == bundle.name)
                  & (ds.field("model_version") == bundle.version)
                  & ds.field("error").is_null())
    if files is None:
        return set().union(*(_keys(parts, same_model) for parts, _ in newest_first))
    # The walked keys as a table: matching them with each partition is one hash join in Arrow.
    files = list(files)
    walked = pa.table({"path": pa.array([f.relpath for f in files], pa.string()),
                       "file_size": pa.array([f.size for f in files], pa.int64()),
                       "mtime": pa.array([f.mtime_ns // 1000 for f in files], pa.int64()),
                       "i": pa.array(np.arange(len(files), dtype=np.int64))})
    mtimes = walked["mtime"].to_numpy()
    unresolved = np.ones(len(files), dtype=bool)
    for parts, scored_until in newest_first:
        if mtimes[unresolved].min(initial=_NEVER) > scored_until:
            break
        hits = walked.join(_key_table(parts, same_model), ["path", "file_size", "mtime"],
                           join_type="left semi")["i"]
        unresolved[hits.to_numpy()] = False
    done = walked.filter(pa.array(~unresolved))
    return set(zip(done["path"].to_pylist(), done["file_size"].to_pylist(),
                   done["mtime"].to_pylist(), strict=True))


def _key_table(parts: list[Path | str], same_model: ds.Expression) -> pa.Table:
    if parts and is_url(parts[0]):
        fs, _ = filesystem(parts[0])
        source = ds.dataset([filesystem(p)[1] for p in parts], format="parquet",
                            filesystem=arrow_filesystem(fs))
    else:
        source = ds.dataset([str(p) for p in parts], format="parquet")
    seen = source.to_table(
        columns=["path", "file_size", "mtime"], filter=same_model)
    return seen.set_column(2, "mtime", seen["mtime"].cast(pa.int64()))


def _keys(parts: list[Path], same_model: ds.Expression) -> set[tuple[str, int, int]]:
    seen = _key_table(parts, same_model)
    return set(zip(seen["path"].to_pylist(), seen["file_size"].to_pylist(),
                   seen["mtime"].to_pylist(), strict=True))


def _footer(part: Path) -> tuple[tuple[str, str] | None, int]:
    """(model name and version from the part's key/value metadata, None without it; its latest
    ``scored_at`` in µs from column statistics, int64 max where a row group has none)."""
    meta = pq.ParquetFile(open_input(part)).metadata
    kv = meta.metadata or {}
    model = ((kv[b"model_name"].decode(), kv[b"model_version"].decode())
             if b"model_name" in kv and b"model_version" in kv else None)
    column = meta.schema.names.index("scored_at")
    last = -1
    for group in range(meta.num_row_groups):
        stats = meta.row_group(group).column(column).statistics
        if stats is None or not stats.has_min_max:
            return model, _NEVER
        last = max(last, (stats.max - _EPOCH) // timedelta(microseconds=1))
    return model, last


_NEVER = int(np.iinfo(np.int64).max)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
