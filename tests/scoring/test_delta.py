"""The ``delta`` table format on local disk: one Delta commit per table and run with its lineage,
a rerun replacing a date in one commit, time travel, schema refusal, two runs of one date, and a
scored run read back by deltalake, DuckDB, Polars and pyarrow with the rows of a ``parquet`` run."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from deltalake import DeltaTable
from flow_test_data import make_images
from scores_table import DAY, META, OTHER_DAY, SCHEMA, write_users
from tiny_image_bundle import make_image_bundle

from scoring.delta_read import open_dataset
from scoring.errors import PartitionError
from scoring.image_scoring import score_image_folder
from scoring.options import ImageScoreOptions
from scoring.partition import (
    abort_partition,
    commit_delta,
    commit_partition,
    committed_part_files,
    open_partition,
    read_partition,
)
from scoring.shards import current_run

DELTA = ImageScoreOptions(table_format="delta", batch_size=4)

#: The reader a downstream job would run: DuckDB's own Delta extension, no lensflow import.
DUCKDB_READ = """
import json, os, sys, sysconfig, duckdb
con = duckdb.connect()
con.execute("SET extension_directory = ?",
            [os.path.join(sysconfig.get_paths()["purelib"], "duckdb_ext", "extensions")])
con.execute("SET autoinstall_known_extensions = false")
con.execute("LOAD delta")
if sys.argv[1].startswith("s3://"):
    con.execute("LOAD httpfs")
    endpoint = os.environ["AWS_ENDPOINT_URL"].removeprefix("http://")
    con.execute(f"CREATE SECRET (TYPE s3, KEY_ID '{os.environ['AWS_ACCESS_KEY_ID']}', "
                f"SECRET '{os.environ['AWS_SECRET_ACCESS_KEY']}', REGION 'us-east-1', "
                f"ENDPOINT '{endpoint}', URL_STYLE 'path', USE_SSL false)")
print(json.dumps(con.sql(sys.argv[2].format(t=f"delta_scan('{sys.argv[1]}')")).fetchall(),
                 default=str))
