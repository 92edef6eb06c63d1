"""Image datasets: find, validate and split labelled images (loaders: ``image_loaders``).

Two layouts, as in fast.ai's `ImageDataLoaders.from_folder` / `from_csv` and torchvision's
`ImageFolder`: a folder per class (with `train/` and `val/`/`valid/` splits, or one folder split by
a seeded, per-class random draw) and a CSV of `fname,label[,is_valid]`. Every image is opened once
at prep time, cheaply, so a corrupt file is named in the summary instead of killing a DataLoader
worker halfway through an epoch.
"""

from __future__ import annotations

import contextlib
import csv
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from training.errors import TrainingError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_TRUE = frozenset({"1", "true", "t", "yes", "y"})
_FALSE = frozenset({"0", "false", "f", "no", "n"})
_MAX_NAMED_SKIPS = 20

#: A class index today; a multi-hot / float tuple for multi-label or regression items later.
Target = int | tuple[float, ...]


@dataclass(frozen=True)
class ImageItem:
    """One image file and its target."""

    path: Path
    label: Target


@dataclass(frozen=True)
class SkippedFile:
    """An image file left out at prep time, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class ImageData:
    """Validated, split image items of a single-label classification set."""

    classes: tuple[str, ...]
    train: tuple[ImageItem, ...]
    valid: tuple[ImageItem, ...]
    test: tuple[ImageItem, ...]
    skipped: tuple[SkippedFile, ...]
    root: Path
    source: str  # "folder" | "csv"

    def class_counts(self, split: str) -> dict[str, int]:
        """Images per class name in `split` ("train" | "valid" | "test")."""
        counts = Counter(item.label for item in getattr(self, split))
        return {name: counts.get(i, 0) for i, name in enumerate(self.classes)}

    def summary(self) -> str:
        """One line: counts per split and class, and every skipped file named."""
        parts = [f"{self.source} {self.root}: {len(self.classes)} classes"]
        for split in ("train", "valid", "test"):
            per_class = ", ".join(f"{c} {n}" for c, n in self.class_counts(split).items())
            n = len(getattr(self, split))
            parts.append(f"{split} {n} ({per_class})" if n else f"{split} 0")
        parts.append(skipped_summary(self.skipped, lambda path: _relative(path, self.root)))
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "root": str(self.root),
            "classes": list(self.classes),
            "counts": {s: self.class_counts(s) for s in ("train", "valid", "test")},
            "skipped": [{"path": str(s.path), "reason": s.reason} for s in self.skipped],
        }


def skipped_summary(skipped: Sequence[SkippedFile], show=str) -> str:
    """``skipped N: a (reason), b (reason), ...``: the first 20 named, ``show`` formats a path."""
    named = [f"{show(s.path)} ({s.reason})" for s in skipped[:_MAX_NAMED_SKIPS]]
    if len(skipped) > _MAX_NAMED_SKIPS:
        named.append(f"and {len(skipped) - _MAX_NAMED_SKIPS} more")
    return f"skipped {len(skipped)}" + (": " + ", ".join(named) if named else "")


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


# --- reading image files -------------------------------------------------------------------

def unreadable_reason(path: Path) -> str | None:
    """Why `path` cannot be used as an image, or None when it decodes.

    A JPEG whose header parses and that ends with its end-of-image marker passes without a
    decode (a truncated file loses that marker); one that does not is decoded at 1/8 scale, which
    reads every byte but skips most of the inverse DCT. PNGs are CRC-checked by `verify()`
    without inflating the pixels. Other formats are decoded (first frame).
    """
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as im:
            if im.format == "PNG":
                im.verify()
                return None
            if im.format == "JPEG":
                if _ends_with_jpeg_eoi(im.fp):
                    return None
                im.draft("RGB", (1, 1))
            im.load()
    except UnidentifiedImageError:
        return "not an image"
    except Image.DecompressionBombError:
        return "too many pixels"
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        return f"unreadable: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    return None


def _ends_with_jpeg_eoi(fp) -> bool:
    # 0xFFD9 cannot occur inside entropy-coded data (0xFF is byte-stuffed there), so a file
    # ending in it was written to the end. Zero padding after the marker is common and harmless.
    fp.seek(-min(64, fp.seek(0, os.SEEK_END)), os.SEEK_END)
    return fp.read().rstrip(b"\x00").endswith(b"\xff\xd9")


def unreadable_reasons(paths: Sequence[Path]) -> list[str | None]:
    """`unreadable_reason` of each path, in order."""
    # PIL releases the GIL while decoding, so a few threads overlap file reads and decodes.
    if len(paths) < 32:
        return [unreadable_reason(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        return list(pool.map(unreadable_reason, paths, chunksize=16))


# --- finding and splitting ---------------------------------------------------------------

def _visible(name: str) -> bool:
    return not name.startswith(".")


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively, hidden entries ignored), in sorted order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        found.extend(Path(dirpath) / f for f in filenames
                     if _visible(f) and Path(f).suffix.lower() in IMAGE_EXTENSIONS)
    return sorted(found)


def _class_folders(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_dir() and _visible(p.name)}


def check_valid_pct(valid_pct: float) -> None:
    """Refuse a validation fraction outside [0, 1)."""
    if not 0.0 <= valid_pct < 1.0:
        raise TrainingError(f"valid_pct must be in [0, 1), got {valid_pct}")


def _split_class(paths: list[Path], name: str, valid_pct: float, seed: int):
    """Seeded draw of about `valid_pct` of one class's files for validation, at least one
    left for training. Seeding per class keeps a class's split stable when others change."""
    n_valid = min(round(len(paths) * valid_pct), len(paths) - 1)
    if valid_pct > 0 and len(paths) >= 2:
        n_valid = max(n_valid, 1)
    shuffled = sorted(paths)
    random.Random(f"{seed}/{name}").shuffle(shuffled)
    chosen = set(shuffled[:n_valid])
    return [p for p in sorted(paths) if p not in chosen], sorted(chosen)


