"""Nightly recommendation scoring from a collab bundle alone: top-k per user and the full table.

Users are scored in blocks through the bundle's ``model`` graph (int64 user indices (B,) →
``scores`` (B, n_items)), so memory is one block of scores whatever the number of users. Per
block:

- ``recommendations_topk``: the user's rated items (``seen.parquet``: every rating the model was
  trained or validated on) are set to −∞, ``torch.topk`` picks the best ``top_k``; a user who has
  rated nearly everything simply gets fewer rows.
- ``recommendations_full`` (``full_table=True``): every (user, item) score.

Raw ids come back from the manifest's vocabularies (``users``, ``items``; ``titles``); their Arrow
type follows the manifest's ``id_type``: ``int64`` (what lensflow training writes) or ``string``.
Both tables go through :class:`scoring.partition.PartitionWriter`, so a run date's partition
appears whole or not at all, with the model name, version, bundle sha256 and run id in every
file's metadata.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from export.bundle import Bundle, load_bundle, resolve_bundle
from export.errors import ExportError
from scoring.errors import BundleRefError, ScoringError
from scoring.partition import PartitionWriter, new_run_id
from scoring.runtime import Runtime, open_runtime

TOPK_TABLE = "recommendations_topk"
FULL_TABLE = "recommendations_full"
ID_TYPES = {"int64": pa.int64(), "string": pa.string()}
#: Scores held per block (64 MiB of float32): caps users per block on wide catalogues.
MAX_BLOCK_SCORES = 1 << 24


def topk_schema(id_type: str = "int64") -> pa.Schema:
    ids = ID_TYPES[id_type]
    return pa.schema([("user_id", ids), ("rank", pa.int16()), ("item_id", ids),
                      ("title", pa.string()), ("score", pa.float32())])


def full_schema(id_type: str = "int64") -> pa.Schema:
    ids = ID_TYPES[id_type]
    return pa.schema([("user_id", ids), ("item_id", ids), ("score", pa.float32())])


class UnknownUserError(ScoringError):
    """A requested user id is not in the bundle's vocabulary (with ``strict=True``)."""


@dataclass(frozen=True)
class RecScoreSummary:
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

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_line(self) -> str:
        full = f", {self.full_rows:,} full-table rows -> {self.full_partition}" \
            if self.full_partition else ""
        topk = f"top-{self.top_k} ({self.topk_rows:,} rows) -> {self.topk_partition}" \
            if self.topk_partition else "no top-k"
        return (f"scored {self.users_scored:,} users × {self.items:,} items "
                f"({self.unknown_users} unknown skipped) with {self.model} via {self.runtime} in "
                f"{self.seconds:.1f} s: {topk}{full}")


@dataclass(frozen=True, eq=False)
class CollabVocab:
    """The manifest's vocabularies as arrays; index = the model's dense user/item index."""

    users: np.ndarray
    items: np.ndarray
    titles: pa.Array
    id_type: str

    @classmethod
    def from_manifest(cls, manifest: dict) -> CollabVocab:
        id_type = manifest.get("id_type", "int64")
        if id_type not in ID_TYPES:
            raise BundleRefError(f"manifest id_type {id_type!r} is not one of {list(ID_TYPES)}")
        dtype = np.int64 if id_type == "int64" else object
        items = np.asarray(manifest["items"], dtype=dtype)
        titles = manifest.get("titles") or [None] * len(items)
        return cls(np.asarray(manifest["users"], dtype=dtype), items,
                   pa.array(titles, type=pa.string()), id_type)

    def user_indices(self, raw: Iterable) -> np.ndarray:
        """Dense indices of raw ids, -1 where unknown (ids of the wrong type are unknown)."""
        raw = pd.Series(list(raw) if not isinstance(raw, (np.ndarray, pd.Series)) else raw)
        if self.id_type == "int64":
            numbers = pd.to_numeric(raw, errors="coerce")
            whole = numbers.notna() & (numbers == np.round(numbers))
            raw = numbers.where(whole, np.nan)
            found = pd.Index(self.users).get_indexer(raw.fillna(-(2**62)).astype(np.int64))
            return np.where(whole.to_numpy(), found, -1)
        return pd.Index(self.users).get_indexer(raw.astype(str))


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


