"""Multi-label image data: every image carries any number of labels, none included.

The PASCAL-style CSV of fast.ai lesson 3 (``fname,labels[,is_valid]``, labels separated by a
space). Targets are multi-hot float vectors over a vocabulary taken from the training split only:
a label that appears only in validation rows cannot be learnt, so it is named in the summary and
left out of the targets instead of silently becoming a class that is never positive in training.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from training.data.image_csv import TableRow, read_rows, split_rows
from training.data.images import ImageItem, SkippedFile, skipped_summary, sort_class_names
from training.errors import TrainingError


@dataclass(frozen=True)
class MultiLabelData:
    """Validated, split items whose labels are multi-hot tuples over ``classes``.

    valid_only: labels seen only in validation rows, with their row counts (not in ``classes``).
    """

    classes: tuple[str, ...]
    train: tuple[ImageItem, ...]
    valid: tuple[ImageItem, ...]
    skipped: tuple[SkippedFile, ...]
    root: Path
    valid_only: dict[str, int]
    split: str
    source: str = "csv"
    task: str = "multi_label"

    def label_counts(self, split: str) -> dict[str, int]:
        """Images carrying each label in ``split`` ("train" | "valid")."""
        items = getattr(self, split)
        return {c: sum(int(item.label[i]) for item in items) for i, c in enumerate(self.classes)}

    def unlabelled(self, split: str) -> int:
        """Images with no label (of the vocabulary) in ``split``."""
        return sum(1 for item in getattr(self, split) if not any(item.label))

    def summary(self) -> str:
        """One line: labels, counts per split and label, valid-only labels, skipped files."""
        parts = [f"multi-label csv {self.root}: {len(self.classes)} labels, split {self.split}"]
        for split in ("train", "valid"):
            counts = ", ".join(f"{c} {n}" for c, n in self.label_counts(split).items())
            parts.append(f"{split} {len(getattr(self, split))} images ({counts}; "
                         f"no label {self.unlabelled(split)})")
        if self.valid_only:
            named = ", ".join(f"{c} ({n})" for c, n in self.valid_only.items())
            parts.append(f"labels only in validation, not learnt: {named}")
        parts.append(skipped_summary(self.skipped))
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "source": self.source,
            "root": str(self.root),
            "split": self.split,
            "classes": list(self.classes),
            "counts": {s: self.label_counts(s) for s in ("train", "valid")},
            "unlabelled": {s: self.unlabelled(s) for s in ("train", "valid")},
            "valid_only": dict(self.valid_only),
            "skipped": [{"path": str(s.path), "reason": s.reason} for s in self.skipped],
        }


def parse_labels(cell: str, delim: str = " ") -> tuple[str, ...]:
    """Distinct labels of one cell in first-seen order; empty pieces (double spaces) dropped."""
    pieces = cell.split(delim) if delim.strip() else cell.split()
    return tuple(dict.fromkeys(p.strip() for p in pieces if p.strip()))


def from_multilabel_csv(
    csv_path: Path | str,
    images_root: Path | str,
    *,
    fname_col: str = "fname",
    labels_col: str = "labels",
    label_delim: str = " ",
    valid_col: str | None = "is_valid",
    valid_pct: float = 0.2,
    seed: int = 42,
    split_by: str | None = None,
) -> MultiLabelData:
    """Images listed in a CSV of ``fname,labels[,is_valid]``; labels split on ``label_delim``.

    Without ``valid_col`` (or with ``split_by``) the rows are split with ``valid_pct``/``seed``.
    """
    if not label_delim:
        raise TrainingError("label_delim must not be empty")
    columns = [labels_col] + ([split_by] if split_by else [])
    rows, has_valid = read_rows(csv_path, images_root, columns=columns, fname_col=fname_col,
                                valid_col=valid_col)
    table = split_rows(rows, has_valid=has_valid, valid_pct=valid_pct, seed=seed,
                       split_by=split_by)

    def labels(row: TableRow) -> tuple[str, ...]:
        return parse_labels(row.cells[labels_col], label_delim)

    classes = sort_class_names({lab for row in table.train for lab in labels(row)})
    if not classes:
        raise TrainingError(f"{csv_path}: no labels in the training rows")
    seen_valid = Counter(lab for row in table.valid for lab in labels(row))
    valid_only = {lab: n for lab, n in sorted(seen_valid.items()) if lab not in classes}
    index = {c: i for i, c in enumerate(classes)}

    def items(group: tuple[TableRow, ...]) -> tuple[ImageItem, ...]:
        out = []
        for row in group:
            hot = [0.0] * len(classes)
            for lab in labels(row):
                if lab in index:
                    hot[index[lab]] = 1.0
            out.append(ImageItem(row.path, tuple(hot)))
        return tuple(out)

    return MultiLabelData(classes, items(table.train), items(table.valid), table.skipped,
                          Path(images_root), valid_only, table.split)
