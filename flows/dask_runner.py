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

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Mapping, Sequence

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from export.loader_workers import available_cores
from flows.failures import STORAGE_RETRY_DELAYS, retry_on_storage_error
from flows.params import DASK_ADDRESS_PATTERN
from scoring.errors import ScoringError
from scoring.shards import RunShards, ShardResult

DASK_ADDRESS_ENV = "LENSFLOW_DASK_ADDRESS"
#: Shards of a run on a Dask cluster unless the run says: enough to keep a few dozen worker
#: threads busy, and small enough pieces that a retried shard repeats little work.
DASK_DEFAULT_SHARDS = 16
#: Shard tasks retry storage errors; Dask itself reruns a shard whose worker died.
_SHARD_RETRIES = {"retries": len(STORAGE_RETRY_DELAYS), "retry_delay_seconds": STORAGE_RETRY_DELAYS,
                  "retry_condition_fn": retry_on_storage_error}


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


def shard_runner(address: str | None) -> RunShards:
    """A ``run_shards`` for the scorers: a Prefect task run per shard, on a Dask cluster at
    ``address`` or on threads in this process (see :data:`scoring.shards.RunShards`)."""
    def run(score_shard: Callable[..., ShardResult], jobs: Sequence,
            progress: Callable[[dict], None]) -> list[ShardResult]:
        name = score_shard.__name__.replace("_", "-")
        shard_task = task(_with_worker_threads(score_shard) if address else score_shard,
                          name=name, task_run_name=name + "-{job.shard}", cache_policy=NO_CACHE,
                          **_SHARD_RETRIES)
        get_run_logger().info("%d shards, on %s", len(jobs),
                              f"the Dask cluster at {address}" if address else "threads here")
        return _run_shard_tasks(shard_task, jobs, address, progress)
    return run


def _with_worker_threads(score_shard: Callable[..., ShardResult]) -> Callable[..., ShardResult]:
    """``score_shard`` with the job's runtime threads, unless it names them, set to the Dask
    worker's ``OMP_NUM_THREADS`` (its nanny sets it to spread the cores over worker threads)."""
    @functools.wraps(score_shard)
    def on_worker(job, progress=None) -> ShardResult:
        try:
            threads = max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
        except ValueError:
            threads = None
        return score_shard(dataclasses.replace(job, threads=job.threads or threads), progress)
    return on_worker


def _run_shard_tasks(shard_task, jobs: Sequence, address: str | None,
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