def select_users(vocab: CollabVocab, users, *, strict: bool) -> tuple[np.ndarray, int]:
    """(dense indices to score, in the order asked and without repeats; unknown count)."""
    if users is None:
        return np.arange(len(vocab.users), dtype=np.int64), 0
    raw, lines, source = _read_user_ids(users)
    found = vocab.user_indices(raw)
    unknown = found < 0
    if strict and unknown.any():
        first = int(np.argmax(unknown))
        where = f"{source} line {lines[first]}" if source else f"users[{first}]"
        raise UnknownUserError(f"{where}: unknown user id {str(raw[first])!r} "
                               f"({int(unknown.sum())} unknown; strict)")
    known = found[~unknown]
    _, first_seen = np.unique(known, return_index=True)
    return known[np.sort(first_seen)].astype(np.int64), int(unknown.sum())


def _read_user_ids(users) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Raw ids, their 1-based line numbers (blank lines skipped), and the file's name."""
    if not isinstance(users, (str, Path)):
        raw = np.asarray(list(users), dtype=object)
        return raw, np.arange(1, len(raw) + 1), None
    path = Path(users)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ScoringError(f"users {path}: cannot read ({err})") from None
    stripped = np.array([line.strip() for line in text.splitlines()], dtype=object)
    lines = np.flatnonzero(stripped != "") + 1
    if not len(lines):
        raise ScoringError(f"users {path}: no user ids in file")
    return stripped[lines - 1], lines, path.name


