"""Housekeeping of ``delta`` tables, through ``lensflow table``: the history that names who wrote
each date, vacuum after the grace period (dead runs' parts and replaced files, time travel kept
until then), compaction that changes no row and keeps the run record valid, and checkpoints."""

from __future__ import annotations

import os
import time
from datetime import date

import pyarrow as pa
from cli_runs import assert_one_line, lensflow
from deltalake import DeltaTable

from scoring.delta_maintenance import CHECKPOINT_INTERVAL, history, optimize, vacuum
from scoring.options import ScoreOptions
from scoring.partition import commit_partition, open_partition
from scoring.shards import RunPlan, ShardJob, ShardResult, commit_run, current_run

DAY, OTHER_DAY = date(2026, 11, 22), date(2026, 11, 23)
SCHEMA = pa.schema([("user", pa.int64()), ("score", pa.float32())])
META = {"model_name": "m", "model_version": "v1", "bundle_sha256": "ab" * 32}
DELTA = ScoreOptions(table_format="delta")


def _fill(out, start: int, n: int, day: date = DAY, run_id: str | None = None, **kw):
    pending = open_partition(out, "scores", day, SCHEMA, META, options=DELTA, run_id=run_id,
                             rows_per_file=kw.pop("rows_per_file", 1_000_000))
    with pending.part_writer(0) as w:
        w.write({"user": list(range(start, start + n)), "score": [0.5] * n})
    return pending


def _users(out, version: int | None = None) -> list[int]:
    t = DeltaTable(str(out / "scores"), version=version).to_pyarrow_table(
        filters=[("run_date", "=", DAY)])
    return sorted(t["user"].to_pylist())


def test_history_names_the_run_model_and_bundle_of_every_date(tmp_path, monkeypatch, capsys):
    commit_partition(_fill(tmp_path, 0, 2, run_id="night-1"))
    commit_partition(_fill(tmp_path, 5, 1, day=OTHER_DAY, run_id="other"))
    commit_partition(_fill(tmp_path, 9, 3, run_id="night-2"))
    assert [c.run_id for c in history(tmp_path, "scores", run_date=DAY)] == ["night-2", "night-1"]
    newest = history(tmp_path, "scores", limit=1)[0]
    assert (newest.version, newest.operation, newest.rows, newest.model_version) == (
        3, "WRITE", "3", "v1")
    assert newest.options["table_format"] == "delta"
    code, stdout, stderr = lensflow(monkeypatch, capsys, "table", "history", tmp_path, "scores",
                                    "--run-date", DAY)
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("v3 ") and "run night-2 run_date=" \
        f"{DAY} m/v1 bundle sha256:abababababab" in lines[0] and "3 rows in 1 files" in lines[0]
    code, _, stderr = lensflow(monkeypatch, capsys, "table", "history", tmp_path, "nothing")
    assert code == 2
    assert_one_line(stderr, f"{tmp_path / 'nothing'}: not a Delta table")


def test_vacuum_waits_out_the_grace_then_deletes_dead_and_replaced_files(
        tmp_path, monkeypatch, capsys):
    commit_partition(_fill(tmp_path, 0, 4, run_id="night-1"))
    dead = _fill(tmp_path, 100, 2, run_id="killed")  # never committed: a run that died
    young = _fill(tmp_path, 200, 2, run_id="still-running")
    commit_partition(_fill(tmp_path, 10, 2, run_id="night-2"))
    assert vacuum(tmp_path, "scores") == []  # everything is younger than the week of grace
    week_ago = time.time() - 8 * 24 * 3600
    for part in dead.temp_dir.iterdir():
        os.utime(part, (week_ago, week_ago))
    gone = vacuum(tmp_path, "scores")
    assert [p.rsplit("/", 2)[-2] for p in gone] == ["killed"]
    assert not any(dead.temp_dir.iterdir()) and any(young.temp_dir.iterdir())
    assert _users(tmp_path) == [10, 11] and _users(tmp_path, version=1) == [0, 1, 2, 3]

    code, _, stderr = lensflow(monkeypatch, capsys, "table", "vacuum", tmp_path, "scores",
                               "--retention-hours", "1")
    assert code == 2
    assert_one_line(stderr, "retention 1 h is under the 6 h a live run may take to commit")
    code, stdout, stderr = lensflow(monkeypatch, capsys, "table", "vacuum", tmp_path, "scores",
                                    "--retention-hours", "0", "--no-live-runs")
    assert code == 0, stderr
    assert stdout.strip() == "deleted 2 files"  # night-1's replaced part, the live run's part
    assert _users(tmp_path) == [10, 11]
    assert not any(young.temp_dir.iterdir())


def test_optimize_compacts_a_date_without_changing_a_row_or_the_run_record(tmp_path, monkeypatch,
                                                                           capsys):
    pending = _fill(tmp_path, 0, 40, run_id="many-parts", rows_per_file=4)
    plan = RunPlan(jobs=(ShardJob(0, "bundle", "ab" * 32),), pendings=(pending,), to_score=40,
                   model="m/v1", started_at=time.time())
    commit_run(plan, [ShardResult(0, 40, 40, 0, {"scores": 40}, 0.1, "onnx/cpu", "here")])
    assert len(DeltaTable(str(tmp_path / "scores")).file_uris()) == 10
    code, stdout, stderr = lensflow(monkeypatch, capsys, "table", "optimize", tmp_path, "scores",
                                    "--run-date", DAY)
    assert code == 0, stderr
    assert stdout.strip() == "compacted 10 files into 1"
    table = DeltaTable(str(tmp_path / "scores"))
    assert len(table.file_uris()) == 1 and _users(tmp_path) == list(range(40))
    assert table.history(1)[0]["operation"] == "OPTIMIZE"
    assert current_run(tmp_path, DAY, ["scores"])["run_id"] == "many-parts"
    assert any(p.name.endswith(".checkpoint.parquet")
               for p in (tmp_path / "scores" / "_delta_log").iterdir())
    assert optimize(tmp_path, "scores")["numFilesAdded"] == 0  # nothing left to compact


def test_runs_write_a_checkpoint_every_few_commits(tmp_path):
    for i in range(CHECKPOINT_INTERVAL):
        commit_partition(_fill(tmp_path, i, 1, day=date(2026, 1, i + 1)))
    log = tmp_path / "scores" / "_delta_log"
    assert len(list(log.glob("*.checkpoint.parquet"))) == 1  # delta-rs: at (version + 1) % 10
    assert DeltaTable(str(tmp_path / "scores")).to_pyarrow_table().num_rows == CHECKPOINT_INTERVAL
