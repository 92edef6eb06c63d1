"""Where the shard tasks of a scoring run execute: an existing Dask cluster, or threads here.

With a scheduler address (the flow's ``dask_address`` parameter, else the environment variable
``LENSFLOW_DASK_ADDRESS``) the shards run on that cluster through ``prefect-dask``'s
``DaskTaskRunner(address=...)``; each is still a Prefect task run of the calling flow (state,
retries, logs). Without one they run on a ``ThreadPoolTaskRunner`` in the flow's own process.

A flow's task runner is fixed when the flow is decorated, but the address is a run parameter, so
the scoring flows enter the chosen runner around their shard tasks themselves — a task runner is a
context manager whose ``submit`` runs a task, which is all a flow does with its own. (A subflow
``with_options(task_runner=...)`` would do the same, but Prefect stores a subflow's parameters —
here every shard's file list — in its database.)

Dask reruns a task whose worker died (``distributed.scheduler.allowed-failures``, 3 by default);
Prefect retries one that raised a storage error. Either way the rerun replaces its own parts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence

from prefect import get_run_logger
from prefect.futures import as_completed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.params import DASK_ADDRESS_PATTERN
from scoring.errors import ScoringError
from scoring.runtime import available_cores

DASK_ADDRESS_ENV = "LENSFLOW_DASK_ADDRESS"
#: Shards of a run on a Dask cluster unless the run says: enough to keep a few dozen worker
#: threads busy, and small enough pieces that a retried shard repeats little work.
DASK_DEFAULT_SHARDS = 16


class DaskClusterError(ScoringError):
    """The Dask scheduler address is malformed, or no scheduler answers there."""


def resolve_dask_address(address: str | None,
                         environ: Mapping[str, str] = os.environ) -> str | None:
    """The scheduler to run shards on: the parameter, else ``LENSFLOW_DASK_ADDRESS``, else None."""
    if address:
        source = "dask_address"
    else:
        address, source = environ.get(DASK_ADDRESS_ENV, "").strip() or None, DASK_ADDRESS_ENV
    if address is not None and not re.fullmatch(DASK_ADDRESS_PATTERN, address):
        raise DaskClusterError(f"{source} {address!r}: expected a scheduler address such as "
                               f"tcp://HOST:8786")
    return address


def shard_count(shards: int | None, address: str | None) -> int:
    """Shards asked for, else one here (today's single pass) or DASK_DEFAULT_SHARDS on a
    cluster."""
    if shards is not None:
        return shards
    return DASK_DEFAULT_SHARDS if address else 1


def shard_task_runner(address: str | None, shards: int) -> TaskRunner:
    """``DaskTaskRunner`` connected to ``address``, else threads (at most one per core)."""
    if address is None:
        return ThreadPoolTaskRunner(max_workers=max(1, min(shards, available_cores())))
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=address)


def run_shards(shard_task, jobs: Sequence, address: str | None,
               progress: Callable[[dict], None] | None = None) -> list:
    """Run ``shard_task(job, progress)`` for every job; the results in job order.

    Every shard runs to its end even when one fails; then the first failure is raised.
    progress: gets ``advance`` events — per batch from the shards when they run in this process,
    per finished shard on a cluster (a callback does not travel to another process).
    """
    notify = progress or (lambda event: None)
    log = get_run_logger()
    with shard_task_runner(address, len(jobs)) as runner:
        if address is not None:
            _connect(runner, address, log)
        local = address is None
        futures = {runner.submit(shard_task, {"job": job, "progress": notify if local else None}):
                   i for i, job in enumerate(jobs)}
        results: list = [None] * len(jobs)
        failures: list[tuple[int, BaseException]] = []
        for future in as_completed(list(futures)):
            i = futures[future]
            try:
                results[i] = future.result()
            except Exception as err:  # the other shards still finish; the flow then aborts
                log.error("shard %s failed: %s", jobs[i].shard, err)
                failures.append((i, err))
                continue
            if not local:
                notify({"event": "advance", "n": results[i].items})
    if failures:
        raise min(failures, key=lambda failure: failure[0])[1]
    return results


def _connect(runner, address: str, log) -> None:
    """Connect before submitting, so an unreachable scheduler is one clear line."""
    try:
        client = runner.client
    except (OSError, TimeoutError) as err:
        raise DaskClusterError(f"dask_address {address}: no Dask scheduler answers "
                               f"({' '.join(str(err).split())})") from None
    threads = client.nthreads()
    if threads:
        log.info("Dask cluster at %s: %d workers, %d threads", address, len(threads),
                 sum(threads.values()))
    else:
        log.warning("Dask cluster at %s has no workers yet; shards wait until some join",
                    address)
