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

Every shard reports to the Prefect API of the flow run that submitted it. ``prefect-dask`` sends
the flow's settings with each task and the worker runs the task under them, so the workers need no
Prefect settings of their own; but a flow on a temporary server (no ``PREFECT_API_URL``) has no URL
in its settings, and each worker process would then start a temporary server of its own. So the
shards are submitted under the URL the flow really talks to, with temporary servers forbidden, and
a temporary server (it listens on 127.0.0.1) is refused for a cluster on other hosts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import os
import re
import socket
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from urllib.parse import urlsplit

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.futures import as_completed
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_ALLOW_EPHEMERAL_MODE,
    temporary_settings,
)
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
#: How long a flow waits for the Prefect API to record its shards' final states (sent by the
#: workers as events, a moment after each shard returns).
SHARD_RECORD_TIMEOUT_S = 30.0
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
    worker's ``OMP_NUM_THREADS`` (its nanny sets it to spread the cores over worker threads);
    first it checks that the flow's Prefect API answers from this worker."""
    @functools.wraps(score_shard)
    def on_worker(job, progress=None) -> ShardResult:
        _check_flow_api(job.shard)
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
        reporting = contextlib.nullcontext()
        if address is not None:
            reporting = _reporting_to_flow_api(_connect(runner, address, log), address, log)
        local = address is None
        with reporting:  # prefect-dask copies the settings into each task as it is submitted
            futures = {runner.submit(shard_task,
                                     {"job": job, "progress": notify if local else None}): i
                       for i, job in enumerate(jobs)}
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
        if not local and not failures:  # a failed run fails now, not after the wait
            _wait_for_shard_records([future.task_run_id for future in futures], log)
    if failures:
        raise min(failures, key=lambda failure: failure[0])[1]
    return results


def _wait_for_shard_records(task_run_ids: list, log,
                            timeout: float = SHARD_RECORD_TIMEOUT_S) -> None:
    """Wait until the flow's API holds every shard's final state.

    A worker reports a task's final state as an event after the task returns; without this a
    flow on a temporary server could stop it first, and a finished flow run would briefly show
    its shards still running.
    """
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId

    client = FlowRunContext.get().client
    wanted = TaskRunFilter(id=TaskRunFilterId(any_=task_run_ids))
    deadline = time.monotonic() + timeout
    while True:
        recorded = {run.id for run in client.read_task_runs(task_run_filter=wanted)
                    if run.state is not None and run.state.is_final()}
        missing = len(set(task_run_ids) - recorded)
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    if missing:
        log.warning("%d of %d shard task runs have no final state in the Prefect API after "
                    "%.0f s", missing, len(task_run_ids), timeout)


def _connect(runner, address: str, log):
    """Connect before submitting, so an unreachable scheduler is one clear line; the client."""
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
    return client


def shard_api_url(configured: str | None, flow_api: str, hosts_elsewhere: Collection[str],
                  address: str) -> str:
    """The Prefect API the shards report to: the flow run's own.

    configured: ``PREFECT_API_URL`` where the flow runs; None when the flow runs on a temporary
    server at ``flow_api``. hosts_elsewhere: the cluster's hosts that are not this machine, which
    cannot reach a server on this machine's loopback address.
    """
    api_url = configured or flow_api
    if hosts_elsewhere and _is_loopback(urlsplit(api_url).hostname or ""):
        workers = f"Dask workers on {', '.join(sorted(hosts_elsewhere))} cannot reach"
        if configured is None:
            raise DaskClusterError(
                f"dask_address {address}: this flow runs on a temporary Prefect server "
                f"({flow_api}) that {workers}; start a real one (prefect server start --host "
                f"0.0.0.0) and set PREFECT_API_URL=http://THAT_HOST:4200/api where the flow runs")
        raise DaskClusterError(
            f"dask_address {address}: PREFECT_API_URL {configured} is a loopback address that "
            f"{workers}; set it to an address of the Prefect server they can reach")
    return api_url


def _reporting_to_flow_api(client, address: str, log):
    """Settings under which to submit the shards: the flow's API URL, no temporary servers."""
    configured = PREFECT_API_URL.value()
    flow_api = str(FlowRunContext.get().client.api_url).rstrip("/")
    elsewhere = {host for host in _cluster_hosts(client, address) if not _on_this_machine(host)}
    api_url = shard_api_url(configured, flow_api, elsewhere, address)
    if configured is None:
        log.info("no PREFECT_API_URL: the shards report to this flow's temporary Prefect server "
                 "at %s (a cluster on other hosts needs a real server)", api_url)
    return temporary_settings(updates={PREFECT_API_URL: api_url,
                                       PREFECT_SERVER_ALLOW_EPHEMERAL_MODE: False})


def _cluster_hosts(client, address: str) -> set[str]:
    from distributed.comm import get_address_host

    return {get_address_host(a) for a in (address, *client.nthreads())}


@functools.lru_cache(maxsize=64)
def _on_this_machine(host: str) -> bool:
    """Whether ``host`` is an address of this machine: loopback, or one a socket can bind to."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    for family, _, _, _, sockaddr in infos:
        if _is_loopback(sockaddr[0]):
            return True
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((sockaddr[0], 0))
                return True
            except OSError:
                continue
    return False


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        return False


def _check_flow_api(shard: int) -> None:
    """On a worker: the flow's Prefect API (the task's settings carry it) answers and is the one
    this worker process sends its task events to, else one line (the shard would run, but what it
    reports would not arrive)."""
    context = TaskRunContext.get()
    if context is None:  # called outside a task run: nothing reports anywhere
        return
    api_url = str(context.client.api_url).rstrip("/")
    where = f"shard {shard} on {socket.gethostname()}"
    other = _events_api_elsewhere(api_url)
    if other:
        raise DaskClusterError(
            f"{where}: this Dask worker process sends Prefect events to {other}, not to this "
            f"flow's API {api_url}; a worker process reports to one Prefect API, so restart the "
            f"workers (or give each Prefect server its own cluster)")
    error = context.client.api_healthcheck()
    if error is not None:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise DaskClusterError(
            f"{where}: the flow's Prefect API {api_url} does not answer from this Dask worker "
            f"({reason}); the workers must reach the flow's PREFECT_API_URL")


def _events_api_elsewhere(api_url: str) -> str | None:
    """The other Prefect API this process's events worker already sends to, if any.

    Prefect keeps one events worker per process, bound to the API of the first task that sent
    an event; a later flow on another API would lose its shards' states.
    """
    from prefect.events.worker import EventsWorker

    for service in list(EventsWorker._instances.values()):
        sent_to = getattr(getattr(service, "_client", None), "_api_url", None)
        if (isinstance(service, EventsWorker) and not service._stopped and sent_to
                and str(sent_to).rstrip("/") != api_url):
            return str(sent_to).rstrip("/")
    return None
