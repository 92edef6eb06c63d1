"""The machinery behind one writer per partition: lock files, the swap into place, and the
removal of what dead runs left in ``<out>/_staging`` (see :mod:`scoring.partition`)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from scoring.errors import PartitionError

if TYPE_CHECKING:
    from scoring.partition import PendingPartition

SUCCESS_MARKER = "_SUCCESS"
STAGING_DIR = "_staging"
_TRASH_DIR = "_trash"  # inside STAGING_DIR: what runs cleared, deleted after their lock is freed


# Lock files this process holds, by path. flock belongs to the open file, which a forked child
# (a DataLoader worker) would share and keep alive after this process died: children close it.
_held: dict[Path, int] = {}
_held_guard = threading.Lock()


def _forget_locks_in_child() -> None:
    global _held_guard
    for fd in _held.values():
        os.close(fd)
    _held.clear()
    _held_guard = threading.Lock()


os.register_at_fork(after_in_child=_forget_locks_in_child)


def lock_partition(pending: PendingPartition) -> None:
    """Hold the partition's lock, recording who holds it; a live holder is a PartitionError."""
    for _ in range(100):  # a sweeper holds it for a few renames: wait that out, not a run
        try:
            fd = _try_lock(pending.lock_path)
        except OSError as err:
            raise PartitionError(f"out {pending.out}: cannot lock {pending.lock_path}: "
                                 f"{err.strerror}") from None
        holder = None if fd is not None else _holder(pending.lock_path)
        if fd is not None or not (holder or {}).get("sweeping"):
            break
        time.sleep(0.02)
    if fd is None:
        who = (f"run {holder['run_id']} (pid {holder['pid']} on {holder['host']}, since "
               f"{holder['started_at']})" if holder else f"another run (lock {pending.lock_path})")
        raise PartitionError(
            f"{pending.table} run_date={pending.run_date.isoformat()} under {pending.out} is "
            f"being written by {who}; not starting a second writer")
    _write_holder(fd, run_id=pending.run_id)
    with _held_guard:
        _held[pending.lock_path] = fd


def _write_holder(fd: int, **fields) -> None:
    holder = fields | {"pid": os.getpid(), "host": socket.gethostname(),
                       "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)


def _try_lock(path: Path) -> int | None:
    """An fd holding ``flock`` on ``path`` (created if missing), or None while another holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder unlinked it between our open and our lock: open the new one


def _holder(path: Path) -> dict | None:
    for _ in range(20):  # the holder writes who it is just after taking the lock
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.01)
    return None


def unlock(path: Path) -> None:
    """Release a lock this process holds, removing its file and the empty staging directory."""
    with _held_guard:
        fd = _held.pop(path, None)
    if fd is None:
        return
    try:
        path.unlink(missing_ok=True)  # while still held: see the inode check in _try_lock
        with contextlib.suppress(OSError):
            path.with_name(path.name.removesuffix(".lock")).rmdir()
    finally:
        os.close(fd)


def clear_staging(final: Path, staging: Path, trash: Path | None = None) -> None:
    """Under the partition's lock: put back an old partition a crash left aside, delete the rest
    or move it to ``trash`` (renames only: a sweeper holds the lock for moments)."""
    if not staging.is_dir():
        return
    if not final.exists():
        # A crash between the two renames of the fallback commit.
        for old in sorted(staging.glob("*.old"), reverse=True):
            if (old / SUCCESS_MARKER).exists():
                os.rename(old, final)
                break
    for leftover in list(staging.iterdir()):
        if trash is None:
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            continue
        for _ in range(3):  # another sweeper may be deleting the trash directory itself
            trash.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.rename(leftover, trash / uuid.uuid4().hex)
                break


def clear_dead_runs(out: Path) -> None:
    """Remove the staging of every table and date of ``out`` whose writer is dead (lock free).

    Best effort: what cannot be removed now is left for the next run.
    """
    root, trash = out / STAGING_DIR, out / STAGING_DIR / _TRASH_DIR
    for table_dir in sorted(p for p in root.iterdir() if p.is_dir() and p != trash):
        names = {p.name.removesuffix(".lock") for p in table_dir.glob("run_date=*")}
        for name in sorted(names):
            lock = table_dir / f"{name}.lock"
            with _held_guard:
                if lock in _held:
                    continue
            with contextlib.suppress(OSError):
                fd = _try_lock(lock)
                if fd is None:
                    continue  # a live run
                try:
                    _write_holder(fd, sweeping=True)
                    clear_staging(out / table_dir.name / name, table_dir / name, trash)
                    with contextlib.suppress(OSError):
                        (table_dir / name).rmdir()
                    lock.unlink(missing_ok=True)
                finally:
                    os.close(fd)
    shutil.rmtree(trash, ignore_errors=True)


def clear_legacy_staging(table_dir: Path) -> None:
    """Hidden staging directories inside the table, left by lensflow before ``_staging``."""
    for old in sorted(table_dir.glob(".run_date=*.old"), reverse=True):
        final = table_dir / old.name[1:len(".run_date=YYYY-MM-DD")]
        if not final.exists() and (old / SUCCESS_MARKER).exists():
            os.rename(old, final)
    for stale in [*table_dir.glob(".run_date=*.tmp"), *table_dir.glob(".run_date=*.old")]:
        shutil.rmtree(stale, ignore_errors=True)


def swap_into_place(temp: Path, final: Path) -> None:
    if not final.exists():
        os.rename(temp, final)
        return
    if _exchange(temp, final):
        shutil.rmtree(temp)  # now holds the previous partition
        return
    aside = temp.with_name(temp.name + ".old")
    os.rename(final, aside)
    os.rename(temp, final)  # the only window with no partition: between these two calls
    shutil.rmtree(aside)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux ``renameat2(RENAME_EXCHANGE)``; False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))
