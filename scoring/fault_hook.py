"""The fault suite's hook: a scoring process that SIGKILLs itself at a named step of a commit.

Test hook of tests/scoring/test_faults.py: when ``$LENSFLOW_FAULT_AT`` names one of
:data:`FAULT_STEPS`, the process dies there as an OOM kill or a lost node would. The local commit
(:mod:`scoring.partition`), the object-storage commit (:mod:`scoring.object_commit`), the part
writer and the run record (:mod:`scoring.shards`) all call it. Never set outside tests.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "LENSFLOW_FAULT_AT"
FAULT_STEPS = ("mid-write", "before-swap", "after-swap", "before-record")


def fault_point(step: str) -> None:
    """Test hook: die by SIGKILL here when ``$LENSFLOW_FAULT_AT`` names ``step``."""
    if os.environ.get(FAULT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)