def sort_class_names(names: Iterable[str]) -> tuple[str, ...]:
    """Sorted names; numerically when every name is an integer."""
    names = set(names)
    if all(n.lstrip("-").isdigit() for n in names):  # "2" before "10" for numeric labels
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


@dataclass
class _Split:
    """Candidate files per class for each split, before reading them."""

    train: dict[str, list[Path]]
    valid: dict[str, list[Path]]
    test: dict[str, list[Path]]
    train_where: dict[str, str]  # what to name when a class ends up with no training image


def _assemble(split: _Split, root: Path, source: str, valid_pct: float | None,
              seed: int, sort_names=tuple) -> ImageData:
    """Drop unreadable files, refuse empty classes, split if needed, number the classes."""
    groups = [split.train, split.valid, split.test]
    paths = [p for g in groups for ps in g.values() for p in ps]
    reasons = dict(zip(paths, unreadable_reasons(paths), strict=True))
    skipped = tuple(SkippedFile(p, r) for p, r in reasons.items() if r is not None)
    readable = [{c: [p for p in ps if reasons[p] is None] for c, ps in g.items()} for g in groups]
    train, valid, test = readable
    for name, where in split.train_where.items():
        if not train.get(name):
            raise TrainingError(f"class '{name}' has no training images in {where}")
    if valid_pct is not None:
        pairs = {c: _split_class(ps, c, valid_pct, seed) for c, ps in train.items()}
        train = {c: t for c, (t, _) in pairs.items()}
        valid = {c: v for c, (_, v) in pairs.items()}
    classes = sort_names(train)
    index = {c: i for i, c in enumerate(classes)}

    def items(group: dict[str, list[Path]]) -> tuple[ImageItem, ...]:
        return tuple(ImageItem(p, index[c]) for c in classes for p in group.get(c, []))

    return ImageData(classes, items(train), items(valid), items(test), skipped, root, source)


# --- the two layouts ------------------------------------------------------------------------

