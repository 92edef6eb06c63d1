"""The fault suite's hook: a scoring process that SIGKILLs itself at a named step of a commit.

Test hook of tests/scoring/test_faults.py and tests/scoring/test_object_storage_faults.py: when
``$LENSFLOW_FAULT_AT`` names one of :data:`FAULT_STEPS`, the process dies there as an OOM kill or
a lost node would. The local commit (:mod:`scoring.partition`), the object-storage commit
(:mod:`scoring.object_commit`), the part writer and the run record (:mod:`scoring.shards`) all
call it. Never set outside tests.

With ``$LENSFLOW_FAULT_HOLD`` naming a folder that holds two FIFOs the test keeps open,
``reached`` and ``release``, the process first writes ``<step> <pid>`` to ``reached`` and then
waits, alive, at that step until a byte arrives on ``release``: so a test knows the step was hit
and reads the tables while the run stands exactly there, before it is killed. No timer decides
anything: each side blocks on the other's write.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

FAULT_ENV = "LENSFLOW_FAULT_AT"
HOLD_ENV = "LENSFLOW_FAULT_HOLD"
FAULT_STEPS = ("mid-write", "before-swap", "after-swap", "before-record")
REACHED = "reached"
RELEASE = "release"


def fault_point(step: str) -> None:
    """Test hook: die by SIGKILL here when ``$LENSFLOW_FAULT_AT`` names ``step``."""
    if os.environ.get(FAULT_ENV) != step:
        return
    hold = os.environ.get(HOLD_ENV)
    if hold:
        _hold(Path(hold), step)
    os.kill(os.getpid(), signal.SIGKILL)


def _hold(folder: Path, step: str) -> None:
    """Say ``step`` was reached, then wait until the test writes a byte to ``release``."""
    # Opened read-write, ``release`` never blocks the open and never reads end-of-file: the read
    # below returns exactly when the test writes, and the test can open it without blocking.
    release = os.open(folder / RELEASE, os.O_RDWR)
    try:
        reached = os.open(folder / REACHED, os.O_WRONLY | os.O_NONBLOCK)  # the test holds it
        os.write(reached, f"{step} {os.getpid()}\n".encode())
        os.close(reached)
        os.read(release, 1)
    finally:
        os.close(release)
