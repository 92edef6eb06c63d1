"""Scoring in shards: stable planning, exactly-once commits, and the flows on a real Dask cluster.

The cluster tests start a ``distributed.LocalCluster`` of two single-threaded worker processes on
127.0.0.1 and point the flows' ``dask_address`` at it, as a deployment would at a remote
scheduler. What a user would check: the partition equals the single-process run row for row,
each worker verified the bundle once, and a worker killed in the middle of a shard still leaves
every row exactly once.

The ``e2e`` tests at the end run what an operator runs — ``prefect server start``, ``dask
scheduler``, ``dask worker --nworkers 2 --nthreads 1`` with no Prefect API in its environment, and
``lensflow score images ... --dask-address`` — and check where the shards' task runs land, that
no worker started a Prefect server of its own, and that stopped workers leave no process behind.
"""

from __future__ import annotations

import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from dask_cluster_runs import kill_first_shard, killed_worker, two_worker_cluster
from flow_test_data import make_images
from paths import REPO
from tiny_image_bundle import make_image_bundle

from flows.dask_runner import DASK_ADDRESS_ENV, DaskClusterError, resolve_dask_address
from scoring import bundle_cache
from scoring.errors import PartitionError, ScoringError
from scoring.image_folder import walk_images
from scoring.image_scoring import (
    finish_image_run,
    plan_image_run,
    score_image_folder,
    score_image_shard,
)
from scoring.options import ImageScoreOptions, RecScoreOptions
from scoring.partition import partition_dir
from scoring.recommendations import (
    FULL_TABLE,
    TOPK_TABLE,
    finish_rec_run,
    plan_rec_run,
    score_recommendations,
    score_user_shard,
)
from scoring.shards import plan_image_shards, plan_user_shards, shard_of

DAY = date(2026, 11, 22)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An image folder (nested, one broken file), an image bundle and a recommender bundle."""
    root = tmp_path_factory.mktemp("scaleout")
    images = make_images(root / "images", 18)
    make_images(images / "more", 9, seed=1)
    (images / "more" / "broken.jpg").write_bytes(b"not a jpeg")
    make_image_bundle(root / "registry", name="tiny")
    return {"root": root, "images": images, "model": root / "registry" / "tiny",
            "rec": _rec_bundle(root)}


def _rec_bundle(root: Path) -> Path:
    from export.convert import export_bundle
    from training.models.collab import DotProductBias

    torch.manual_seed(0)
    n_users, n_items = 40, 11
    model = DotProductBias(n_users, n_items, 4, y_range=(0.5, 5.5))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.7)
    seen = root / "seen.parquet"
    rng = np.random.default_rng(0)
    pq.write_table(pa.table({"user_idx": pa.array(rng.integers(0, n_users, 60), pa.int32()),
                             "item_idx": pa.array(rng.integers(0, n_items, 60), pa.int32())}),
                   seen)
    manifest = {"task": "collab", "users": [10 + 3 * u for u in range(n_users)],
                "items": [5 + 7 * i for i in range(n_items)],
                "titles": [f"Item {i}" for i in range(n_items)], "id_type": "int64",
                "y_range": [0.5, 5.5], "model": model.config().to_dict(),
                "seen": {"file": "seen.parquet"}}
    return export_bundle(model, manifest, root / "registry", "rec", pt2=False,
                         extra_files={"seen.parquet": seen}).bundle_path


def _rows(partition: Path | str, sort_by: list[str] | None = None) -> pd.DataFrame:
    """A committed partition's rows without the per-run columns; sorted when asked."""
    assert (Path(partition) / "_SUCCESS").is_file()
    frame = pq.read_table(partition).to_pandas()
    frame = frame.drop(columns=[c for c in ("scored_at",) if c in frame])
    if sort_by:
        frame = frame.sort_values(sort_by, kind="stable")
    return frame.reset_index(drop=True)


# --- planning and exactly-once, without Prefect -------------------------------------------------


