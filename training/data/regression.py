"""Image regression data: float targets per image, or points in pixels (fast.ai lesson 3's
head-pose regression with a ``y_range``).

Two shapes of CSV, one reader: ``fname`` plus float columns named by ``targets`` (predicted as
they are), or plus pixel-coordinate column pairs named by ``points`` (``center_x,center_y``),
which ``training.data.points`` maps into the model's view as [-1, 1] coordinates. ``split_by`` keeps
every group (a person, an animal) on one side of the train/valid split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from export.pixels import upright_size
from training.data.image_csv import TableRow, read_rows, split_rows
from training.data.images import ImageItem, SkippedFile, skipped_summary
from training.data.points import PointItem
from training.errors import TrainingError


@dataclass(frozen=True)
class RegressionData:
    """Validated, split items whose labels are float tuples in ``classes`` (output) order.

    points: the (x, y) column pairs when the targets are points (labels then in pixels and
    items are ``PointItem``s), else empty.
    """

    classes: tuple[str, ...]
    train: tuple[ImageItem, ...]
    valid: tuple[ImageItem, ...]
    skipped: tuple[SkippedFile, ...]
    root: Path
    split: str
    points: tuple[tuple[str, str], ...] = ()
    source: str = "csv"
    task: str = "regression"

    @property
    def kind(self) -> str:
        """``points`` or ``values``."""
        return "points" if self.points else "values"

    def target_ranges(self) -> dict[str, tuple[float, float]]:
        """(min, max) of each target over the training items."""
        columns = list(zip(*(item.label for item in self.train), strict=True))
        return {c: (min(v), max(v)) for c, v in zip(self.classes, columns, strict=True)}

    def summary(self) -> str:
        """One line: targets, counts per split, training ranges, skipped files."""
        ranges = ", ".join(f"{c} {lo:g}..{hi:g}" for c, (lo, hi) in self.target_ranges().items())
        what = ("points " + " ".join(f"({x},{y})" for x, y in self.points) if self.points
                else "targets")
        parts = [f"regression csv {self.root}: {what} [{ranges}], split {self.split}",
                 f"train {len(self.train)}", f"valid {len(self.valid)}"]
        parts.append(skipped_summary(self.skipped))
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "kind": self.kind,
            "source": self.source,
            "root": str(self.root),
            "split": self.split,
            "classes": list(self.classes),
            "points": [list(p) for p in self.points],
            "counts": {"train": len(self.train), "valid": len(self.valid)},
            "target_ranges": {c: list(r) for c, r in self.target_ranges().items()},
            "skipped": [{"path": str(s.path), "reason": s.reason} for s in self.skipped],
        }


def parse_columns(spec: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """``"a,b"`` or ``["a", "b"]`` → ``("a", "b")``; blanks dropped."""
    if spec is None:
        return ()
    pieces = spec.split(",") if isinstance(spec, str) else list(spec)
    return tuple(p.strip() for p in pieces if p.strip())


def _float(row: TableRow, column: str) -> float:
    raw = row.cells[column]
    try:
        value = float(raw)
    except ValueError:
        raise TrainingError(f"{row.where}: {column} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise TrainingError(f"{row.where}: {column} must be finite, got {raw!r}")
    return value


def from_regression_csv(
    csv_path: Path | str,
    images_root: Path | str,
    *,
    targets: str | list[str] | tuple[str, ...] | None = None,
    points: str | list[str] | tuple[str, ...] | None = None,
    fname_col: str = "fname",
    valid_col: str | None = "is_valid",
    valid_pct: float = 0.2,
    seed: int = 42,
    split_by: str | None = None,
) -> RegressionData:
    """Images listed in a CSV with float ``targets`` columns, or ``points`` columns x,y[,x,y...]
    in pixels. Without ``valid_col`` (or with ``split_by``) rows are split with ``valid_pct``."""
    target_cols, point_cols = parse_columns(targets), parse_columns(points)
    if bool(target_cols) == bool(point_cols):
        raise TrainingError("give exactly one of targets (float columns) or points (x,y columns)")
    if point_cols and len(point_cols) % 2:
        raise TrainingError(f"points needs x,y column pairs, got {','.join(point_cols)}")
    columns = target_cols or point_cols
    if len(set(columns)) != len(columns):
        raise TrainingError(f"a target column is named twice: {','.join(columns)}")
    rows, has_valid = read_rows(csv_path, images_root,
                                columns=list(columns) + ([split_by] if split_by else []),
                                fname_col=fname_col, valid_col=valid_col)
    values = {row.where: tuple(_float(row, c) for c in columns) for row in rows}
    table = split_rows(rows, has_valid=has_valid, valid_pct=valid_pct, seed=seed,
                       split_by=split_by)

    def items(group: tuple[TableRow, ...]) -> tuple[ImageItem, ...]:
        if target_cols:
            return tuple(ImageItem(row.path, values[row.where]) for row in group)
        return tuple(PointItem(row.path, values[row.where], upright_size(row.path))
                     for row in group)

    pairs = tuple(zip(point_cols[0::2], point_cols[1::2], strict=True))
    return RegressionData(columns, items(table.train), items(table.valid), table.skipped,
                          Path(images_root), table.split, pairs)