"""


def duckdb_delta(uri: str, sql: str) -> list:
    """Rows of ``sql`` (``{t}``: the table) run by DuckDB's delta_scan in a fresh interpreter
    that never imports lensflow."""
    done = subprocess.run([sys.executable, "-c", DUCKDB_READ, uri, sql], capture_output=True,
                          text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    return [tuple(row) for row in json.loads(done.stdout)]


def write_run(out, start: int, n: int, day: date = DAY, shards: int = 1, **kw):
    return write_users(out, start, n, kw.pop("options", DELTA), day, shards, **kw)[1]


def users(out, day: date = DAY, version: int | None = None) -> list[int]:
    t = DeltaTable(str(Path(out) / "scores"), version=version).to_pyarrow_table(
        filters=[("run_date", "=", day)])
    return sorted(t["user"].to_pylist())


def test_one_run_is_one_commit_with_its_lineage_and_a_rerun_replaces_the_date(tmp_path):
    first = write_run(tmp_path, 0, 4, shards=2, run_id="night-1")
    write_run(tmp_path, 100, 2, day=OTHER_DAY, run_id="other-day")
    assert (first.files, first.rows, first.version) == (4, 8, 1)  # version 0: the table
    table = DeltaTable(str(tmp_path / "scores"))
    entry = table.history(1)[0]
    assert (entry["lensflow.run_id"], entry["lensflow.run_date"]) == ("other-day", str(OTHER_DAY))
    assert entry["lensflow.model_version"] == "v1" and entry["lensflow.bundle_sha256"] == META[
        "bundle_sha256"]
    assert json.loads(entry["lensflow.options"])["table_format"] == "delta"

    rerun = write_run(tmp_path, 50, 3, run_id="night-2")
    assert rerun.version == 3
    assert users(tmp_path) == [50, 51, 52]  # replaced whole, in one commit
    assert users(tmp_path, OTHER_DAY) == [100, 101]
    assert users(tmp_path, version=rerun.version - 1) == list(range(8))  # time travel
    log = DeltaTable(str(tmp_path / "scores")).history()
    writes = [h["lensflow.run_id"] for h in log if h["operation"] == "WRITE"]
    assert writes == ["night-2", "other-day", "night-1"]
    assert read_partition(tmp_path, "scores", DAY)["user"].to_pylist() == [50, 51, 52]
    assert [day for day, _ in committed_part_files(tmp_path, "scores")] == [
        f"run_date={DAY}", f"run_date={OTHER_DAY}"]


def test_nothing_of_an_aborted_or_short_run_is_ever_visible(tmp_path):
    write_run(tmp_path, 0, 2, run_id="kept")
    pending = open_partition(tmp_path, "scores", DAY, SCHEMA, META, options=DELTA,
                             run_id="aborted")
    with pending.part_writer(0) as w:
        w.write({"user": [7], "score": [0.5]})
    abort_partition(pending)
    assert not pending.temp_dir.exists()
    short = open_partition(tmp_path, "scores", DAY, SCHEMA, META, options=DELTA, run_id="short")
    with short.part_writer(0) as w:
        w.write({"user": [9], "score": [0.5]})
    with pytest.raises(PartitionError, match="no part from shard"):
        commit_partition(short, expected_shards=[0, 1])
    assert users(tmp_path) == [0, 1]
    assert DeltaTable(str(tmp_path / "scores")).version() == 1


def test_a_stray_part_a_shard_did_not_report_stops_the_commit(tmp_path):
    import shutil

    pending = open_partition(tmp_path, "scores", DAY, SCHEMA, META, options=DELTA)
    with pending.part_writer(0) as w:
        w.write({"user": [1, 2], "score": [0.5, 0.5]})
    shutil.copy(w.files[0], pending.temp_dir / "part-00000-0007.parquet")  # a crash's leftover
    with pytest.raises(PartitionError, match="parts hold 4 rows but the shards wrote 2; not "
                       "committing"):
        commit_delta(pending, [0], expected_rows=w.rows)
    assert not (tmp_path / "scores" / "_delta_log").exists()


def test_a_run_whose_schema_would_change_the_table_is_refused_unless_asked(tmp_path):
    write_run(tmp_path, 0, 2)
    wider = SCHEMA.append(pa.field("note", pa.string()))
    with pytest.raises(PartitionError, match=r"scores: this run's schema would change the table "
                       r"\(column 'note': table absent, run string\).*schema_evolution=true"):
        open_partition(tmp_path, "scores", OTHER_DAY, wider, META, options=DELTA)
    pending = open_partition(tmp_path, "scores", OTHER_DAY, wider, META,
                             options=DELTA.updated(schema_evolution=True))
    with pending.part_writer(0) as w:
        w.write({"user": [5], "score": [1.0], "note": ["new"]})
    commit_partition(pending)
    rows = DeltaTable(str(tmp_path / "scores")).to_pyarrow_table().sort_by("user").to_pylist()
    assert [(r["user"], r["note"]) for r in rows] == [(0, None), (1, None), (5, "new")]


def test_two_runs_of_one_date_planned_together_one_commits_the_other_fails_in_one_line(
        tmp_path):
    write_run(tmp_path, 0, 1, run_id="earlier")
    runs = {}
    for run_id, start in (("first", 10), ("second", 20)):
        runs[run_id] = open_partition(tmp_path, "scores", DAY, SCHEMA, META, options=DELTA,
                                      run_id=run_id)
        with runs[run_id].part_writer(0) as w:
            w.write({"user": [start], "score": [0.0]})
    other = open_partition(tmp_path, "scores", OTHER_DAY, SCHEMA, META, options=DELTA)
    with other.part_writer(0) as w:
        w.write({"user": [30], "score": [0.0]})
    commit_partition(runs["first"])
    commit_partition(other)  # another date's run commits in between: no conflict
    with pytest.raises(PartitionError) as err:
        commit_partition(runs["second"])
    assert str(err.value) == (f"scores run_date={DAY} under {tmp_path} was committed by run first "
                              "(version 2) after run second started; not committing (rerun to "
                              "replace it)")
    assert users(tmp_path) == [10] and users(tmp_path, OTHER_DAY) == [30]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """One folder scored twice with the same bundle: as ``delta`` and as ``parquet``."""
    root = tmp_path_factory.mktemp("delta-scoring")
    folder = make_images(root / "photos" / "day1", 9, size=36)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    model = make_image_bundle(root / "registry")
    runs = {fmt: score_image_folder(root / "photos", model, root / fmt, run_date=DAY,
                                    table_format=fmt, batch_size=4, workers=0, shards=2)
            for fmt in ("delta", "parquet")}
    return root, runs


def test_a_scored_delta_table_reads_back_in_every_engine_as_the_parquet_run(scored):
    root, runs = scored
    uri = str(root / "delta" / "image_predictions")
    assert runs["delta"].partition == uri and (runs["delta"].rows, runs["delta"].failed) == (10, 1)
    columns = ["path", "file_size", "pred_label", "pred_score", "topk_labels", "topk_scores",
               "error", "model_version", "bundle_sha256"]
    parquet = ds.dataset(root / "parquet" / "image_predictions", partitioning="hive").to_table(
        columns=columns).sort_by("path").to_pylist()
    delta = DeltaTable(uri).to_pyarrow_table(columns=columns).sort_by("path").to_pylist()
    assert delta == parquet and len(delta) == 10
    assert open_dataset(root / "delta", "image_predictions").to_table(
        columns=columns).sort_by("path").to_pylist() == parquet

    import polars as pl

    frame = pl.read_delta(uri).sort("path")
    assert frame["path"].to_list() == [r["path"] for r in parquet]
    assert frame["run_date"].unique().to_list() == [DAY]

    got = duckdb_delta(uri, "SELECT count(*), count(error), min(run_date)::VARCHAR FROM {t}")
    assert got == [(10, 1, str(DAY))]
    record = current_run(root / "delta", DAY, ["image_predictions"])
    assert record["run_id"] == runs["delta"].run_id
    assert record["partitions"]["image_predictions"] == {
        "path": "image_predictions", "files": 2, "rows": 10, "format": "delta", "version": 1}


def test_an_incremental_delta_run_skips_what_the_table_already_scored(scored):
    root, runs = scored
    model = root / "registry" / "tiny"
    again = score_image_folder(root / "photos", model, root / "delta", run_date=OTHER_DAY,
                               table_format="delta", incremental=True, workers=0)
    assert (again.scored, again.failed, again.skipped_incremental) == (0, 1, 9)
    rerun = score_image_folder(root / "photos", model, root / "delta", run_date=DAY,
                               table_format="delta", workers=0)
    assert current_run(root / "delta", DAY, ["image_predictions"])["run_id"] == rerun.run_id
