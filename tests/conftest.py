"""Shared test set-up."""

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


@pytest.fixture
def shared_data():
    """``../shared/data`` (or ``$LENSFLOW_SHARED_DATA``); the test skips when it is absent."""
    from paths import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data absent: {SHARED_DATA}")
    return SHARED_DATA