def test_a_file_keeps_its_shard_whatever_else_the_folder_holds(data):
    files = walk_images(data["images"])
    before = {f.relpath: shard for shard, part in plan_image_shards(files, 5) for f in part}
    after = {f.relpath: shard
             for shard, part in plan_image_shards(files[::2] + files[1::2][::-1], 5)
             for f in part}
    fewer = {f.relpath: shard for shard, part in plan_image_shards(files[3:], 5) for f in part}
    assert before == after
    assert all(before[path] == shard for path, shard in fewer.items())
    assert len(set(before.values())) > 1  # the hash spreads files over shards
    # Not Python's salted hash(): the same digest in any process.
    assert shard_of("cats/0001.jpg", 1000) == shard_of("cats/0001.jpg", 1000)
    # Pinned: a changed hash would silently move files to other shards between versions.
    assert shard_of("more/img_001.png", 2**31) == 1402163725


def test_user_blocks_cover_every_user_once_in_order():
    users = np.arange(100, 137)
    blocks = plan_user_shards(users, 5)
    assert [shard for shard, _ in blocks] == [0, 1, 2, 3, 4]
    assert np.array_equal(np.concatenate([b for _, b in blocks]), users)
    assert len(plan_user_shards(users[:3], 8)) == 3
    with pytest.raises(ScoringError, match="shards must be >= 1"):
        plan_user_shards(users, 0)


def test_shards_in_a_loop_equal_the_single_process_run_and_load_the_bundle_once(data, tmp_path):
    single = score_image_folder(data["images"], data["model"], tmp_path / "single",
                                run_date=DAY, workers=0)
    bundle_cache.clear()
    plan = plan_image_run(data["images"], data["model"], tmp_path / "sharded",
                          ImageScoreOptions(shards=3, workers=0), run_date=DAY)
    results = [score_image_shard(job) for job in plan.jobs]
    summary = finish_image_run(plan, results)
    assert len(plan.jobs) == 3 and summary.rows == single.rows == 28
    assert (summary.scored, summary.failed) == (single.scored, single.failed) == (27, 1)
    pd.testing.assert_frame_equal(_rows(summary.partition, ["path"]),
                                  _rows(single.partition, ["path"]))
    assert set(bundle_cache.load_counts().values()) == {1}  # bundle and runtime, once each


def test_user_shards_in_a_loop_equal_the_single_process_run(data, tmp_path):
    plan = plan_rec_run(data["rec"], tmp_path / "sharded",
                        RecScoreOptions(shards=3, top_k=3, full_table=True, block_size=4),
                        run_date=DAY)
    summary = finish_rec_run(plan, [score_user_shard(job) for job in plan.jobs])
    single = score_recommendations(data["rec"], tmp_path / "single", top_k=3, full_table=True,
                                   run_date=DAY, block_size=4)
    assert (summary.topk_rows, summary.full_rows) == (single.topk_rows, single.full_rows)
    assert summary.full_rows == 40 * 11 and summary.users_scored == 40
    for table in (TOPK_TABLE, FULL_TABLE):
        pd.testing.assert_frame_equal(_rows(partition_dir(tmp_path / "sharded", table, DAY)),
                                      _rows(partition_dir(tmp_path / "single", table, DAY)))


def test_a_rerun_shard_replaces_its_parts_and_a_stray_part_blocks_the_commit(data, tmp_path):
    two_shards = ImageScoreOptions(shards=2, workers=0)
    plan = plan_image_run(data["images"], data["model"], tmp_path, two_shards, run_date=DAY,
                          run_id="night-1")
    first = [score_image_shard(job) for job in plan.jobs]
    again = score_image_shard(plan.jobs[0])  # as a retry does, after a first full attempt
    summary = finish_image_run(plan, [again, *first[1:]])
    assert summary.rows == 28
    assert _rows(summary.partition)["path"].is_unique

    plan = plan_image_run(data["images"], data["model"], tmp_path, two_shards, run_date=DAY,
                          run_id="night-2")
    results = [score_image_shard(job) for job in plan.jobs]
    part = next(plan.pending.temp_dir.glob("part-*.parquet"))
    shutil.copy(part, plan.pending.temp_dir / "part-00099-0000.parquet")  # not a planned shard
    with pytest.raises(PartitionError, match="parts hold .* rows but the shards wrote"):
        finish_image_run(plan, results)
    assert not plan.pending.temp_dir.exists()
    # The earlier committed partition is untouched.
    assert _rows(partition_dir(tmp_path, "image_predictions", DAY))["path"].is_unique


