"""Staging of an export in progress, and the removal of what killed exports left behind."""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path


def staging_lock(staging: Path) -> Path:
    """The lock file a live export holds beside its ``.tmp-*`` staging directory."""
    return staging.with_name(staging.name + ".lock")


#: Staging of an export from before these locks is taken for dead once it is this old.
_UNLOCKED_STAGING_AGE_S = 3600


def remove_dead_staging(model_dir: Path) -> list[Path]:
    """Remove the ``.tmp-*`` staging that killed exports left in ``model_dir``; live exports
    (their lock held) are left alone. Returns what was removed."""
    removed = []
    for staging in sorted(model_dir.glob(".tmp-*")):
        if not staging.is_dir():
            continue
        lock = staging_lock(staging)
        try:
            if not lock.exists():
                if time.time() - staging.stat().st_mtime < _UNLOCKED_STAGING_AGE_S:
                    continue
                shutil.rmtree(staging, ignore_errors=True)
                removed.append(staging)
                continue
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # a live export
        try:
            shutil.rmtree(staging, ignore_errors=True)
            lock.unlink(missing_ok=True)
            removed.append(staging)
        finally:
            os.close(fd)
    return removed
