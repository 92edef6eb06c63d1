"""An image folder's files: a deterministic walk of a local folder or of an object-storage prefix.

The walk lists image files recursively in sorted relative-path order, skips hidden names (a
leading ``.``), follows directory symlinks but never a loop (real paths of visited directories
are remembered). A symlink loop, a file or folder deleted while the walk runs and a folder it may
not read are counted skips (:class:`FolderWalk`), never an aborted run. A folder may also be a
URL (``s3://bucket/photos``): the walk is then one recursive listing of the prefix. Decoding the
files is :mod:`scoring.image_batches`'.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from export.pixels import is_image_name
from export.storage import filesystem, full_url, is_url, ref_text
from scoring.errors import ImageFolderError

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)  # slots: a million of them in a nightly walk
class ImageFile:
    """One image file found by the walk; ``relpath`` uses ``/`` whatever the OS; ``path`` is a
    URL for a folder on object storage."""

    path: Path | str
    relpath: str
    size: int
    mtime_ns: int


#: Why the walk passed something by: a symlink loop or a directory reached twice, a file or
#: folder deleted while the walk ran (or a symlink whose target is gone), a folder or file it
#: may not read.
SKIP_REASONS = ("loop", "vanished", "unreadable")


@dataclass(frozen=True)
class WalkSkip:
    """Something under the folder the walk could not list or stat, and why."""

    relpath: str
    reason: str  # one of SKIP_REASONS


@dataclass(frozen=True)
class FolderWalk:
    """What :func:`walk_folder` found: the image files, sorted, and what it passed by."""

    files: tuple[ImageFile, ...]
    skipped: tuple[WalkSkip, ...] = ()

    def skip_counts(self) -> dict[str, int]:
        """Skips per reason, every reason present (0 when none)."""
        return {r: sum(s.reason == r for s in self.skipped) for r in SKIP_REASONS}

    def skip_line(self) -> str:
        """One line for a log or a summary; empty when nothing was skipped."""
        if not self.skipped:
            return ""
        counts = ", ".join(f"{n} {r}" for r, n in self.skip_counts().items() if n)
        shown = ", ".join(s.relpath for s in self.skipped[:_SHOWN_SKIPS])
        more = ", …" if len(self.skipped) > _SHOWN_SKIPS else ""
        return f"walk skipped {len(self.skipped)} ({counts}): {shown}{more}"


_SHOWN_SKIPS = 5


def walk_images(folder: str | Path) -> list[ImageFile]:
    """Every image file under ``folder`` (any depth, suffix in any case), sorted by relpath.

    What the walk passes by is logged as one warning; :func:`walk_folder` returns it.
    """
    walk = walk_folder(folder)
    if walk.skipped:
        _log.warning("%s: %s", folder, walk.skip_line())
    return list(walk.files)


def walk_folder(folder: str | Path) -> FolderWalk:
    """The image files under ``folder``, and every loop, vanished entry or unreadable folder
    passed by on the way; only a missing or unreadable ``folder`` itself is an error."""
    if is_url(folder):
        return _walk_store(ref_text(folder))
    root = Path(folder)
    if not root.exists():
        raise ImageFolderError(f"{root}: no such folder")
    if not root.is_dir():
        raise ImageFolderError(f"{root}: not a folder")
    if not os.access(root, os.R_OK | os.X_OK):
        raise ImageFolderError(f"{root}: cannot read the folder (permission denied)")
    found: list[ImageFile] = []
    skipped: list[WalkSkip] = []
    seen_dirs = {os.path.realpath(root)}
    pending = [(root, "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as listing:
                entries = list(listing)
        except OSError as err:  # deleted meanwhile, or no permission: nothing in it to score
            skipped.append(WalkSkip(prefix.rstrip("/"), _reason(err)))
            continue
        for entry in entries:
            if entry.name.startswith("."):  # .thumbnails/, macOS ._photo.jpg forks, ...
                continue
            rel = f"{prefix}{_printable(entry.name)}"
            try:
                kind = _kind(entry)
                if kind == "dir":
                    real = os.path.realpath(entry.path)
                    if real in seen_dirs:  # a link to an ancestor, or a folder linked twice
                        skipped.append(WalkSkip(rel, "loop"))
                    else:
                        seen_dirs.add(real)
                        pending.append((Path(entry.path), f"{rel}/"))
                elif is_image_name(entry.name):
                    if kind != "file":  # a dangling symlink: its target is gone
                        raise FileNotFoundError(entry.path)
                    st = entry.stat()
                    found.append(ImageFile(Path(entry.path), rel, st.st_size, st.st_mtime_ns))
            except OSError as err:
                skipped.append(WalkSkip(rel, _reason(err)))
    found.sort(key=lambda f: f.relpath)
    return FolderWalk(tuple(found), tuple(sorted(skipped, key=lambda s: s.relpath)))


def _walk_store(url: str) -> FolderWalk:
    """The image objects under a URL prefix: one recursive listing, no loops to guard against."""
    fs, root = filesystem(url)
    try:
        listing = fs.find(root, detail=True)
    except OSError as err:  # no permission, no such bucket
        raise ImageFolderError(f"{url}: cannot list the folder ({describe_error(err)})") from None
    if not listing and not fs.isdir(root):
        raise ImageFolderError(f"{url}: no such folder")
    found = []
    for path, info in listing.items():
        rel = path[len(root):].lstrip("/")
        if any(part.startswith(".") for part in rel.split("/")) or not is_image_name(rel):
            continue
        found.append(ImageFile(full_url(fs, path), rel, int(info.get("size") or 0),
                               _mtime_ns(info)))
    found.sort(key=lambda f: f.relpath)
    return FolderWalk(tuple(found))


def _mtime_ns(info: dict) -> int:
    """An object's modification time in ns (S3 ``LastModified``, GCS ``updated``, ...)."""
    stamp = info.get("LastModified") or info.get("mtime") or info.get("updated") or 0
    if isinstance(stamp, str):
        stamp = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    if isinstance(stamp, datetime):
        return int(stamp.timestamp()) * 1_000_000_000 + stamp.microsecond * 1000
    return int(float(stamp) * 1_000_000_000)


def _kind(entry: os.DirEntry) -> str:
    """"dir" | "file" | "other", following symlinks; a loop or a permission error raises."""
    if entry.is_dir():  # follows symlinks, hence the loop guard
        return "dir"
    return "file" if entry.is_file() else "other"


def _reason(err: OSError) -> str:
    if err.errno == errno.ELOOP:  # a symlink to itself, or a chain too long to follow
        return "loop"
    if isinstance(err, (FileNotFoundError, NotADirectoryError)):
        return "vanished"
    return "unreadable"


def _printable(name: str) -> str:
    """A file name as valid UTF-8 text for Parquet; undecodable bytes become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def describe_error(err: BaseException) -> str:
    """One line: exception class and message."""
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__
