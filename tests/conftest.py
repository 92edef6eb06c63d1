"""Shared test set-up.

Under ``CI=true`` a real-data test may not skip: CI has ``../shared/data``, so a missing folder
is an error at the start of the session, and a test that skips because a data set in it is
absent is reported as failed (a silent skip would let the real-data tests never run).
"""

import os
import random

import numpy as np
import pytest
import torch

#: The loopback S3 server (tests/support/s3_server.py) for the object-storage tests.
pytest_plugins = ["s3_server"]


@pytest.fixture(autouse=True)
def _seeded_rngs():
    """Every test starts from the same random state, whatever ran before it.

    Without this a test's random draws depend on which tests ran first, so a test can pass in
    the full suite and fail alone (or the reverse).
    """
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def in_ci() -> bool:
    """Whether the tests run in CI (``CI=true``, as CI services set it)."""
    return os.environ.get("CI", "").strip().lower() == "true"


def pytest_sessionstart(session):
    from paths import SHARED_DATA

    if in_ci() and not SHARED_DATA.is_dir():
        raise pytest.UsageError(f"CI=true but the shared data folder {SHARED_DATA} is missing "
                                "(or set LENSFLOW_SHARED_DATA): the real-data tests would skip")


def _skip_for_absent_shared_data(report) -> bool:
    from paths import SHARED_DATA

    if not report.skipped or not isinstance(report.longrepr, tuple):
        return False
    reason = str(report.longrepr[-1])
    return str(SHARED_DATA) in reason or "shared" in reason.lower()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if in_ci() and _skip_for_absent_shared_data(report):
        report.outcome = "failed"
        report.longrepr = (f"CI=true: a real-data test may not skip "
                           f"({report.longrepr[-1]})")


@pytest.fixture
def shared_data():
    """``../shared/data`` (or ``$LENSFLOW_SHARED_DATA``); the test skips when it is absent,
    and fails under ``CI=true``."""
    from paths import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data absent: {SHARED_DATA}")
    return SHARED_DATA
