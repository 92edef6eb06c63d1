"""An image folder as model input: a deterministic walk, then decoding in DataLoader workers.

The walk lists image files recursively in sorted relative-path order, skips hidden names (a
leading ``.``), follows directory symlinks but never a loop (real paths of visited directories
are remembered). Decoding reproduces the
validation transform of the ImageNet reference scripts that training uses — upright (EXIF) RGB,
shorter side resized to ``resize_size``, centre crop ``input_size`` — and stops at uint8 HWC: the
exported graph normalises. A file that cannot be decoded (decompression bomb, empty, truncated,
not an image) becomes an error string for its row; the collate keeps such rows aside so one bad
file never stops a batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from export.loader_workers import available_cores, worker_context
from export.pixels import Preprocessing, decode_for_model, is_image_name
from scoring.errors import ImageFolderError

#: Below this many files, worker start-up costs more than decoding in the main process.
TINY_FOLDER = 128


@dataclass(frozen=True)
class ImageFile:
    """One image file found by the walk; ``relpath`` uses ``/`` whatever the OS."""

    path: Path
    relpath: str
    size: int
    mtime_ns: int


def walk_images(folder: str | Path) -> list[ImageFile]:
    """Every image file under ``folder`` (any depth, suffix in any case), sorted by relpath."""
    root = Path(folder)
    if not root.exists():
        raise ImageFolderError(f"{root}: no such folder")
    if not root.is_dir():
        raise ImageFolderError(f"{root}: not a folder")
    found: list[ImageFile] = []
    seen_dirs = {os.path.realpath(root)}
    pending = [(root, "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:  # unreadable sub-folder: nothing in it can be scored
            continue
        for entry in entries:
            if entry.name.startswith("."):  # .thumbnails/, macOS ._photo.jpg forks, ...
                continue
            rel = f"{prefix}{_printable(entry.name)}"
            if entry.is_dir():  # follows symlinks, hence the loop guard
                real = os.path.realpath(entry.path)
                if real not in seen_dirs:
                    seen_dirs.add(real)
                    pending.append((Path(entry.path), f"{rel}/"))
            elif entry.is_file() and is_image_name(entry.name):
                st = entry.stat()
                found.append(ImageFile(Path(entry.path), rel, st.st_size, st.st_mtime_ns))
    return sorted(found, key=lambda f: f.relpath)


def _printable(name: str) -> str:
    """A file name as valid UTF-8 text for Parquet; undecodable bytes become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def describe_error(err: BaseException) -> str:
    """One line: exception class and message."""
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


class DecodedImages(Dataset):
    """Yields ``(index, image or None, error or None)`` for each file, decoded by ``spec``."""

    def __init__(self, files: Sequence[ImageFile], spec: Preprocessing):
        self.files = files
        self.spec = spec

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str | None]:
        try:
            return i, decode_for_model(self.files[i].path, self.spec), None
        except Exception as err:  # any decoder failure belongs to this row, not to the run
            return i, None, describe_error(err)


@dataclass(frozen=True)
class DecodedBatch:
    """Decoded images of one batch, and the rows that failed, each by file index."""

    indices: np.ndarray  # int64 (n,)
    images: torch.Tensor  # uint8 (n, H, W, 3); a tensor so workers pass it through shared memory
    failed: tuple[tuple[int, str], ...]


def collate_decoded(items: list[tuple[int, np.ndarray | None, str | None]]) -> DecodedBatch:
    """Stack the decoded images; keep failed rows aside with their error."""
    good = [(i, image) for i, image, error in items if error is None]
    failed = tuple((i, error) for i, _, error in items if error is not None)
    if good:
        images = torch.from_numpy(np.stack([image for _, image in good]))
    else:
        images = torch.empty((0, 0, 0, 3), dtype=torch.uint8)
    return DecodedBatch(np.array([i for i, _ in good], dtype=np.int64), images, failed)


def default_workers(n_files: int) -> int:
    """Decoding processes: none for a tiny folder, else one per spare core (at least one)."""
    if n_files < TINY_FOLDER:
        return 0
    return max(1, min(8, available_cores() - 1))


def decoded_batches(files: list[ImageFile], spec: Preprocessing, batch_size: int,
                    workers: int | None) -> Iterator[DecodedBatch]:
    """Batches of ``files`` decoded as ``spec`` says, in file order.

    workers: DataLoader decoding processes (None: :func:`default_workers`, 0: this process).
    """
    if not files:
        return iter(())
    workers = default_workers(len(files)) if workers is None else workers
    return iter(DataLoader(DecodedImages(files, spec), batch_size=batch_size,
                           num_workers=workers, collate_fn=collate_decoded,
                           prefetch_factor=4 if workers else None,
                           multiprocessing_context=(worker_context("scoring.image_folder")
                                                    if workers else None)))
