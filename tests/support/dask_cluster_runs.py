"""The flows' shards on a local Dask cluster: two worker processes, and a shard that kills its own.

Used by tests/flows/test_dask_scaleout.py (a shared file system) and
tests/flows/test_dask_object_storage.py (object storage only).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path


def two_worker_cluster():
    """A ``distributed.LocalCluster`` of two worker processes, one thread each, on 127.0.0.1 (not
    yet entered); the workers start with the environment of the moment of this call."""
    import distributed

    return distributed.LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                                    processes=True, dashboard_address=None, silence_logs=40)


def kill_first_shard(monkeypatch, marker: Path, leave_behind: Callable) -> None:
    """Make the first image shard a flow runs on Dask write its parts, call
    ``leave_behind(job)`` (what a crash would leave in the run's staging) and SIGKILL its own
    worker, so Dask reruns it elsewhere; later attempts score as usual. ``marker`` (a path every
    worker sees) receives the killed worker's pid: see :func:`killed_worker`."""
    import flows.score_flows as score_flows

    def dying_shard(score_shard, job, progress=None):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return score_shard(job, progress)
        score_shard(job)
        leave_behind(job)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)

    shard_runner = score_flows.shard_runner

    def runner_of_dying_shards(address):
        run = shard_runner(address)

        def run_dying(score_shard, jobs, progress):
            def score_image_shard(job, progress=None):
                return dying_shard(score_shard, job, progress)
            return run(score_image_shard, jobs, progress)
        return run_dying

    monkeypatch.setattr(score_flows, "shard_runner", runner_of_dying_shards)


def killed_worker(marker: Path, client) -> int:
    """The pid :func:`kill_first_shard` killed, once no worker of ``client``'s cluster has it."""
    killed = int(marker.read_text())
    assert killed not in client.run(os.getpid).values()  # that worker really died
    return killed
