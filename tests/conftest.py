"""Shared test set-up."""

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded_rngs():
    """Every test starts from the same random state, whatever ran before it.

    Without this a test's random draws depend on which tests ran first, so a test can pass in
    the full suite and fail alone (or the reverse).
    """
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
