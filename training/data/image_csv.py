"""A CSV that lists images and their targets: read its rows, check the files, split them.

Shared by the multi-label and regression readers (fast.ai's ``ImageDataLoaders.from_csv`` /
``from_df``): one row per image, ``fname`` relative to an image root (an absolute path is used as
it is), task columns, and an optional ``is_valid`` flag. Without that flag the rows are split at
random with a seed, or by a group column so that related images (the same person, the same
animal) never straddle training and validation — the leakage the head-pose lesson warns about.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from training.data.images import (
    SkippedFile,
    check_valid_pct,
    csv_reader,
    parse_flag,
    unreadable_reasons,
)
from training.errors import TrainingError


@dataclass(frozen=True)
class TableRow:
    """One data row: where it was (``file line N``), its image and its cells."""

    where: str
    path: Path
    cells: dict[str, str]
    is_valid: bool | None


@dataclass(frozen=True)
class ImageTable:
    """The readable rows of an image CSV, split; and the files left out with why."""

    train: tuple[TableRow, ...]
    valid: tuple[TableRow, ...]
    skipped: tuple[SkippedFile, ...]
    split: str  # "is_valid column" | "random N%" | "by group COL"


def read_rows(
    csv_path: Path | str,
    images_root: Path | str,
    *,
    columns: Sequence[str],
    fname_col: str = "fname",
    valid_col: str | None = "is_valid",
) -> tuple[list[TableRow], bool]:
    """Rows of ``csv_path`` that name an existing file, and whether it has ``valid_col``.

    columns: cells every row must have a column for (they may be empty).
    """
    csv_path, images_root = Path(csv_path), Path(images_root)
    if not csv_path.is_file():
        raise TrainingError(f"label file {csv_path} does not exist")
    if not images_root.is_dir():
        raise TrainingError(f"image folder {images_root} does not exist")
    rows = []
    with csv_reader(csv_path, (fname_col, *columns)) as reader:
        has_valid = valid_col is not None and valid_col in reader.fieldnames
        for row in reader:
            where = f"{csv_path} line {reader.line_num}"
            fname = (row.get(fname_col) or "").strip()
            if not fname:
                raise TrainingError(f"{where}: empty {fname_col}")
            path = Path(fname) if Path(fname).is_absolute() else images_root / fname
            if not path.is_file():
                raise TrainingError(f"{where}: file {fname!r} not found under {images_root}")
            flag = parse_flag(row.get(valid_col) or "", where, valid_col) if has_valid else None
            rows.append(TableRow(where, path, {c: (row.get(c) or "").strip() for c in columns},
                                 flag))
    if not rows:
        raise TrainingError(f"{csv_path}: no rows")
    return rows, has_valid


def split_rows(
    rows: Sequence[TableRow],
    *,
    has_valid: bool,
    valid_pct: float = 0.2,
    seed: int = 42,
    split_by: str | None = None,
) -> ImageTable:
    """Drop unreadable images, then split by ``is_valid``, by group, or at random.

    split_by: a column read into every row's cells; rows sharing its value stay together. It
    wins over an ``is_valid`` column.
    """
    check_valid_pct(valid_pct)
    reasons = unreadable_reasons([r.path for r in rows])
    skipped = tuple(SkippedFile(r.path, why) for r, why in zip(rows, reasons, strict=True) if why)
    kept = [r for r, why in zip(rows, reasons, strict=True) if why is None]
    if not kept:
        raise TrainingError("no readable images in the table")
    if split_by is not None:
        valid_groups = _valid_groups(kept, split_by, valid_pct, seed)
        chosen = [r.cells[split_by] in valid_groups for r in kept]
        how = f"by group {split_by}"
    elif has_valid:
        chosen = [bool(r.is_valid) for r in kept]
        how = "is_valid column"
    else:
        chosen = _random_valid(len(kept), valid_pct, seed)
        how = f"random {valid_pct:.0%}"
    train = tuple(r for r, v in zip(kept, chosen, strict=True) if not v)
    valid = tuple(r for r, v in zip(kept, chosen, strict=True) if v)
    if not train:
        raise TrainingError(f"no training rows left after the split ({how})")
    return ImageTable(train, valid, skipped, how)


def _random_valid(n: int, valid_pct: float, seed: int) -> list[bool]:
    n_valid = min(round(n * valid_pct), n - 1)
    if valid_pct > 0 and n >= 2:
        n_valid = max(n_valid, 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    picked = set(order[:n_valid])
    return [i in picked for i in range(n)]


def _valid_groups(rows: Sequence[TableRow], column: str, valid_pct: float,
                  seed: int) -> set[str]:
    """Whole groups, drawn in a seeded order, until about ``valid_pct`` of the rows."""
    sizes: dict[str, int] = {}
    for r in rows:
        group = r.cells.get(column, "")
        if not group:
            raise TrainingError(f"{r.where}: empty {column} (needed by split_by={column!r})")
        sizes[group] = sizes.get(group, 0) + 1
    if len(sizes) < 2 and valid_pct > 0:
        raise TrainingError(f"split_by={column!r}: only {len(sizes)} group; need at least 2")
    order = sorted(sizes)
    random.Random(seed).shuffle(order)
    target, taken, chosen = valid_pct * len(rows), 0, set()
    for group in order[:-1]:  # the last group always trains
        if taken >= target or (taken and taken + sizes[group] - target > target - taken):
            break  # adding this group would overshoot more than stopping undershoots
        chosen.add(group)
        taken += sizes[group]
    return chosen
