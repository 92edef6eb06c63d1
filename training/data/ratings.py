"""Explicit ratings → de-duplicated, index-encoded, split tensors for collaborative filtering.

``load_ratings`` reads MovieLens (``u.data``/``ratings.csv``) or any named-column CSV/Parquet
(see ``training.data.ratings_files`` for layouts and line-numbered errors), keeps the last
rating of a repeated (user, item) pair, and encodes raw integer ids as dense indices ``0..n-1``
in sorted raw-id order — the vocabulary travels in the bundle manifest as ``users`` / ``items``
lists.
Vocabularies cover train and validation ratings alike (as fastai's ``CollabDataLoaders`` do), so
every index the model sees is in range. The validation split is random (seeded, as fastai's
``RandomSplitter``: the first ``valid_pct`` of a permutation) or ``"time"``: the globally latest
``valid_pct`` of ratings by timestamp, which measures how well the past predicts the future.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from training.data.ratings_files import (
    FORMAT_RANGES,
    RatingsFormatError,
    RatingsSource,
    check_range,
    detect_source,
    drop_duplicates,
    read_ratings,
    read_titles,
)
from training.errors import TrainingError

__all__ = ["RatingsData", "RatingsFormatError", "Vocabulary", "build_rating_loaders",
           "load_ratings", "split_positions"]

@dataclass(frozen=True, eq=False)
class Vocabulary:
    """Sorted raw integer ids; position in the array is the dense index the model uses."""

    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def encode(self, raw) -> np.ndarray:
        """Raw ids → dense indices; raises on ids the vocabulary never saw."""
        raw = np.asarray(raw, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.ids, raw), 0, len(self.ids) - 1)
        unknown = self.ids[pos] != raw
        if unknown.any():
            raise TrainingError(f"unknown id {int(raw[unknown][0])} ({int(unknown.sum())} unknown)")
        return pos.astype(np.int64)

    def decode(self, index) -> np.ndarray:
        return self.ids[np.asarray(index, dtype=np.int64)]

    def to_list(self) -> list[int]:
        return self.ids.tolist()

    @classmethod
    def from_list(cls, ids) -> Vocabulary:
        return cls(np.asarray(ids, dtype=np.int64))


@dataclass(frozen=True, eq=False)
class RatingsData:
    """Encoded train/valid ratings with the vocabularies and titles needed to read them back."""

    source: RatingsSource
    users: Vocabulary
    items: Vocabulary
    titles: tuple[str | None, ...]  # aligned with `items`
    train_pairs: np.ndarray  # (n, 2) int64 user_idx, item_idx
    train_ratings: np.ndarray  # (n,) float32
    valid_pairs: np.ndarray
    valid_ratings: np.ndarray
    rating_range: tuple[float, float]  # observed min, max
    split: str = "random"
    valid_pct: float = 0.2
    seed: int = 42
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def to_dict(self) -> dict:
        return {
            "source": str(self.source.ratings_path), "format": self.source.format,
            "n_ratings": int(len(self.train_ratings) + len(self.valid_ratings)),
            "n_train": int(len(self.train_ratings)), "n_valid": int(len(self.valid_ratings)),
            "n_users": self.n_users, "n_items": self.n_items,
            "rating_range": list(self.rating_range), "split": self.split,
            "valid_pct": self.valid_pct, "seed": self.seed, "warnings": list(self.warnings),
        }

    def summary(self) -> str:
        d = self.to_dict()
        lo, hi = self.rating_range
        text = (f"{d['n_ratings']:,} ratings ({d['n_train']:,} train / {d['n_valid']:,} valid, "
                f"{self.split} split) from {d['n_users']:,} users on {d['n_items']:,} items, "
                f"ratings {lo:g}–{hi:g} [{self.source.format}: {self.source.ratings_path.name}]")
        return "\n".join([text, *(f"warning: {w}" for w in self.warnings)])


def split_positions(n: int, *, valid_pct: float, split: str, seed: int,
               times: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Train/valid row positions. Random: seeded permutation, first `valid_pct` is valid (fastai's
    RandomSplitter). Time: the globally latest `valid_pct` by timestamp, ties in file order."""
    if not 0 < valid_pct < 1:
        raise TrainingError(f"valid_pct must be between 0 and 1 (exclusive), got {valid_pct}")
    n_valid = max(1, int(valid_pct * n))  # tiny tables still get one validation rating
    if n_valid >= n:
        raise TrainingError(f"valid_pct={valid_pct} of {n} ratings leaves an empty train "
                            "or valid set")
    if split == "random":
        order = np.random.default_rng(seed).permutation(n)
        return np.sort(order[n_valid:]), np.sort(order[:n_valid])
    if split == "time":
        if times is None:
            raise TrainingError("split='time' needs a timestamp column (parameter time_col)")
        order = np.argsort(times, kind="stable")
        return np.sort(order[: n - n_valid]), np.sort(order[n - n_valid:])
    raise TrainingError(f"split must be 'random' or 'time', got {split!r}")


