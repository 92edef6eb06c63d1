"""The Parquet partition protocol: layout, metadata, bounded files, shards, one writer per
partition, staging outside the tables, commit under a kill."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from datetime import date
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from paths import REPO

from scoring.errors import PartitionError
from scoring.partition import (
    CommittedPartition,
    abort_partition,
    commit_partition,
    committed_partitions,
    open_partition,
    read_partition,
)
from scoring.staging import STAGING_DIR

DAY = date(2026, 11, 22)
OTHER_DAY = date(2026, 11, 23)
SCHEMA = pa.schema([("user", pa.int64()), ("score", pa.float32())])
META = {"model_name": "m", "model_version": "v1", "bundle_sha256": "ab" * 32, "owner": "tests"}


def _rows(start: int, n: int) -> dict:
    users = list(range(start, start + n))
    return {"user": users, "score": [u / 2 for u in users]}


def _write(out: Path, start: int, n: int, day: date = DAY, **kw) -> CommittedPartition:
    """One run of one shard: open, write, commit."""
    pending = open_partition(out, "scores", day, SCHEMA, META, **kw)
    with pending.part_writer(0) as w:
        w.write(_rows(start, n))
    return commit_partition(pending, expected_shards=[0])


def test_layout_success_metadata_and_hive_read(tmp_path):
    result = _write(tmp_path, 0, 10, run_id="run-1")
    part_dir = tmp_path / "scores" / "run_date=2026-11-22"
    assert result.path == part_dir and result.rows == 10 and result.files == 1
    assert sorted(p.name for p in part_dir.iterdir()) == ["_SUCCESS", "part-00000-0000.parquet"]
    assert json.loads((part_dir / "_SUCCESS").read_text())["rows"] == 10
    meta = pq.read_schema(part_dir / "part-00000-0000.parquet").metadata
    assert meta[b"lensflow.model_name"] == b"m"
    assert meta[b"lensflow.bundle_sha256"] == b"ab" * 32
    assert meta[b"lensflow.run_id"] == b"run-1"
    assert meta[b"lensflow.run_date"] == b"2026-11-22"
    assert meta[b"lensflow.owner"] == b"tests"
    table = ds.dataset(tmp_path / "scores", partitioning="hive").to_table()
    assert table.num_rows == 10 and "run_date" in table.column_names
    assert [p.name for p in tmp_path.joinpath("scores").iterdir()] == ["run_date=2026-11-22"]


def test_rows_per_file_bounds_files_and_keeps_order(tmp_path):
    pending = open_partition(tmp_path, "scores", DAY, SCHEMA, META, rows_per_file=7)
    with pending.part_writer(0) as w:
        for start in range(0, 30, 4):  # batches that straddle file boundaries
            w.write(pa.RecordBatch.from_pydict(_rows(start, 4), schema=SCHEMA))
    result = commit_partition(pending)
    names = sorted(p.name for p in result.path.glob("*.parquet"))
    assert names == [f"part-00000-{i:04d}.parquet" for i in range(5)]
    sizes = [pq.read_metadata(result.path / n).num_rows for n in names]
    assert sizes == [7, 7, 7, 7, 4]
    assert read_partition(tmp_path, "scores", DAY)["user"].to_pylist() == list(range(32))


def test_empty_run_still_writes_a_readable_schema(tmp_path):
    result = _write(tmp_path, 0, 0)
    table = read_partition(tmp_path, "scores", DAY)
    assert table.num_rows == 0 and table.schema.names == SCHEMA.names
    assert result.files == 1


def test_exception_keeps_previous_partition_and_removes_temp(tmp_path):
    _write(tmp_path, 0, 5)
    pending = open_partition(tmp_path, "scores", DAY, SCHEMA, META)
    with pytest.raises(RuntimeError):
        with pending.part_writer(0) as w:
            w.write(_rows(100, 50))
            raise RuntimeError("boom")
    abort_partition(pending)
    assert read_partition(tmp_path, "scores", DAY)["user"].to_pylist() == list(range(5))
    assert [p.name for p in (tmp_path / "scores").iterdir()] == ["run_date=2026-11-22"]
    assert _staged_files(tmp_path) == []


def test_rerun_replaces_partition_whole(tmp_path):
    _write(tmp_path, 0, 20, rows_per_file=5)  # four parts
    _write(tmp_path, 100, 3)  # one part: no stale part of the first run may survive
    assert read_partition(tmp_path, "scores", DAY)["user"].to_pylist() == [100, 101, 102]
    assert len(list((tmp_path / "scores" / "run_date=2026-11-22").glob("*.parquet"))) == 1


def test_a_replacement_never_reuses_a_part_name_so_a_racing_reader_fails_rather_than_mixes(
        tmp_path):
    _write(tmp_path, 0, 20, rows_per_file=10)
    listed = sorted((tmp_path / "scores" / "run_date=2026-11-22").glob("part-*.parquet"))
    assert [p.name for p in listed] == ["part-00000-0000.parquet", "part-00000-0001.parquet"]
    _write(tmp_path, 100, 20, rows_per_file=10)  # a reader that listed the old files reads now
    names = sorted(p.name for p in listed[0].parent.glob("part-*.parquet"))
    assert names == ["part-00000-0002.parquet", "part-00000-0003.parquet"]
    with pytest.raises(FileNotFoundError):
        pq.read_table(listed[1])
    _write(tmp_path, 200, 5)
    assert read_partition(tmp_path, "scores", DAY)["user"].to_pylist() == list(range(200, 205))


def test_metadata_must_name_the_model(tmp_path):
    with pytest.raises(ValueError, match="bundle_sha256"):
        open_partition(tmp_path, "scores", DAY, SCHEMA, {"model_name": "m", "model_version": "1"})
    with pytest.raises(PartitionError, match="run_id"):
        open_partition(tmp_path, "scores", DAY, SCHEMA, META, run_id="../escape")


def test_shards_fill_one_partition_and_commit_once(tmp_path):
    pending = open_partition(tmp_path, "scores", DAY, SCHEMA, META, rows_per_file=3)
    pending = pickle.loads(pickle.dumps(pending))  # as a Dask/Prefect worker would receive it
    for shard in (1, 0):
        with pending.part_writer(shard) as w:
            w.write(_rows(shard * 10, 4))
    # A retried shard replaces what its failed attempt wrote.
    with pending.part_writer(1) as w:
        w.write(_rows(50, 2))
    assert not partition_visible(tmp_path)
    with pytest.raises(PartitionError, match=r"shard\(s\) \[2\]"):
        commit_partition(pending, expected_shards=[0, 1, 2])
    result = commit_partition(pending, expected_shards=[0, 1])
    names = sorted(p.name for p in result.path.glob("*.parquet"))
    assert names == [
        "part-00000-0000.parquet", "part-00000-0001.parquet", "part-00001-0000.parquet"
    ]
    assert read_partition(tmp_path, "scores", DAY)["user"].to_pylist() == [0, 1, 2, 3, 50, 51]


def test_commit_refuses_a_part_still_being_written(tmp_path):
    pending = open_partition(tmp_path, "scores", DAY, SCHEMA, META)
    writer = pending.part_writer(0)
    writer.write(_rows(0, 3))
    writer._flush()  # a file is now open under its in-progress name
    with pytest.raises(PartitionError, match="still being written"):
        commit_partition(pending)
    writer.close()
    assert commit_partition(pending).rows == 3


def test_staging_lives_outside_the_table_where_no_glob_finds_it(tmp_path):
    _write(tmp_path, 0, 40)  # yesterday's partition, visible
    pending = open_partition(tmp_path, "scores", DAY, SCHEMA, META, run_id="night-2")
    with pending.part_writer(0) as w:
        w.write(_rows(100, 40))
    assert pending.temp_dir == tmp_path / STAGING_DIR / "scores" / "run_date=2026-11-22" / "night-2"
    assert len(list(pending.temp_dir.glob("part-*.parquet"))) == 1
    glob = f"{tmp_path}/scores/*/*.parquet"
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}', hive_partitioning=true)"
                      ).fetchall() == [(40,)]
    assert ds.dataset(tmp_path, partitioning="hive").count_rows() == 40  # the whole output root
    commit_partition(pending)
    assert duckdb.sql(f"SELECT min(user) FROM read_parquet('{glob}', hive_partitioning=true)"
                      ).fetchall() == [(100,)]
    assert _staged_files(tmp_path) == []


def test_one_writer_per_partition_and_the_second_names_the_first(tmp_path):
    first = open_partition(tmp_path, "scores", DAY, SCHEMA, META, run_id="night-1")
    with first.part_writer(0) as w:
        w.write(_rows(0, 3))
    with pytest.raises(PartitionError) as err:
        open_partition(tmp_path, "scores", DAY, SCHEMA, META, run_id="night-2")
    message = str(err.value)
    assert "\n" not in message and "run night-1" in message and f"pid {os.getpid()}" in message
    assert "scores run_date=2026-11-22" in message
    assert len(list(first.temp_dir.glob("part-*.parquet"))) == 1  # nothing of the first deleted
    other = open_partition(tmp_path, "scores", OTHER_DAY, SCHEMA, META)  # another date: free
    abort_partition(other)
    assert commit_partition(first).rows == 3
    assert _write(tmp_path, 10, 2).rows == 2  # the lock went with the commit


def test_the_next_run_of_any_date_clears_what_dead_runs_left_but_not_live_runs(tmp_path):
    dead = tmp_path / STAGING_DIR / "other_table" / "run_date=2026-01-01"
    (dead / "20260101T000000Z-dead").mkdir(parents=True)
    (dead / "20260101T000000Z-dead" / "part-00000-0000.parquet").write_bytes(b"PAR1")
    (dead.parent / "run_date=2026-01-01.lock").write_text('{"run_id": "dead"}')
    legacy = tmp_path / "scores" / ".run_date=2026-01-02-old-run.tmp"
    legacy.mkdir(parents=True)
    (legacy / "part-00000-0000.parquet").write_bytes(b"PAR1")
    live = open_partition(tmp_path, "scores", OTHER_DAY, SCHEMA, META, run_id="live")
    with live.part_writer(0) as w:
        w.write(_rows(0, 2))
    _write(tmp_path, 0, 5)  # a run of another date
    assert not dead.exists() and not (dead.parent / "run_date=2026-01-01.lock").exists()
    assert not legacy.exists()
    assert len(list(live.temp_dir.glob("part-*.parquet"))) == 1
    assert commit_partition(live).rows == 2
    assert _staged_files(tmp_path) == []


def test_fallback_commit_crash_between_renames_is_recovered(tmp_path):
    _write(tmp_path, 0, 4, run_id="first")
    # A crash after the old partition was renamed aside and before the new one came in.
    final = tmp_path / "scores" / "run_date=2026-11-22"
    aside = tmp_path / STAGING_DIR / "scores" / "run_date=2026-11-22" / "second.old"
    aside.parent.mkdir(parents=True)
    final.rename(aside)
    _write(tmp_path, 0, 1, day=OTHER_DAY)  # any run of the output root repairs it
    assert read_partition(tmp_path, "scores", DAY)["user"].to_pylist() == [0, 1, 2, 3]
    assert committed_partitions(tmp_path, "scores") == [
        final, final.with_name("run_date=2026-11-23")]
    assert _staged_files(tmp_path) == []


def test_rerun_replaces_partition_without_atomic_exchange(tmp_path, monkeypatch):
    import scoring.staging as staging

    _write(tmp_path, 0, 6, rows_per_file=2)
    monkeypatch.setattr(staging, "_exchange", lambda a, b: False)  # e.g. macOS, some NFS
    _write(tmp_path, 40, 3)
    assert read_partition(tmp_path, "scores", DAY)["user"].to_pylist() == [40, 41, 42]
    assert [p.name for p in (tmp_path / "scores").iterdir()] == ["run_date=2026-11-22"]
    assert _staged_files(tmp_path) == []


@pytest.mark.parametrize("kind", ["file", "under a file", "unwritable"])
def test_an_out_that_cannot_hold_tables_is_one_line_naming_it(tmp_path, kind):
    (tmp_path / "f").write_text("x")
    out = {"file": tmp_path / "f", "under a file": tmp_path / "f" / "out",
           "unwritable": Path("/proc/lensflow-out")}[kind]
    with pytest.raises(PartitionError, match=f"^out {out}: ") as err:
        open_partition(out, "scores", DAY, SCHEMA, META)
    assert "\n" not in str(err.value)


def partition_visible(out: Path) -> bool:
    return any((out / "scores").glob("run_date=*"))


def _staged_files(out: Path) -> list[Path]:
    """Files left in staging (directories emptied of files do not count)."""
    return [p for p in (out / STAGING_DIR).rglob("*") if not p.is_dir()]


SLOW_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from datetime import date
    import pyarrow as pa
    from scoring.partition import open_partition
    schema = pa.schema([("user", pa.int64()), ("score", pa.float32())])
    meta = {"model_name": "m", "model_version": "v2", "bundle_sha256": "cd" * 32}
    pending = open_partition(sys.argv[1], "scores", date(2026, 11, 22), schema, meta,
                             rows_per_file=10)
    child = os.fork()  # as a DataLoader worker is: it must not keep the lock alive
    if child == 0:
        time.sleep(120)
        os._exit(0)
    with pending.part_writer(0) as w:
        for i in range(10_000):
            w.write({"user": list(range(1000 + i * 10, 1010 + i * 10)), "score": [0.0] * 10})
            w._flush()
            if i == 3:
                print("writing", child, flush=True)
            time.sleep(0.01)
    """
)