def from_folder(root: Path | str, *, valid_pct: float = 0.2, seed: int = 42) -> ImageData:
    """Images in `root/train/<class>/`, `root/val|valid/<class>/`, optional `root/test/<class>/`;
    or in `root/<class>/`, split per class with `valid_pct` and `seed`."""
    root = Path(root)
    check_valid_pct(valid_pct)
    if not root.is_dir():
        raise TrainingError(f"image folder {root} does not exist")
    train_dir = root / "train"
    if not train_dir.is_dir():
        classes = _class_folders(root)
        if not classes:
            raise TrainingError(f"no class folders in {root} (expected {root}/train/<class>/ "
                                f"and {root}/val/<class>/, or {root}/<class>/)")
        split = _Split({c: image_files(d) for c, d in classes.items()}, {}, {},
                       {c: str(d) for c, d in classes.items()})
        return _assemble(split, root, "folder", valid_pct, seed)
    valid_dirs = [root / n for n in ("val", "valid") if (root / n).is_dir()]
    if len(valid_dirs) > 1:
        raise TrainingError(f"{root} has both val/ and valid/; keep one validation folder")
    train_classes = _class_folders(train_dir)
    if not train_classes:
        raise TrainingError(f"no class folders in {train_dir}")
    groups = {}
    for kind, folder in (("valid", valid_dirs[0] if valid_dirs else None), ("test", root / "test")):
        found = _class_folders(folder) if folder and folder.is_dir() else {}
        for name, where in found.items():
            if name not in train_classes:
                raise TrainingError(f"class '{name}' is only in {where}; add its training "
                                    f"images in {train_dir / name}")
        groups[kind] = {c: image_files(d) for c, d in found.items()}
    split = _Split({c: image_files(d) for c, d in train_classes.items()},
                   groups["valid"], groups["test"], {c: str(d) for c, d in train_classes.items()})
    return _assemble(split, root, "folder", None if valid_dirs else valid_pct, seed)


def parse_flag(value: str, where: str, column: str) -> bool:
    """A true/false, yes/no or 1/0 cell; an error naming `where` and `column` otherwise."""
    v = value.strip().lower()
    if v in _TRUE or v in _FALSE:
        return v in _TRUE
    raise TrainingError(f"{where}: {column} must be true/false or 1/0, got {value!r}")


@contextlib.contextmanager
def csv_reader(csv_path: Path, columns: Sequence[str]) -> Iterator[csv.DictReader]:
    """A ``DictReader`` over ``csv_path`` whose header has been checked to hold ``columns``."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for column in columns:
            if column not in header:
                raise TrainingError(f"{csv_path} line 1: no column {column!r} "
                                    f"(columns: {', '.join(header) or 'none'})")
        yield reader


def from_csv(
    csv_path: Path | str,
    images_root: Path | str,
    *,
    fname_col: str = "fname",
    label_col: str = "label",
    valid_col: str | None = "is_valid",
    valid_pct: float = 0.2,
    seed: int = 42,
) -> ImageData:
    """Images listed in a CSV of `fname,label[,is_valid]`, paths relative to `images_root`.

    Without the `valid_col` column, the rows are split per class with `valid_pct` and `seed`.
    """
    csv_path, images_root = Path(csv_path), Path(images_root)
    check_valid_pct(valid_pct)
    if not csv_path.is_file():
        raise TrainingError(f"label file {csv_path} does not exist")
    train: dict[str, list[Path]] = {}
    valid: dict[str, list[Path]] = {}
    first_valid_line: dict[str, int] = {}
    with csv_reader(csv_path, (fname_col, label_col)) as reader:
        has_valid = valid_col is not None and valid_col in reader.fieldnames
        for row in reader:
            where = f"{csv_path} line {reader.line_num}"
            fname, label = (row.get(fname_col) or "").strip(), (row.get(label_col) or "").strip()
            if not fname or not label:
                raise TrainingError(f"{where}: empty {fname_col if not fname else label_col}")
            path = images_root / fname
            if not path.is_file():
                raise TrainingError(f"{where}: file {fname!r} not found under {images_root}")
            if has_valid and parse_flag(row.get(valid_col) or "", where, valid_col):
                valid.setdefault(label, []).append(path)
                first_valid_line.setdefault(label, reader.line_num)
            else:
                train.setdefault(label, []).append(path)
    if not train and not valid:
        raise TrainingError(f"{csv_path}: no rows")
    for label, line in first_valid_line.items():
        if label not in train:
            raise TrainingError(f"{csv_path} line {line}: class '{label}' is only in "
                                f"validation rows; add training rows for it")
    split = _Split(train, valid, {}, {c: f"{csv_path} (rows labelled '{c}')" for c in train})
    return _assemble(split, images_root, "csv", None if has_valid else valid_pct, seed,
                     sort_names=sort_class_names)


def prepare_image_data(
    data: str | Path,
    *,
    csv: str | Path | None = None,
    valid_pct: float = 0.2,
    seed: int = 42,
) -> ImageData:
    """Validate and split an image folder, or a CSV of ``fname,label[,is_valid]`` under ``data``."""
    data = Path(data)
    if not data.exists():
        raise TrainingError(f"image data not found: {data}")
    if csv is not None:
        return from_csv(csv, data, valid_pct=valid_pct, seed=seed)
    return from_folder(data, valid_pct=valid_pct, seed=seed)
