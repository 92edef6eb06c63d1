"""A scoring run held alive at its fault step (``scoring/fault_hook.py``), so a test knows the
step was hit and reads the tables while the run stands there, then lets it die."""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

from scoring.fault_hook import REACHED, RELEASE


class FaultHold:
    """The two FIFOs of one held run: ``reached`` (the run writes its step) and ``release``."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True)
        self.folder = folder
        os.mkfifo(folder / REACHED)
        os.mkfifo(folder / RELEASE)
        # Held read-write: the run's non-blocking open for writing always finds a reader.
        self._reached = os.open(folder / REACHED, os.O_RDWR | os.O_NONBLOCK)
        self.released = False

    def wait_reached(self, run, timeout: float = 180) -> str:
        """The step ``run`` reports it stands at; fails if it ends (or hangs) without one."""
        deadline, said = time.monotonic() + timeout, b""
        while not said.endswith(b"\n"):
            assert time.monotonic() < deadline, f"run {run.pid} never reached its fault step"
            ready, _, _ = select.select([self._reached], [], [], 0.5)
            if ready:
                said += os.read(self._reached, 256)
            else:
                assert run.alive(), f"run {run.pid} ended before its fault step: {run.events()}"
        step, pid = said.decode().split()
        assert int(pid) == run.pid, (pid, run.pid)
        return step

    def release(self) -> None:
        """Let the held run go on to its SIGKILL."""
        fd = os.open(self.folder / RELEASE, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
        self.released = True

    def close(self, run=None) -> None:
        """Stop listening; ``run``, if a failed check left it held, is killed, not left
        waiting with its locks."""
        os.close(self._reached)
        if run is not None and not self.released and run.alive():
            run.kill()