def test_dask_address_comes_from_the_parameter_or_the_environment():
    env = {DASK_ADDRESS_ENV: "tcp://10.0.0.5:8786"}
    assert resolve_dask_address(None, env) == "tcp://10.0.0.5:8786"
    assert resolve_dask_address("tls://[::1]:8786", env) == "tls://[::1]:8786"
    assert resolve_dask_address(None, {}) is None
    with pytest.raises(DaskClusterError, match=f"{DASK_ADDRESS_ENV} '10.0.0.5'"):
        resolve_dask_address(None, {DASK_ADDRESS_ENV: "10.0.0.5"})


# --- the flows, local threads ----------------------------------------------------------------


def test_local_shards_on_threads_equal_the_single_pass(data, tmp_path, prefect_api):
    from flows.score_flows import score_image_folder_flow

    state = score_image_folder_flow(str(data["images"]), str(data["model"]), str(tmp_path / "a"),
                                    run_date=DAY, workers=0, shards=3, return_state=True)
    assert state.is_completed(), state.message
    single = score_image_folder_flow(str(data["images"]), str(data["model"]),
                                     str(tmp_path / "b"), run_date=DAY, workers=0,
                                     return_state=True)
    parts = sorted(p.name for p in Path(state.result()["partition"]).glob("part-*"))
    assert [p[:10] for p in parts] == ["part-00000", "part-00001", "part-00002"]
    assert len(list(Path(single.result()["partition"]).glob("part-*"))) == 1
    pd.testing.assert_frame_equal(_rows(state.result()["partition"], ["path"]),
                                  _rows(single.result()["partition"], ["path"]))


def test_a_malformed_dask_address_is_refused_before_any_work(data, tmp_path, prefect_api):
    from prefect.exceptions import ParameterTypeError

    from flows.score_flows import score_recommendations_flow

    with pytest.raises(ParameterTypeError, match="dask_address"):
        score_recommendations_flow(str(data["rec"]), str(tmp_path), dask_address="myhost:8786")
    assert not any(tmp_path.iterdir())


def test_an_unreachable_scheduler_fails_in_one_line_and_commits_nothing(
        data, tmp_path, prefect_api):
    import dask
    import distributed  # noqa: F401  its config defaults first: leaving set() drops what was added

    from flows.score_flows import score_image_folder_flow

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        state = score_image_folder_flow(str(data["images"]), str(data["model"]), str(tmp_path),
                                        run_date=DAY, dask_address="tcp://127.0.0.1:9",
                                        return_state=True)
    assert state.is_failed()
    assert state.message.startswith("dask_address tcp://127.0.0.1:9: no Dask scheduler answers")
    assert list((tmp_path / "image_predictions").iterdir()) == []


# --- the flows on a Dask cluster -------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(prefect_api):
    """Two worker processes, one thread each, on 127.0.0.1; a client that is not the default
    (so the flows connect by address, as to a remote scheduler)."""
    import distributed

    with two_worker_cluster() as local, distributed.Client(local, set_as_default=False) as client:
        yield local, client


