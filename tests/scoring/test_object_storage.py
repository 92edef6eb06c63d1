"""Parquet tables and image folders on object storage (the loopback S3 server) in the legacy
``parquet`` layout there, the commit record (``table_format="parquet"`` on a URL; ``delta`` is
the default, tests/scoring/test_delta_s3.py): replacement of a date whole, dead runs' parts, and a
scoring run read back by DuckDB and pyarrow exactly as the same run on local disk."""

from __future__ import annotations

import json
from datetime import date

import duckdb
import fsspec
import pyarrow.dataset as ds
import pytest
from flow_test_data import make_images
from scores_table import DAY, META, OTHER_DAY, SCHEMA, string_id_recommender, write_users
from tiny_image_bundle import make_image_bundle

from export import bundle_remote
from scoring import object_commit
from scoring.errors import ImageFolderError, PartitionError
from scoring.image_folder import walk_folder
from scoring.image_scoring import score_image_folder
from scoring.object_commit import open_table, table_parts
from scoring.options import ScoreOptions
from scoring.partition import (
    abort_partition,
    commit_partition,
    open_partition,
    read_partition,
)
from scoring.shards import current_run

RECORD = ScoreOptions(table_format="parquet")


def _write(out: str, start: int, n: int, day: date = DAY, shards: int = 1, **kw):
    return write_users(out, start, n, RECORD, day, shards, **kw)[1]


def _users(out: str) -> dict[str, list[int]]:
    t = open_table(out, "scores").to_table()
    found: dict[str, list[int]] = {}
    for day, user in zip(t["run_date"].to_pylist(), t["user"].to_pylist(), strict=True):
        found.setdefault(str(day), []).append(user)
    return {day: sorted(users) for day, users in found.items()}


def test_the_commit_record_names_every_part_and_a_rerun_replaces_the_date_whole(s3_bucket):
    out = f"{s3_bucket}/out"
    first = _write(out, 0, 4, shards=2, run_id="run-1")
    _write(out, 100, 2, day=OTHER_DAY)
    assert first.path == f"{out}/scores/_commits/run_date={DAY}.json"
    record = json.loads(fsspec.open(first.path).open().read())
    assert (record["run_id"], record["rows"], record["files"]) == ("run-1", 8, 4)
    assert [p["rows"] for p in record["parts"]] == [3, 1, 3, 1]
    assert record["parts"][0]["path"] == f"_parts/run_date={DAY}/run-1/part-00000-0000.parquet"
    assert _users(out) == {str(DAY): list(range(8)), str(OTHER_DAY): [100, 101]}

    _write(out, 50, 3, run_id="run-2")
    assert _users(out) == {str(DAY): [50, 51, 52], str(OTHER_DAY): [100, 101]}
    fs = fsspec.filesystem("s3")
    assert not fs.exists(f"{out}/scores/_parts/run_date={DAY}/run-1")  # replaced: deleted
    assert read_partition(out, "scores", DAY)["user"].to_pylist() == [50, 51, 52]


def test_an_aborted_or_unfinished_run_is_never_visible(s3_bucket):
    out = f"{s3_bucket}/out"
    _write(out, 0, 2, run_id="old")
    pending = open_partition(out, "scores", DAY, SCHEMA, META, run_id="aborted",
                             options=RECORD)
    with pending.part_writer(0) as w:
        w.write({"user": [7], "score": [1.0]})
    assert _users(out) == {str(DAY): [0, 1]}  # written, not committed
    abort_partition(pending)
    assert _users(out) == {str(DAY): [0, 1]}
    assert not fsspec.filesystem("s3").exists(pending.temp_dir)

    pending = open_partition(out, "scores", DAY, SCHEMA, META, run_id="one-shard-of-two",
                             options=RECORD)
    with pending.part_writer(0) as w:
        w.write({"user": [9], "score": [1.0]})
    with pytest.raises(PartitionError, match=r"no part from shard\(s\) \[1\]"):
        commit_partition(pending, expected_shards=[0, 1])
    assert _users(out) == {str(DAY): [0, 1]}


def test_parts_of_dead_runs_are_deleted_once_old_and_live_ones_kept(s3_bucket):
    out = f"{s3_bucket}/out"
    _write(out, 0, 2, run_id="committed")
    dead = open_partition(out, "scores", DAY, SCHEMA, META, run_id="dead",
                          options=RECORD)
    with dead.part_writer(0) as w:  # then the process dies: no commit, no abort
        w.write({"user": [5], "score": [1.0]})
    assert object_commit.clear_dead_runs(out, "scores") == []  # could still be running
    assert object_commit.clear_dead_runs(out, "scores", grace_s=0) == [
        f"run_date={DAY}/dead"]
    assert _users(out) == {str(DAY): [0, 1]}


