"""The files of a bundle being written: its version id, the libraries that made it, the listing
of its files for the manifest, and the flush that freezes it."""

from __future__ import annotations

import platform
import secrets
import stat
import threading
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path

from export.bundle_remote import MANIFEST
from export.errors import ExportError
from export.pins import file_sha256, fsync_path

_VERSION_FORMAT = "%Y%m%dT%H%M%S.%fZ"

_last_stamp: datetime | None = None
_stamp_lock = threading.Lock()


def new_version(now: datetime | None = None) -> str:
    """A version id that sorts lexically in time order, e.g. ``20261123T104512.123456Z-3f9a``.

    Within one process the timestamp strictly increases (a clash moves it on by 1 µs); the random
    suffix keeps ids from two processes apart even within the same microsecond.
    """
    global _last_stamp
    if now is None:
        with _stamp_lock:
            now = datetime.now(timezone.utc)
            if _last_stamp is not None and now <= _last_stamp:
                now = _last_stamp + timedelta(microseconds=1)
            _last_stamp = now
    elif now.tzinfo is None:
        raise ValueError("new_version: `now` must be timezone-aware (UTC)")
    return f"{now.astimezone(timezone.utc).strftime(_VERSION_FORMAT)}-{secrets.token_hex(2)}"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that produced or will read the exports."""
    versions = {"python": platform.python_version()}
    for key, dists in {"torch": ["torch"], "onnx": ["onnx"],
                       "onnxruntime": ["onnxruntime", "onnxruntime-gpu"],
                       "safetensors": ["safetensors"]}.items():
        for dist in dists:
            try:
                versions[key] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            versions[key] = "absent"
    return versions


def listed_files(root: Path) -> dict[str, dict]:
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != MANIFEST:
            files[rel] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    return files


def fsync_and_freeze(root: Path) -> None:
    """Flush every file to disk and make it read-only: a committed bundle never changes."""
    for path in root.rglob("*"):
        if path.is_file():
            fsync_path(path)
            path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    for path in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        fsync_path(path)


def json_default(value: object) -> object:
    """Serialise what training code naturally puts in a manifest: numpy/torch scalars and arrays,
    paths and result dataclasses with ``to_dict``."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise ExportError(f"manifest: a value of type {type(value).__name__} is not JSON-serialisable")