@pytest.mark.slow
def test_images_on_two_workers_equal_the_single_process_run(data, tmp_path, cluster):
    from flows.score_flows import score_image_folder_flow

    local, client = cluster
    client.run(bundle_cache.clear)
    state = score_image_folder_flow(str(data["images"]), str(data["model"]), str(tmp_path),
                                    run_date=DAY, shards=4, dask_address=local.scheduler_address,
                                    return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    single = score_image_folder(data["images"], data["model"], tmp_path / "single",
                                run_date=DAY, workers=0)
    pd.testing.assert_frame_equal(_rows(summary["partition"], ["path"]),
                                  _rows(single.partition, ["path"]))
    assert (summary["scored"], summary["failed"]) == (27, 1)
    # Each worker verified the bundle once, however many of the 4 shards it ran.
    loads = client.run(bundle_cache.load_counts)
    bundle_loads = [n for counts in loads.values() for key, n in counts.items()
                    if key.startswith("bundle ")]
    assert bundle_loads and all(n == 1 for n in bundle_loads)
    hits = client.run(bundle_cache.use_counts)
    assert sum(n for counts in hits.values() for n in counts.values()) == 4


@pytest.mark.slow
def test_user_blocks_on_two_workers_equal_the_single_process_run(data, tmp_path, cluster):
    from flows.score_flows import score_recommendations_flow

    local, _ = cluster
    state = score_recommendations_flow(str(data["rec"]), str(tmp_path), top_k=3, full_table=True,
                                       run_date=DAY, shards=3, block_size=4,
                                       dask_address=local.scheduler_address, return_state=True)
    assert state.is_completed(), state.message
    single = score_recommendations(data["rec"], tmp_path / "single", top_k=3, full_table=True,
                                   run_date=DAY, block_size=4)
    for table, rows in ((TOPK_TABLE, single.topk_rows), (FULL_TABLE, single.full_rows)):
        sharded = _rows(partition_dir(tmp_path, table, DAY))
        assert len(sharded) == rows
        # User blocks are contiguous: even the row order is the single-process order.
        pd.testing.assert_frame_equal(sharded, _rows(partition_dir(tmp_path / "single",
                                                                   table, DAY)))
    assert state.result()["users_scored"] == 40


@pytest.mark.slow
def test_a_worker_killed_mid_shard_still_commits_every_row_exactly_once(
        data, tmp_path, cluster, monkeypatch):
    """The first shard to start writes its parts, leaves a finished copy and a half-written file
    behind as a crash would, and SIGKILLs its own worker; Dask reruns it elsewhere."""
    from flows.score_flows import score_image_folder_flow

    local, client = cluster
    marker = tmp_path / "killed"

    def leave_a_copy_and_a_half_written_part(job):
        temp, prefix = job.pending.temp_dir, f"part-{job.shard:05d}"
        shutil.copy(temp / f"{prefix}-0000.parquet", temp / f"{prefix}-0007.parquet")
        (temp / f".{prefix}-0008.parquet.inprogress").write_bytes(b"PAR1")

    kill_first_shard(monkeypatch, marker, leave_a_copy_and_a_half_written_part)
    state = score_image_folder_flow(
        str(data["images"]), str(data["model"]), str(tmp_path), run_date=DAY, shards=4,
        dask_address=local.scheduler_address, return_state=True)
    assert state.is_completed(), state.message
    killed_worker(marker, client)
    rows = _rows(state.result()["partition"], ["path"])
    expected = sorted(f.relpath for f in walk_images(data["images"]))
    assert rows["path"].tolist() == expected  # every file, exactly once
    assert not list(Path(state.result()["partition"]).glob(".*"))


# --- which Prefect API the shards report to ------------------------------------------------------


def test_shards_report_to_the_flows_api_and_a_remote_cluster_needs_a_reachable_one():
    from flows.dask_runner import shard_api_url

    temporary, real = "http://127.0.0.1:8420/api", "http://prefect.internal:4200/api"
    # No PREFECT_API_URL: the flow's temporary server, which a cluster on this machine can reach.
    assert shard_api_url(None, temporary, set(), "tcp://127.0.0.1:8786") == temporary
    assert shard_api_url(real, temporary, {"10.0.0.7"}, "tcp://10.0.0.5:8786") == real
    with pytest.raises(DaskClusterError, match=r"^dask_address tcp://10\.0\.0\.5:8786: this flow "
                       r"runs on a temporary Prefect server \(http://127\.0\.0\.1:8420/api\) that "
                       r"Dask workers on 10\.0\.0\.5, 10\.0\.0\.7 cannot reach; .* set "
                       r"PREFECT_API_URL=http://THAT_HOST:4200/api where the flow runs$"):
        shard_api_url(None, temporary, {"10.0.0.7", "10.0.0.5"}, "tcp://10.0.0.5:8786")
    with pytest.raises(DaskClusterError, match=r"PREFECT_API_URL http://localhost:4200/api is a "
                       r"loopback address that Dask workers on 10\.0\.0\.7 cannot reach"):
        shard_api_url("http://localhost:4200/api", temporary, {"10.0.0.7"}, "tcp://10.0.0.5:8786")


def test_a_shard_whose_worker_cannot_report_to_the_flows_api_fails_in_one_line(prefect_api,
                                                                              monkeypatch):
    from prefect import flow, task
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.events.worker import EventsWorker

    from flows.dask_runner import _check_flow_api

    @flow
    def checked() -> str:
        state = task(_check_flow_api)(3, return_state=True)
        return str(state.result(raise_on_failure=False))

    fails = r"shard 3 on .+: {} the workers must reach the flow's PREFECT_API_URL"
    with monkeypatch.context() as patch:
        patch.setattr(SyncPrefectClient, "api_healthcheck",
                      lambda self: ConnectionRefusedError("[Errno 111] Connection refused"))
        assert re.fullmatch(fails.format(r"the flow's Prefect API http://127\.0\.0\.1:\d+/api "
                                         r"does not answer from this Dask worker \(\[Errno 111\] "
                                         r"Connection refused\);"), checked())
    # A worker process whose events already go to another API (an earlier flow's).
    elsewhere = object.__new__(EventsWorker)
    elsewhere._stopped, elsewhere._client = False, type("C", (), {"_api_url": "http://10.9.9.9/api"})
    monkeypatch.setitem(EventsWorker._instances, -17, elsewhere)
    assert re.fullmatch(r"shard 3 on .+: this Dask worker process sends Prefect events to "
                        r"http://10\.9\.9\.9/api, not to this flow's API "
                        r"http://127\.0\.0\.1:\d+/api; a worker process reports to one Prefect "
                        r"API, so restart the workers \(or give each Prefect server its own "
                        r"cluster\)", checked())


# --- a real `prefect server`, `dask scheduler` and `dask worker` (issue 17) --------------------


@dataclass
class RealCluster:
    """A ``prefect server start`` (``stack``) and a ``dask scheduler`` with ``dask worker
    --nworkers 2 --nthreads 1``, each in its own process group; the workers' environment has no
    ``PREFECT_API_URL``."""

    stack: object
    address: str
    workers: subprocess.Popen

    def worker_processes(self) -> list[psutil.Process]:
        main = psutil.Process(self.workers.pid)
        return [main, *main.children(recursive=True)]

    def lensflow(self, *args: str, env: dict) -> subprocess.CompletedProcess:
        """Run the CLI in its own process group: on a timeout, a temporary Prefect server it
        started goes down with it."""
        from test_prefect_e2e import _stop

        command = [str(Path(sys.executable).parent / "lensflow"), *args]
        with subprocess.Popen(command, env=env, cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True) as proc:
            try:
                stdout, stderr = proc.communicate(timeout=300)
            finally:
                _stop(proc)
        return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)

    def assert_workers_started_no_server(self) -> None:
        """No Prefect server process under the workers; only ``dask worker`` and its worker
        processes listen on a port."""
        main = psutil.Process(self.workers.pid)
        processes, dask_processes = self.worker_processes(), {main, *main.children()}
        commands = [" ".join(p.cmdline()) for p in processes]
        assert not [c for c in commands if "uvicorn" in c or "prefect" in c], commands
        listening = {p for p in processes for c in p.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN}
        assert listening and listening <= dask_processes, commands


