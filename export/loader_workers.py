"""How DataLoader worker processes start, for training and scoring alike."""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.context import BaseContext


def available_cores() -> int:
    """Cores this process may run on (CPU affinity / cgroup-pinned set), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def worker_context(*preload: str) -> BaseContext | None:
    """How DataLoader worker processes start: from a forkserver where the platform has one.

    A plain fork copies a process that runs threads. Prefect's flow process does: its log and
    event services register thread-exit hooks that fail in a forked child, so every forked
    worker exited with code 1 as it shut down and the DataLoader aborted the whole run. Workers
    forked from a clean forkserver inherit none of that, nor a lock another thread held. The
    server starts once per process and imports torch and ``preload`` once (a few seconds);
    each worker after that starts as fast as a fork. As on macOS, a script that starts workers
    needs the ``if __name__ == "__main__":`` guard. None: the platform's default start method.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    # Takes effect when the server first starts; a module missing from it is imported by the
    # worker that needs it, so a later call with other modules is still correct.
    multiprocessing.set_forkserver_preload(["torch", *preload])
    return multiprocessing.get_context("forkserver")
