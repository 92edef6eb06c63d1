"""Where the tests find the repository and the optional real data sets (``../shared/data``)."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: Real data sets beside the repository, or ``$LENSFLOW_SHARED_DATA``; tests that need one skip
#: cleanly when it is absent, except under ``CI=true``, where that fails (``conftest.py``).
SHARED_DATA = Path(os.environ.get("LENSFLOW_SHARED_DATA") or REPO.parent / "shared" / "data")