@pytest.fixture(scope="module")
def real_cluster(tmp_path_factory):
    import distributed
    from test_prefect_e2e import PrefectStack, _environment, _free_port, _stop

    root = tmp_path_factory.mktemp("real-cluster")
    port, dask_port = _free_port(), _free_port()
    stack = PrefectStack(root, _environment(root, port), f"http://127.0.0.1:{port}/api")
    # The workers (and the scheduler, which unpickles the task graph) get lensflow's environment
    # but no Prefect API: Prefect's default profile lets a process start a temporary server.
    bare = {k: v for k, v in stack.env.items() if k != "PREFECT_API_URL"}
    address = f"tcp://127.0.0.1:{dask_port}"
    dask = str(Path(sys.executable).parent / "dask")

    def start(name: str, *args: str) -> subprocess.Popen:
        log = open(root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([dask, *args], env=bare, cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        stack.processes.append(proc)
        return proc

    try:
        server = stack.start("server", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port))
        start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(dask_port),
              "--no-dashboard")
        workers = start("workers", "worker", address, "--nworkers", "2", "--nthreads", "1",
                        "--no-dashboard")
        with distributed.Client(address, timeout=120) as client:
            client.wait_for_workers(2, timeout=180)
        stack.wait_for_health(server)
        yield RealCluster(stack, address, workers)
    finally:
        for proc in reversed(stack.processes):
            _stop(proc)