def test_sigkill_mid_write_leaves_previous_partition_and_frees_the_partition(tmp_path):
    _write(tmp_path, 0, 25, rows_per_file=10)
    before = read_partition(tmp_path, "scores", DAY)
    env = os.environ | {"PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env
    )
    forked = None
    try:
        word, forked = child.stdout.readline().split()
        assert word == b"writing"
        staged = list((tmp_path / STAGING_DIR / "scores" / "run_date=2026-11-22").iterdir())
        assert len(staged) == 1 and any(staged[0].glob("part-*.parquet"))
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert read_partition(tmp_path, "scores", DAY).equals(before)
        visible = ds.dataset(tmp_path / "scores", partitioning="hive").to_table()
        assert visible.num_rows == 25  # the killed run's parts are hidden from dataset readers
        _write(tmp_path, 0, 1, day=OTHER_DAY)  # the forked child still lives: no lock held
        assert not staged[0].exists()
        _write(tmp_path, 500, 12, rows_per_file=10)
    finally:
        child.kill()
        child.wait()
        if forked:
            os.kill(int(forked), signal.SIGKILL)
    assert read_partition(tmp_path, "scores", DAY)["user"].to_pylist() == list(range(500, 512))
    assert [p.name for p in (tmp_path / "scores").iterdir()] == [
        "run_date=2026-11-22", "run_date=2026-11-23"]
    assert _staged_files(tmp_path) == []


def test_a_run_waits_out_a_sweeper_clearing_its_date(tmp_path, monkeypatch):
    import scoring.staging as staging

    lock = tmp_path / STAGING_DIR / "scores" / "run_date=2026-11-22.lock"
    lock.parent.mkdir(parents=True)
    fd = staging._try_lock(lock)
    staging._write_holder(fd, sweeping=True)  # as another run's sweep of dead staging does
    seen = []
    real_holder = staging._holder

    def sweep_ends_on_the_second_look(path):
        # The sweeper finishes while the run waits, at a step of the run, not after a delay
        # that a loaded machine may stretch past the run's patience.
        holder = real_holder(path)
        seen.append(holder)
        if len(seen) == 2:
            lock.unlink()
            os.close(fd)
        return holder

    monkeypatch.setattr(staging, "_holder", sweep_ends_on_the_second_look)
    assert _write(tmp_path, 0, 3).rows == 3
    assert [h["sweeping"] for h in seen] == [True, True]
