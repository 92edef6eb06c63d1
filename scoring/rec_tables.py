"""The recommendation tables: their pinned schemas, the bundle's vocabularies, and the rows of
one block of users.

- ``recommendations_topk``: the user's rated items (``seen.parquet``: every rating the model was
  trained or validated on) are set to −∞, ``torch.topk`` picks the best ``top_k``; a user who has
  rated nearly everything simply gets fewer rows.
- ``recommendations_full``: every (user, item) score.

Raw ids come back from the manifest's vocabularies (``users``, ``items``; ``titles``); their Arrow
type follows the manifest's ``id_type``: ``int64`` (what lensflow training writes) or ``string``.
Requested int64 user ids are matched exactly (never through a float); a users file may start
with a UTF-8 byte-order mark.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from export.bundle import Bundle
from export.storage import basename, is_url, read_bytes
from scoring.errors import BundleRefError, ScoringError

TOPK_TABLE = "recommendations_topk"
FULL_TABLE = "recommendations_full"
ID_TYPES = {"int64": pa.int64(), "string": pa.string()}
_INTEGER_TEXT = re.compile(r"[+-]?\d+(?:\.0*)?")
_INT64_MIN, _INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)


def topk_schema(id_type: str = "int64") -> pa.Schema:
    ids = ID_TYPES[id_type]
    return pa.schema([("user_id", ids), ("rank", pa.int16()), ("item_id", ids),
                      ("title", pa.string()), ("score", pa.float32())])


def full_schema(id_type: str = "int64") -> pa.Schema:
    ids = ID_TYPES[id_type]
    return pa.schema([("user_id", ids), ("item_id", ids), ("score", pa.float32())])


class UnknownUserError(ScoringError):
    """A requested user id is not in the bundle's vocabulary (with ``strict=True``)."""


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
            # Exact: no float round trip, which would merge 2⁵³ + 1 into 2⁵³.
            ids = [_exact_int64(value) for value in raw.tolist()]
            whole = np.array([i is not None for i in ids], dtype=bool)
            exact = np.array([0 if i is None else i for i in ids], dtype=np.int64)
            return np.where(whole, pd.Index(self.users).get_indexer(exact), -1)
        return pd.Index(self.users).get_indexer(raw.astype(str))


def _exact_int64(value) -> int | None:
    """An id as an exact int64: an integer, a whole float, or digits ("12", "12.0"); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        number = int(value)
    elif isinstance(value, (float, np.floating)):
        if not np.isfinite(value) or value != int(value) or abs(value) >= 2**53:
            return None
        number = int(value)
    else:
        text = str(value).strip()
        if not _INTEGER_TEXT.fullmatch(text):
            return None
        number = int(text.split(".")[0])
    return number if _INT64_MIN <= number <= _INT64_MAX else None


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
    path = users if is_url(users) else Path(users)
    try:
        raw_bytes = read_bytes(path) if is_url(path) else path.read_bytes()
        text = raw_bytes.decode("utf-8-sig")  # a byte-order mark is no part of an id
    except (OSError, UnicodeDecodeError) as err:
        raise ScoringError(f"users {path}: cannot read ({err})") from None
    stripped = np.array([line.strip() for line in text.splitlines()], dtype=object)
    lines = np.flatnonzero(stripped != "") + 1
    if not len(lines):
        raise ScoringError(f"users {path}: no user ids in file")
    return stripped[lines - 1], lines, basename(path)


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
