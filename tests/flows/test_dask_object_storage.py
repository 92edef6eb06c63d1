"""Dask workers that share no file system with the flow: folder, bundle and output on object
storage (the loopback S3 server). Each worker fetches the bundle from the registry URL into its
own cache (not the planner's), the partition equals the single-process run row for row, and a
worker killed in the middle of a shard still leaves every row exactly once."""

from __future__ import annotations

from datetime import date

import fsspec
import pandas as pd
import pytest
from dask_cluster_runs import kill_first_shard, killed_worker, two_worker_cluster
from flow_test_data import make_images
from s3_server import new_bucket
from tiny_image_bundle import make_image_bundle

from export import bundle_remote
from flows.dask_runner import DASK_ADDRESS_ENV
from scoring import bundle_cache
from scoring.image_scoring import score_image_folder
from scoring.object_commit import open_table

DAY = date(2026, 11, 22)
pytestmark = pytest.mark.slow  # a Prefect server and a two-worker Dask cluster


@pytest.fixture(scope="module")
def store(s3_endpoint, tmp_path_factory):
    """A bucket with 12 images (nested, one broken) and a promoted bundle in its registry."""
    root = tmp_path_factory.mktemp("dask-s3")
    images = make_images(root / "images", 8)
    make_images(images / "more", 3, seed=1)
    (images / "more" / "broken.jpg").write_bytes(b"not a jpeg")
    bucket = new_bucket()
    fsspec.filesystem("s3").put(str(images), f"{bucket}/images", recursive=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(bundle_remote.CACHE_ENV, str(root / "exporter-cache"))
        make_image_bundle(f"{bucket}/registry", name="tiny")
    return {"root": root, "bucket": bucket, "images": f"{bucket}/images",
            "model": f"{bucket}/registry/tiny"}


@pytest.fixture(scope="module")
def cluster(store, prefect_api):
    """Two single-threaded worker processes whose bundle cache is theirs alone."""
    import distributed

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(DASK_ADDRESS_ENV, raising=False)
        mp.setenv(bundle_remote.CACHE_ENV, str(store["root"] / "worker-cache"))
        local = two_worker_cluster()
    with local, distributed.Client(local, set_as_default=False) as client:
        yield local, client


@pytest.fixture
def planner_cache(store, monkeypatch):
    monkeypatch.setenv(bundle_remote.CACHE_ENV, str(store["root"] / "planner-cache"))


def _rows(out: str) -> pd.DataFrame:
    frame = open_table(out, "image_predictions").to_table().to_pandas()
    return frame.drop(columns=["scored_at"]).sort_values("path").reset_index(drop=True)


def test_images_on_two_workers_from_s3_equal_the_single_process_run(
        store, cluster, planner_cache):
    from flows.score_flows import score_image_folder_flow

    local, client = cluster
    client.run(bundle_cache.clear)
    out = f"{store['bucket']}/two-workers"
    state = score_image_folder_flow(store["images"], store["model"], out, run_date=DAY,
                                    shards=4, dask_address=local.scheduler_address,
                                    return_state=True)
    assert state.is_completed(), state.message
    assert (state.result()["scored"], state.result()["failed"]) == (11, 1)
    single = score_image_folder(store["images"], store["model"], f"{store['bucket']}/single",
                                run_date=DAY, workers=0)
    pd.testing.assert_frame_equal(_rows(out), _rows(f"{store['bucket']}/single"))
    # The workers fetched the bundle into their own cache, once in all, then verified it once
    # per process; nothing of the planner's cache was used.
    downloads = client.run(lambda: sum(bundle_remote.downloads.values()))
    assert sum(downloads.values()) == 1
    assert (store["root"] / "worker-cache").is_dir()
    loads = client.run(bundle_cache.load_counts)
    assert all(n == 1 for counts in loads.values() for key, n in counts.items()
               if key.startswith("bundle "))
    assert single.scored == 11


def test_a_worker_killed_mid_shard_on_s3_still_commits_every_row_exactly_once(
        store, cluster, planner_cache, tmp_path, monkeypatch):
    """The first shard writes its parts, leaves a stray extra part in the run's prefix as a
    crash would, and SIGKILLs its own worker; Dask reruns it on the other."""
    from flows.score_flows import score_image_folder_flow

    local, client = cluster
    marker = tmp_path / "killed"

    def leave_a_stray_copy(job):
        prefix = f"{job.pending.temp_dir}/part-{job.shard:05d}"
        fsspec.filesystem("s3").copy(f"{prefix}-0000.parquet", f"{prefix}-0007.parquet")

    kill_first_shard(monkeypatch, marker, leave_a_stray_copy)
    out = f"{store['bucket']}/killed"
    state = score_image_folder_flow(
        store["images"], store["model"], out, run_date=DAY, shards=4,
        dask_address=local.scheduler_address, return_state=True)
    assert state.is_completed(), state.message
    killed_worker(marker, client)
    paths = _rows(out)["path"].tolist()
    assert paths == sorted(paths) and len(paths) == len(set(paths)) == 12  # each file once