def load_ratings(path: str | Path, *, valid_pct: float = 0.2, split: str = "random",
                 seed: int = 42, rating_range: tuple[float, float] | None = None,
                 user_col: str | None = None, item_col: str | None = None,
                 rating_col: str | None = None, time_col: str | None = None,
                 items_path: str | Path | None = None, title_col: str | None = None,
                 items_id_col: str | None = None) -> RatingsData:
    """Read, validate, de-duplicate, encode and split ratings from a directory or file.

    rating_range: declared (min, max), e.g. the bounds of the recipe's ``y_range``; defaults to
    the format's (1–5 for u.data, 0.5–5 for ratings.csv), unchecked for other tables. Ids are
    exact int64 (see ``training.data.ratings_files``).
    """
    source = detect_source(path, user_col=user_col, item_col=item_col, rating_col=rating_col,
                           time_col=time_col, items_path=items_path, title_col=title_col,
                           items_id_col=items_id_col)
    frame = read_ratings(source)
    declared = rating_range or FORMAT_RANGES.get(source.format)
    if declared is not None:
        check_range(frame, source, declared,
                    declared_by="the range asked for" if rating_range else None)
    frame, warnings = drop_duplicates(frame, source)
    titles_by_id, title_warnings = read_titles(source)
    user_ids, user_idx = np.unique(frame["user"].to_numpy(), return_inverse=True)
    item_ids, item_idx = np.unique(frame["item"].to_numpy(), return_inverse=True)
    titles = _aligned_titles(titles_by_id, item_ids, source, warnings)
    pairs = np.stack([user_idx, item_idx], axis=1).astype(np.int64)
    ratings = frame["rating"].to_numpy(dtype=np.float32)
    times = frame["time"].to_numpy() if "time" in frame else None
    train, valid = split_positions(len(frame), valid_pct=valid_pct, split=split, seed=seed,
                                   times=times)
    return RatingsData(
        source=source, users=Vocabulary(user_ids), items=Vocabulary(item_ids), titles=titles,
        train_pairs=pairs[train], train_ratings=ratings[train],
        valid_pairs=pairs[valid], valid_ratings=ratings[valid],
        rating_range=(float(ratings.min()), float(ratings.max())), split=split,
        valid_pct=valid_pct, seed=seed, warnings=tuple(warnings + title_warnings))


def _aligned_titles(titles_by_id: pd.Series, item_ids: np.ndarray, source: RatingsSource,
                    warnings: list[str]) -> tuple[str | None, ...]:
    if source.items_path is None:
        return (None,) * len(item_ids)
    aligned = titles_by_id.reindex(item_ids)
    missing = int(aligned.isna().sum())
    if missing:
        warnings.append(f"{missing} rated item ids have no title in {source.items_path.name}")
    return tuple(None if pd.isna(t) else str(t) for t in aligned.to_numpy())


def build_rating_loaders(data: RatingsData, *, bs: int = 1024, seed: int = 42
                  ) -> tuple[DataLoader, DataLoader]:
    """Loaders of ``(LongTensor (B, 2), FloatTensor (B,))`` batches.

    Batches are sliced from whole tensors by index lists (a BatchSampler used as the sampler),
    so a batch costs one indexing op, not `bs` Python calls.
    """
    if bs < 1:
        raise TrainingError(f"bs must be a positive batch size, got {bs}")
    train = TensorDataset(torch.from_numpy(data.train_pairs), torch.from_numpy(data.train_ratings))
    valid = TensorDataset(torch.from_numpy(data.valid_pairs), torch.from_numpy(data.valid_ratings))
    shuffle = RandomSampler(train, generator=torch.Generator().manual_seed(seed))
    return (_batched(train, BatchSampler(shuffle, bs, drop_last=False)),
            _batched(valid, BatchSampler(SequentialSampler(valid), bs * 2, drop_last=False)))


def _batched(dataset: TensorDataset, sampler: BatchSampler) -> DataLoader:
    return DataLoader(dataset, sampler=sampler, batch_size=None)
