"""The whole chain on object storage (the loopback S3 server, s3fs over HTTP): export to an
``s3://`` registry, verify and promote it from the CLI, score an ``s3://`` folder to ``s3://``
Parquet from the CLI and from the Prefect flow, and read the table back with DuckDB and pyarrow."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date

import duckdb
import fsspec
import pytest
from flow_test_data import make_images
from tiny_export_models import TinyCNN, image_manifest, trained_like

from export.bundle import current_version, promote
from export.bundle_remote import CACHE_ENV
from export.convert import export_bundle
from scoring.object_commit import open_table, table_parts

DAY, NEXT_DAY = date(2026, 11, 22), date(2026, 11, 23)
pytestmark = pytest.mark.slow  # CLI processes and a Prefect server: minutes on a busy machine


def lensflow(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "flows.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture
def store(s3_bucket, tmp_path, monkeypatch):
    """A bucket holding 7 photos (one broken) and an exported, not yet promoted, bundle."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    photos = make_images(tmp_path / "photos" / "cam1", 6, size=40)
    (photos / "broken.jpg").write_bytes(b"truncated")
    fsspec.filesystem("s3").put(str(tmp_path / "photos"), f"{s3_bucket}/photos", recursive=True)
    torch_model = trained_like(TinyCNN(n_out=4))
    result = export_bundle(torch_model, image_manifest("single_label"), f"{s3_bucket}/registry",
                           "pets", pt2=False)
    return {"bucket": s3_bucket, "bundle": result.bundle_path, "registry": f"{s3_bucket}/registry"}


def _read_back(out: str) -> tuple[int, int]:
    """(rows DuckDB reads from the committed parts, rows of pyarrow's dataset)."""
    con = duckdb.connect()
    con.register_filesystem(fsspec.filesystem("s3"))
    parts = table_parts(out, "image_predictions")
    duck = con.sql(f"SELECT count(*) FROM read_parquet({parts!r})").fetchall()[0][0]
    return duck, open_table(out, "image_predictions").count_rows()


def test_cli_verify_promote_and_score_on_s3_then_duckdb_and_pyarrow_read_it(store):
    bundle, registry = store["bundle"], store["registry"]
    assert bundle.startswith(f"{registry}/pets/")
    verified = lensflow("verify", bundle)
    assert verified.returncode == 0, verified.stderr
    assert "hashes ok, parity passed" in verified.stdout
    promote(bundle)  # `lensflow promote` is this call (each CLI process imports torch: ~30 s)
    assert current_version(registry, "pets") == bundle.rsplit("/", 1)[1]

    out = f"{store['bucket']}/scores"
    scored = lensflow("score", "images", f"{store['bucket']}/photos", "--model",
                      f"{registry}/pets", "--out", out, "--run-date", str(DAY), "--workers", "0")
    assert scored.returncode == 0, scored.stderr
    assert "scored 6 of 7 images (1 failed" in scored.stdout
    assert f"-> {out}/image_predictions" in scored.stdout  # a Delta table: the default on s3
    assert _read_back(out) == (7, 7)


def test_the_prefect_flow_scores_s3_urls_given_as_parameters(store, prefect_api):
    from flows.score_flows import score_image_folder_flow

    promote(store["bundle"])
    out = f"{store['bucket']}/flow-scores"
    state = score_image_folder_flow(f"{store['bucket']}/photos", f"{store['registry']}/pets",
                                    out, run_date=NEXT_DAY, batch_size=3, workers=2, shards=2,
                                    return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert (summary["scored"], summary["failed"]) == (6, 1)
    assert _read_back(out) == (7, 7)
