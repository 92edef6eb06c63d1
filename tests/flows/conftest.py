"""Fixtures of the flow tests: one throwaway Prefect API per test module."""

from __future__ import annotations

import pytest

from flows.dask_runner import DASK_ADDRESS_ENV


@pytest.fixture(scope="module")
def prefect_api():
    """A throwaway Prefect server (SQLite in a temp dir) for the module's flow runs."""
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as mp:
        # Telemetry writes to the fresh database while it migrates ("database is locked").
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        # Flows called here run their shards in this process, whatever the shell points at.
        mp.delenv(DASK_ADDRESS_ENV, raising=False)
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture
def client(prefect_api):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        yield c