def test_readers_pyarrow_and_duckdb_read_the_committed_parts(s3_bucket):
    out = f"{s3_bucket}/out"
    _write(out, 0, 4, shards=2)
    fs = fsspec.filesystem("s3")
    con = duckdb.connect()
    con.register_filesystem(fs)
    parts = table_parts(out, "scores")
    got = con.sql(f"SELECT count(*), sum(\"user\") FROM read_parquet({parts!r})").fetchall()[0]
    assert got == (8, sum(range(8)))
    arrow = ds.dataset([p.removeprefix("s3://") for p in parts], filesystem=fs, format="parquet")
    assert arrow.count_rows() == 8


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(bundle_remote.CACHE_ENV, str(tmp_path / "cache"))


def test_score_an_s3_folder_with_an_s3_bundle_to_s3_parquet_as_on_local_disk(
        s3_bucket, cache, tmp_path):
    local = make_images(tmp_path / "photos" / "day1", 9, size=36)
    (local / ".hidden.png").write_bytes(b"not scored")
    (local / "notes.txt").write_text("not an image")
    (local / "broken.jpg").write_bytes(b"not a jpeg")
    fs = fsspec.filesystem("s3")
    fs.put(str(tmp_path / "photos"), f"{s3_bucket}/photos", recursive=True)
    model = make_image_bundle(f"{s3_bucket}/registry")
    out = f"{s3_bucket}/scores"
    options = {"run_date": DAY, "batch_size": 4, "workers": 0, "shards": 2,
               "table_format": "parquet"}

    remote = score_image_folder(f"{s3_bucket}/photos", f"{s3_bucket}/registry/tiny", out,
                                **options)
    here = score_image_folder(tmp_path / "photos", model, tmp_path / "out", **options)
    assert (remote.files, remote.scored, remote.failed) == (10, 9, 1) == (
        here.files, here.scored, here.failed)
    assert remote.partition == f"{out}/image_predictions/_commits/run_date={DAY}.json"
    columns = ["path", "pred_label", "topk_scores", "error", "bundle_sha256"]
    on_s3 = open_table(out, "image_predictions").to_table(columns=columns).sort_by("path")
    on_disk = ds.dataset(tmp_path / "out" / "image_predictions", partitioning="hive").to_table(
        columns=columns).sort_by("path")
    assert on_s3.drop(["error"]).to_pylist() == on_disk.drop(["error"]).to_pylist()
    broken = f"{s3_bucket}/photos/day1/broken.jpg"
    assert on_s3["error"][0].as_py() == f"UnidentifiedImageError: cannot identify image file "\
                                         f"'{broken}'"
    assert current_run(out, DAY, ["image_predictions"])["run_id"] == remote.run_id

    again = score_image_folder(f"{s3_bucket}/photos", f"{s3_bucket}/registry/tiny", out,
                               run_date=OTHER_DAY, incremental=True, workers=0,
                               table_format="parquet")
    assert (again.scored, again.failed, again.skipped_incremental) == (0, 1, 9)
    assert bundle_remote.downloads[model] == 1


def test_a_missing_s3_folder_is_one_line(s3_bucket):
    with pytest.raises(ImageFolderError, match=f"{s3_bucket}/nothing: no such folder"):
        walk_folder(f"{s3_bucket}/nothing")


@pytest.mark.slow  # exports a recommender (ONNX, TorchScript, parity)
def test_recommendations_from_an_s3_registry_and_users_file_to_s3_as_on_local_disk(
        s3_bucket, cache, tmp_path):
    from scoring.recommendations import FULL_TABLE, TOPK_TABLE, score_recommendations

    bundle = string_id_recommender(f"{s3_bucket}/registry")
    users = b"u3\nu1\nnobody\nu7\n"
    fsspec.filesystem("s3").pipe(f"{s3_bucket}/users.txt", users)
    (tmp_path / "users.txt").write_bytes(users)
    options = {"top_k": 3, "full_table": True, "shards": 2, "run_date": DAY,
               "table_format": "parquet"}
    out = f"{s3_bucket}/recs"
    remote = score_recommendations(bundle, out, users=f"{s3_bucket}/users.txt", **options)
    here = score_recommendations(bundle, tmp_path / "out", users=tmp_path / "users.txt",
                                 **options)
    assert (remote.users_scored, remote.unknown_users) == (3, 1) == (
        here.users_scored, here.unknown_users)
    for table in (TOPK_TABLE, FULL_TABLE):
        on_s3 = read_partition(out, table, DAY).to_pylist()
        on_disk = read_partition(tmp_path / "out", table, DAY).to_pylist()
        assert on_s3 == on_disk and on_s3
    assert set(current_run(out, DAY, [TOPK_TABLE, FULL_TABLE])["partitions"]) == {
        TOPK_TABLE, FULL_TABLE}