class SeenItems:
    """Rated items per user (CSR over ``seen.parquet``), to mask out of the top-k."""

    def __init__(self, user_idx: np.ndarray, item_idx: np.ndarray, n_users: int) -> None:
        order = np.argsort(user_idx, kind="stable")
        self.items = item_idx[order].astype(np.int64)
        self.indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(user_idx, minlength=n_users)[:n_users], out=self.indptr[1:])

    @classmethod
    def from_bundle(cls, bundle: Bundle, n_users: int, n_items: int) -> SeenItems:
        seen = (bundle.manifest.get("seen") or {}).get("file", "seen.parquet")
        if not bundle.has_file(seen):
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), n_users)
        table = pq.read_table(bundle.file(seen), columns=["user_idx", "item_idx"])
        users, items = table["user_idx"].to_numpy(), table["item_idx"].to_numpy()
        for name, idx, n in (("user_idx", users, n_users), ("item_idx", items, n_items)):
            if len(idx) and (idx.min() < 0 or idx.max() >= n):
                raise BundleRefError(f"bundle {bundle.path}: {seen} has {name} outside the "
                                     f"vocabulary (0..{n - 1})")
        return cls(users, items, n_users)

    def block(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row in block, item index) of every rated item of ``users``."""
        starts, ends = self.indptr[users], self.indptr[users + 1]
        counts = ends - starts
        rows = np.repeat(np.arange(len(users)), counts)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return rows, self.items[np.repeat(starts, counts) + offsets]


def score_recommendations(
    model_ref: str | Path,
    out: str | Path,
    *,
    top_k: int = 10,
    full_table: bool = False,
    users=None,
    strict: bool = False,
    run_date: date | None = None,
    runtime: str = "onnx",
    device: str = "auto",
    block_size: int = 1024,
    run_id: str | None = None,
    progress: Callable[[dict], None] | None = None,
) -> RecScoreSummary:
    """Write ``recommendations_topk`` (and with ``full_table`` ``recommendations_full``).

    top_k: items per user, seen items excluded; 0 writes no top-k table (then full_table).
    users: a file of raw user ids (one per line) or a list of ids; default every user.
    strict: an unknown user id is an error instead of being skipped and counted.
    progress: called with ``{"event": "start", "total": users}``, ``{"event": "advance",
        "n": k}`` and ``{"event": "end"}``.
    """
    started = time.perf_counter()
    if top_k < 0 or block_size < 1 or (top_k == 0 and not full_table):
        raise ScoringError(f"need top_k >= 1 or full_table (got top_k={top_k}, "
                           f"full_table={full_table}) and block_size >= 1 (got {block_size})")
    run_date = run_date or datetime.now(timezone.utc).date()
    run_id = run_id or new_run_id()
    bundle = open_collab_bundle(model_ref)
    vocab = CollabVocab.from_manifest(bundle.manifest)
    chosen, unknown = select_users(vocab, users, strict=strict)
    seen = SeenItems.from_bundle(bundle, len(vocab.users), len(vocab.items)) if top_k else None
    rt = open_runtime(bundle, runtime, device, graph="model")
    block = users_per_block(bundle.manifest, len(vocab.items), block_size)
    meta = partition_metadata(bundle, rt.describe(), vocab.id_type, top_k)
    notify = progress or (lambda event: None)
    notify({"event": "start", "total": len(chosen)})
    with contextlib.ExitStack() as stack:
        topk_out = stack.enter_context(PartitionWriter(
            out, TOPK_TABLE, run_date, topk_schema(vocab.id_type), meta, run_id=run_id)) \
            if top_k else None
        full_out = stack.enter_context(PartitionWriter(
            out, FULL_TABLE, run_date, full_schema(vocab.id_type), meta, run_id=run_id)) \
            if full_table else None
        write_user_blocks(rt, vocab, chosen, block, seen, top_k, topk_out, full_out, notify)
    notify({"event": "end"})
    seconds = time.perf_counter() - started
    rows = (topk_out.rows if topk_out else 0) + (full_out.rows if full_out else 0)
    return RecScoreSummary(
        users_scored=len(chosen), unknown_users=unknown, items=len(vocab.items), top_k=top_k,
        topk_rows=topk_out.rows if topk_out else 0, full_rows=full_out.rows if full_out else 0,
        seconds=round(seconds, 3), rows_per_s=round(rows / seconds, 1) if seconds else 0.0,
        topk_partition=str(topk_out.path) if topk_out else None,
        full_partition=str(full_out.path) if full_out else None,
        run_id=run_id, model=f"{bundle.name}/{bundle.version}", runtime=rt.describe())


def partition_metadata(bundle: Bundle, runtime: str, id_type: str, top_k: int) -> dict[str, str]:
    """Key/value metadata of every part of both tables: the model, runtime, id type and k."""
    return {"model_name": bundle.name, "model_version": bundle.version,
            "bundle_sha256": bundle.sha256, "task": "collab", "runtime": runtime,
            "id_type": id_type, "top_k": str(top_k)}


def write_user_blocks(rt: Runtime, vocab: CollabVocab, users: np.ndarray, block: int,
                      seen: SeenItems | None, top_k: int, topk_out, full_out,
                      notify: Callable[[dict], None]) -> None:
    """Score ``users`` ``block`` at a time and write each block's rows.

    topk_out, full_out: writers (``write(batch)``) of either table, or None to skip it.
    """
    for lo in range(0, len(users), block):
        users_block = users[lo:lo + block]
        scores = rt.run(users_block)["scores"]
        if full_out is not None:
            full_out.write(full_rows(vocab, users_block, scores))
        if topk_out is not None:
            topk_out.write(topk_rows(vocab, users_block, scores, seen, top_k,
                                     may_modify=full_out is None))
        notify({"event": "advance", "n": len(users_block)})


def users_per_block(manifest: dict, n_items: int, block_size: int) -> int:
    """Users per block: ``block_size``, fewer when a block's scores would pass the cap.

    The MLP model materialises (users, items, hidden) activations inside its graph, so its cap
    is divided by the hidden width.
    """
    model = manifest.get("model") or {}
    width = int(model.get("nn_hidden", 1)) if model.get("use_nn") else 1
    return max(1, min(block_size, MAX_BLOCK_SCORES // max(1, n_items * width)))


def full_rows(vocab: CollabVocab, users: np.ndarray, scores: np.ndarray) -> pa.RecordBatch:
    """Every (user, item, score) of a block, user-major."""
    n_items = len(vocab.items)
    return pa.RecordBatch.from_arrays(
        [pa.array(np.repeat(vocab.users[users], n_items)), pa.array(np.tile(vocab.items,
                                                                           len(users))),
         pa.array(np.ascontiguousarray(scores, dtype=np.float32).reshape(-1))],
        schema=full_schema(vocab.id_type))


def topk_rows(vocab: CollabVocab, users: np.ndarray, scores: np.ndarray,
              seen: SeenItems | None, top_k: int, *, may_modify: bool = False) -> pa.RecordBatch:
    """Best ``top_k`` unseen items of each user of a block, rank 1 first."""
    if seen is not None:
        rows, items = seen.block(users)
        if len(rows):
            # A block of scores is large: copy only when the array is shared (the full table's
            # Arrow columns view the same buffer) or read-only.
            if not (may_modify and scores.flags.writeable):
                scores = scores.copy()
            scores[rows, items] = -np.inf
    k = min(top_k, scores.shape[1])
    values, indices = torch.topk(torch.from_numpy(scores), k, dim=1)
    values, indices = values.numpy(), indices.numpy()
    keep = np.isfinite(values).reshape(-1)  # a user with fewer than k unseen items
    item_idx = indices.reshape(-1)[keep]
    return pa.RecordBatch.from_arrays(
        [pa.array(np.repeat(vocab.users[users], k)[keep]),
         pa.array(np.tile(np.arange(1, k + 1, dtype=np.int16), len(users))[keep]),
         pa.array(vocab.items[item_idx]),
         vocab.titles.take(pa.array(item_idx)),
         pa.array(values.reshape(-1)[keep])],
        schema=topk_schema(vocab.id_type))