@pytest.mark.slow
@pytest.mark.e2e
def test_cli_shards_on_real_workers_report_to_the_flows_server(data, tmp_path, real_cluster):
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterId,
    )

    stack = real_cluster.stack
    done = real_cluster.lensflow("score", "images", str(data["images"]), "--model",
                                 str(data["model"]), "--out", str(tmp_path), "--run-date",
                                 DAY.isoformat(), "--shards", "4", "--dask-address",
                                 real_cluster.address, env=stack.env)
    assert done.returncode == 0, done.stdout + done.stderr + stack.log_tail("workers")
    assert "scored 27 of 28 images (1 failed" in done.stdout
    with stack.client() as client:
        (run,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["score-image-folder"])))
        assert run.state.is_completed()
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[run.id])))
    shards = {t.name: t.state.name for t in tasks if t.name.startswith("score-image-shard")}
    # Every shard, already final when the flow run ended (the flow waits for the records).
    assert shards == {f"score-image-shard-{i}": "Completed" for i in range(4)}
    real_cluster.assert_workers_started_no_server()


@pytest.mark.slow
@pytest.mark.e2e
def test_a_flow_on_a_temporary_server_lends_it_to_workers_on_this_machine(
        data, tmp_path, real_cluster):
    import distributed

    # Fresh worker processes: a process reports to one Prefect API, here so far the real server.
    with distributed.Client(real_cluster.address, timeout=60) as client:
        client.restart(wait_for_workers=True, timeout=180)
    home = tmp_path / "prefect-home"
    env = {**{k: v for k, v in real_cluster.stack.env.items() if k != "PREFECT_API_URL"},
           "PREFECT_HOME": str(home)}
    done = real_cluster.lensflow("score", "images", str(data["images"]), "--model",
                                 str(data["model"]), "--out", str(tmp_path / "out"),
                                 "--run-date", DAY.isoformat(), "--shards", "3",
                                 "--dask-address", real_cluster.address, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output + real_cluster.stack.log_tail("workers")
    # That server is gone with the flow; its database holds the shards' final states.
    with sqlite3.connect(home / "prefect.db") as db:
        shards = dict(db.execute("SELECT name, state_name FROM task_run WHERE name LIKE "
                                 "'score-image-shard-%'"))
    assert shards == {f"score-image-shard-{i}": "Completed" for i in range(3)}
    real_cluster.assert_workers_started_no_server()
    assert re.search(r"the shards report to this flow's temporary Prefect server at "
                     r"http://127\.0\.0\.1:\d+/api", " ".join(output.split())), output


@pytest.mark.slow
@pytest.mark.e2e
def test_stopped_workers_leave_no_process_behind(real_cluster):
    """As an operator stops them: SIGTERM to ``dask worker``; every process under it ends."""
    processes = real_cluster.worker_processes()
    assert len(processes) >= 3  # `dask worker` (the nannies) and its two worker processes
    real_cluster.workers.send_signal(signal.SIGTERM)
    real_cluster.workers.wait(timeout=60)
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, [" ".join(p.cmdline()) for p in alive]