def test_decoding_processes_adopt_the_planners_storage_settings(s3_bucket, tmp_path):
    """A decoding process forked from a forkserver that started before the endpoint was set
    (as in a long-lived worker) still reads the same store: the dataset carries the settings."""
    import os
    import pickle
    import subprocess
    import sys

    from export.pixels import Preprocessing
    from scoring.image_batches import DecodedImages

    make_images(tmp_path / "photos", 2, size=40)
    fsspec.filesystem("s3").put(str(tmp_path / "photos"), f"{s3_bucket}/photos", recursive=True)
    files = list(walk_folder(f"{s3_bucket}/photos").files)
    dataset = tmp_path / "dataset.pkl"
    dataset.write_bytes(pickle.dumps(DecodedImages(files, Preprocessing(input_size=32,
                                                                        resize_size=32))))
    read = ("import pickle, sys; d = pickle.load(open(sys.argv[1], 'rb')); "
            "print([e for _, _, e in d.__getitems__([0, 1])])")
    bare = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    done = subprocess.run([sys.executable, "-c", read, str(dataset)], env=bare,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[None, None]"


class _FlakyReads:
    """An fsspec file system whose reads of ``victim`` fail ``failures`` times, as a GET that
    times out or gets a 503 would; everything else is the real file system's."""

    def __init__(self, fs, victim: str, failures: int) -> None:
        self.fs, self.victim, self.failures = fs, victim, failures

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def _fail(self) -> bool:
        if self.failures > 0:
            self.failures -= 1
            return True
        return False

    def cat(self, paths, on_error="raise", **kw):
        got = self.fs.cat(paths, on_error=on_error, **kw)
        if self.victim in got and self._fail():
            error = OSError(f"503 Slow Down: {self.victim}")
            if on_error == "omit":
                del got[self.victim]
            elif on_error == "return":
                got[self.victim] = error
            else:
                raise error
        return got

    def cat_file(self, path, *args, **kw):
        if path == self.victim and self._fail():
            raise OSError(f"503 Slow Down: {path}")
        return self.fs.cat_file(path, *args, **kw)


def _two_committed_dates(out: str) -> str:
    """Two dates' commit records of table ``t``; returns the path of the second's record."""
    days = [date(2026, 11, 21), DAY]
    for day in days:
        fs, path = fsspec.url_to_fs(object_commit.record_url(out, "t", day))
        fs.pipe_file(path, json.dumps({"run_id": f"run-{day}", "parts": []}).encode())
    return fsspec.url_to_fs(object_commit.record_url(out, "t", days[1]))[1]


@pytest.mark.parametrize("failures", [1, 3])
def test_a_commit_record_read_that_fails_is_retried_never_a_dropped_date(monkeypatch, failures):
    """on_error='omit' used to drop a whole date from open_table/table_parts on one failed GET."""
    out = f"memory://lensflow-flaky-{failures}/out"
    victim = _two_committed_dates(out)
    real = object_commit.filesystem
    monkeypatch.setattr(object_commit, "_RETRY_WAIT_S", 0.0)
    monkeypatch.setattr(object_commit, "filesystem",
                        lambda url: (_FlakyReads(real(url)[0], victim, failures), real(url)[1]))
    records = object_commit.committed_records(out, "t")
    assert [r["run_id"] for r in records] == ["run-2026-11-21", f"run-{DAY}"]


def test_a_commit_record_that_stays_unreadable_is_one_clear_error(monkeypatch):
    out = "memory://lensflow-flaky-forever/out"
    victim = _two_committed_dates(out)
    real = object_commit.filesystem
    monkeypatch.setattr(object_commit, "_RETRY_WAIT_S", 0.0)
    monkeypatch.setattr(object_commit, "filesystem",
                        lambda url: (_FlakyReads(real(url)[0], victim, 99), real(url)[1]))
    with pytest.raises(PartitionError) as refused:
        table_parts(out, "t")
    message = str(refused.value)
    assert message.startswith(f"memory://{victim}: commit record unreadable after 4 tries")
    assert "503 Slow Down" in message and "\n" not in message
