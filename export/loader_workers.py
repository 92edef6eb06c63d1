"""How DataLoader worker processes start, for training and scoring alike, and how they end.

Every process started here dies with the process that started it, whatever killed that one
(SIGKILL and the OOM killer included): the forkserver and each worker ask Linux for
``PR_SET_PDEATHSIG`` = SIGKILL. Without it a killed scorer left its forkserver and workers alive
for good: every worker holds the forkserver's "alive" pipe open and watches only its own parent,
the forkserver, so neither side ever noticed (~1.35 GB per cancelled night). The resource tracker
needs nothing: it exits once the last process holding its pipe (these ones) is gone.

A worker does not re-run the starter's ``__main__`` either. multiprocessing tells every
forkserver child to import the main script (or ``-m`` module) again under the name
``__mp_main__`` — the server was meant to do it once, but CPython 3.11 never hands it the path
— so each worker paid 0.7 s of CPU importing ``flows.cli`` under the ``lensflow`` command and
1.5 s importing ``prefect.engine`` in a Prefect flow run, before its first image. What workers
unpickle (datasets, transforms, collate functions) lives in lensflow's modules; an object
defined in a ``__main__`` script cannot be sent to them, and pickling says so.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import types
from multiprocessing import popen_forkserver
from multiprocessing.context import BaseContext, ForkServerContext, ForkServerProcess

#: Set in the starting process for the forkserver it is about to start: "die with pid N".
PARENT_ENV = "LENSFLOW_FORKSERVER_PARENT"
_PR_SET_PDEATHSIG = 1
#: This process's pid when it is our forkserver; workers forked from it inherit the value.
_server_pid: int | None = None


def available_cores() -> int:
    """Cores this process may run on (CPU affinity / cgroup-pinned set), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def die_with_parent(parent: int | None = None) -> bool:
    """Have Linux SIGKILL this process when ``parent`` (default: the current parent) dies.

    The signal follows the parent *thread* that forked this process, so call it only in a
    process started from a long-lived thread (a forkserver, the thread iterating a DataLoader).
    A parent already gone when the request lands means this process is an orphan: it kills
    itself. False where the platform has no ``prctl`` (not Linux): nothing was set.
    """
    if not sys.platform.startswith("linux"):
        return False
    expected = os.getppid() if parent is None else parent
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != expected:  # died before the request: the signal will never come
        os.kill(os.getpid(), signal.SIGKILL)
    return True


class _MainlessPopen(popen_forkserver.Popen):
    """Starts a forkserver child without asking it to re-import this process's ``__main__``.

    The request is built from ``sys.modules["__main__"]`` while the child is launched, so for
    those few milliseconds a bare module stands in for it: no file, no module name, nothing to
    re-run. Pickling an object of the real ``__main__`` in that window fails, which is the
    honest answer — the child could not have rebuilt it without running the script.
    """

    def _launch(self, process_obj):
        main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            super()._launch(process_obj)
        finally:
            sys.modules["__main__"] = main


class _WorkerProcess(ForkServerProcess):
    """A forkserver child that dies with the forkserver (which dies with its starter) and
    starts without re-importing the starter's main script."""

    @staticmethod
    def _Popen(process_obj):
        return _MainlessPopen(process_obj)

    def run(self):
        die_with_parent(_server_pid)
        super().run()


class _WorkerContext(ForkServerContext):
    Process = _WorkerProcess


def worker_context(*preload: str) -> BaseContext | None:
    """How DataLoader worker processes start: from a forkserver where the platform has one.

    A plain fork copies a process that runs threads. Prefect's flow process does: its log and
    event services register thread-exit hooks that fail in a forked child, so every forked
    worker exited with code 1 as it shut down and the DataLoader aborted the whole run. Workers
    forked from a clean forkserver inherit none of that, nor a lock another thread held. The
    server starts once per process and imports torch and ``preload`` once (a few seconds);
    each worker after that starts as fast as a fork. As on macOS, a script that starts workers
    needs the ``if __name__ == "__main__":`` guard. None: the platform's default start method.
    The server and the workers die with this process (see the module's docstring).
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    # Read by this module's import in the server, which comes first so the window in which
    # the server could outlive a killed starter is as short as possible.
    os.environ[PARENT_ENV] = str(os.getpid())
    # Takes effect when the server first starts; a module missing from it is imported by the
    # worker that needs it, so a later call with other modules is still correct.
    multiprocessing.set_forkserver_preload([__name__, "torch", *preload])
    return _WorkerContext()


def _in_forkserver() -> bool:
    """True in the process ``multiprocessing.forkserver`` runs (``python -c "...main(...)"``)."""
    return sys.argv[:1] == ["-c"] and "multiprocessing.forkserver" in sys.modules


def _guard_forkserver() -> None:
    global _server_pid
    parent = os.environ.get(PARENT_ENV, "")
    if parent.isdigit() and _in_forkserver():
        die_with_parent(int(parent))
        _server_pid = os.getpid()


_guard_forkserver()
