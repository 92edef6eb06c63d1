"""The ``delta`` table format on object storage (the loopback S3 server, conditional PUTs): the
default for an ``s3://`` out, one commit per table and run, a rerun and time travel, and scoring
runs — from the CLI too — read back by DuckDB's ``delta_scan``, Polars and deltalake with the
rows of the same run written as ``parquet`` on local disk."""

from __future__ import annotations

from datetime import date

import fsspec
import pyarrow.dataset as ds
import pytest
from cli_runs import lensflow
from deltalake import DeltaTable
from flow_test_data import make_images
from scores_table import DAY, OTHER_DAY, string_id_recommender, write_users
from test_delta import DUCKDB_READ, duckdb_delta  # noqa: F401 — one DuckDB reader for both
from tiny_image_bundle import make_image_bundle

from export import bundle_remote
from scoring.delta_table import storage_options
from scoring.options import ImageScoreOptions
from scoring.partition import read_partition
from scoring.shards import current_run


def _write(out: str, start: int, n: int, run_id: str, day: date = DAY):
    return write_users(out, start, n, ImageScoreOptions(), day, shards=2, rows_per_file=2,
                       run_id=run_id)


def _table(uri: str, version: int | None = None) -> DeltaTable:
    return DeltaTable(uri, version=version, storage_options=storage_options(uri))


def test_an_s3_out_is_a_delta_table_by_default_one_commit_per_run(s3_bucket):
    out = f"{s3_bucket}/out"
    pending, first = _write(out, 0, 3, "night-1")
    assert pending.table_format == "delta"
    uri = f"{out}/scores"
    assert (first.path, first.files, first.rows, first.version) == (uri, 4, 6, 1)
    _write(out, 100, 1, "other", day=OTHER_DAY)
    _, rerun = _write(out, 50, 1, "night-2")
    table = _table(uri)
    assert table.version() == rerun.version == 3
    day_rows = table.to_pyarrow_table(filters=[("run_date", "=", DAY)])
    assert sorted(day_rows["user"].to_pylist()) == [50, 51]
    assert read_partition(out, "scores", DAY)["user"].to_pylist() == [50, 51]
    before = _table(uri, version=2).to_pyarrow_table(filters=[("run_date", "=", DAY)])
    assert sorted(before["user"].to_pylist()) == list(range(6))
    assert [h.get("lensflow.run_id") for h in table.history()] == [
        "night-2", "other", "night-1", None]
    # Nothing beside the table: no commit records, no staging.
    fs = fsspec.filesystem("s3")
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(uri)) == [
        "_delta_log", f"run_date={DAY}", f"run_date={OTHER_DAY}"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(bundle_remote.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture
def photos(s3_bucket, cache, tmp_path):
    local = make_images(tmp_path / "photos" / "day1", 9, size=36)
    (local / "broken.jpg").write_bytes(b"not a jpeg")
    fsspec.filesystem("s3").put(str(tmp_path / "photos"), f"{s3_bucket}/photos", recursive=True)
    model = make_image_bundle(f"{s3_bucket}/registry")
    return {"bucket": s3_bucket, "local": tmp_path / "photos", "model": model}


def test_an_s3_scoring_run_reads_back_in_duckdb_polars_and_deltalake_as_the_parquet_run(
        photos, tmp_path, monkeypatch, capsys):
    bucket = photos["bucket"]
    out = f"{bucket}/scores"
    code, stdout, stderr = lensflow(
        monkeypatch, capsys, "score", "images", f"{bucket}/photos", "--model",
        f"{bucket}/registry/tiny", "--out", out, "--run-date", DAY, "--workers", "0",
        "--shards", "2", "--batch-size", "4", "--table-format", "delta")
    assert code == 0, stderr
    uri = f"{out}/image_predictions"
    assert "scored 9 of 10 images (1 failed" in stdout and f"-> {uri}" in stdout

    from scoring.image_scoring import score_image_folder

    score_image_folder(photos["local"], photos["model"], tmp_path / "out", run_date=DAY,
                       workers=0, shards=2, batch_size=4)
    columns = ["path", "file_size", "pred_label", "pred_score", "topk_labels", "topk_scores",
               "model_version", "bundle_sha256"]
    on_disk = ds.dataset(tmp_path / "out" / "image_predictions", partitioning="hive").to_table(
        columns=columns).sort_by("path").to_pylist()
    on_s3 = _table(uri).to_pyarrow_table(columns=columns).sort_by("path").to_pylist()
    assert on_s3 == on_disk and len(on_s3) == 10

    import polars as pl

    frame = pl.read_delta(uri, storage_options=storage_options(uri))
    assert sorted(frame["path"].to_list()) == [r["path"] for r in on_disk]
    assert duckdb_delta(uri, "SELECT count(*), count(error) FROM {t}") == [(10, 1)]
    record = current_run(out, DAY, ["image_predictions"])
    assert record["partitions"]["image_predictions"]["version"] == 1


@pytest.mark.slow  # exports a recommender (ONNX, TorchScript, parity)
def test_a_recommendation_run_on_s3_is_one_commit_per_table_tied_by_its_run_record(
        s3_bucket, cache, tmp_path):
    from scoring.recommendations import FULL_TABLE, TOPK_TABLE, score_recommendations

    bundle = string_id_recommender(f"{s3_bucket}/registry")
    options = {"top_k": 3, "full_table": True, "shards": 2, "run_date": DAY}
    out = f"{s3_bucket}/recs"
    first = score_recommendations(bundle, out, **options)
    here = score_recommendations(bundle, tmp_path / "out", **options)
    for table in (TOPK_TABLE, FULL_TABLE):
        assert read_partition(out, table, DAY).to_pylist() == read_partition(
            tmp_path / "out", table, DAY).to_pylist()
        assert _table(f"{out}/{table}").history(1)[0]["lensflow.run_id"] == first.run_id
    assert current_run(out, DAY, [TOPK_TABLE, FULL_TABLE])["run_id"] == first.run_id
    assert here.full_rows == first.full_rows > 0
    second = score_recommendations(bundle, out, **options)
    assert current_run(out, DAY, [TOPK_TABLE, FULL_TABLE])["run_id"] == second.run_id
    assert duckdb_delta(f"{out}/{FULL_TABLE}", "SELECT count(*) FROM {t}") == [
        (first.full_rows,)]
