"""Run health on real images: planted shifts in the ants/bees validation folder are flagged by
the measure they should be, ``on_drift: fail`` leaves downstream's partition as it was, and
nights without a shift pass."""

from __future__ import annotations

import json
import shutil
from datetime import date
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image
from tiny_image_bundle import make_image_bundle

from scoring.image_scoring import score_image_folder
from scoring.run_health.gate import DriftRefusedError
from scoring.run_health.table import HEALTH_TABLE

DAY1, DAY2, DAY3 = date(2026, 11, 1), date(2026, 11, 2), date(2026, 11, 3)


@pytest.fixture(scope="module")
def val(shared_data_dir) -> Path:
    return shared_data_dir / "hymenoptera_data" / "val"


@pytest.fixture(scope="module")
def shared_data_dir():
    from paths import SHARED_DATA

    if not (SHARED_DATA / "hymenoptera_data" / "val").is_dir():
        pytest.skip(f"shared data absent: {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    registry = tmp_path_factory.mktemp("registry")
    make_image_bundle(registry, classes=("ants", "bees"), name="tiny")
    return registry / "tiny"


def copy_with(val: Path, into: Path, change=None, every: int = 1) -> Path:
    """The folder's images, every ``every``-th one passed through ``change(image)``."""
    for i, src in enumerate(sorted(val.rglob("*.jpg"))):
        dst = into / src.relative_to(val)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if change is not None and i % every == 0:
            with Image.open(src) as im:
                change(im.convert("RGB")).save(dst, quality=90)
        else:
            shutil.copy(src, dst)
    return into


def constant_colour(im: Image.Image) -> Image.Image:
    return Image.new("RGB", im.size, (40, 90, 160))


def thumbnail(im: Image.Image) -> Image.Image:
    im.thumbnail((32, 32))
    return im


def score(folder, model, out, day, **options):
    return score_image_folder(folder, model, out, run_date=day, workers=0, **options)


def flagged(summary) -> set[str]:
    return {d["measure"] for d in summary.health["drift"] if d["flagged"]}


def read_partition(out: Path, day: date) -> list[tuple]:
    """What downstream sees, read as downstream does (DuckDB, Hive partitions)."""
    glob = str(out / "image_predictions" / "*" / "*.parquet")
    return duckdb.sql(f"SELECT path, pred_label, pred_score, run_date FROM read_parquet("
                      f"'{glob}', hive_partitioning = true) WHERE run_date = '{day}' "
                      f"ORDER BY path").fetchall()


def test_a_constant_colour_night_is_refused_and_downstream_keeps_the_previous_partition(
        val, model, tmp_path):
    out = tmp_path / "out"
    first = score(val, model, out, DAY1, on_drift="fail")
    assert first.health["decision"] == "no_baseline"
    second = score(val, model, out, DAY2, on_drift="fail")
    assert second.health["decision"] == "ok" and not flagged(second)
    before = read_partition(out, DAY2)
    assert len(before) == 153

    black = copy_with(val, tmp_path / "constant", constant_colour)
    with pytest.raises(DriftRefusedError) as refused:
        score(black, model, out, DAY2, on_drift="fail")
    message = str(refused.value)
    assert "\n" not in message and "not committed" in message
    assert "inputs.content" in message and "near_constant 100% vs 0%" in message
    assert read_partition(out, DAY2) == before
    assert not list((out / "_staging" / "image_predictions").glob("run_date=*/*"))
    health = refused.value.health
    assert {d.measure for d in health.flagged} >= {"inputs.content", "inputs.brightness"}

    # The refused run is in run_health, beside the committed ones; no run record names it.
    rows = duckdb.sql(
        f"SELECT run_id, decision, measure, flagged FROM read_parquet("
        f"'{out / HEALTH_TABLE}/*/*.parquet', hive_partitioning = true) "
        f"WHERE run_date = '{DAY2}' AND kind = 'run'").fetchall()
    assert sorted(r[1] for r in rows) == ["ok", "refused"]
    refused_id = next(r[0] for r in rows if r[1] == "refused")
    assert not (out / "_runs" / f"{refused_id}.json").exists()

    accepted = score(black, model, out, DAY2, on_drift="fail", accept_drift=True)
    assert accepted.health["decision"] == "accepted"
    assert read_partition(out, DAY2) != before
    record = json.loads((out / "_runs" / f"{accepted.run_id}.json").read_text())
    assert record["health"]["decision"] == "accepted"
    assert "inputs.content" in {d["measure"] for d in record["health"]["drift"] if d["flagged"]}


def test_half_the_folder_as_thumbnails_is_flagged_by_size_not_content(val, model, tmp_path):
    out = tmp_path / "out"
    score(val, model, out, DAY1)
    thumbs = copy_with(val, tmp_path / "thumbs", thumbnail, every=2)
    night = score(thumbs, model, out, DAY2)  # on_drift: warn (the default) commits, marked
    assert night.health["decision"] == "warned"
    assert {"inputs.megapixels", "inputs.file_kib"} <= flagged(night)
    assert "inputs.content" not in flagged(night)
    assert "run health: warned" in night.health_line()
    assert len(read_partition(out, DAY2)) == 153


def test_a_new_version_with_its_classes_swapped_is_flagged_by_the_label_shares(
        val, tmp_path):
    registry = tmp_path / "registry"
    make_image_bundle(registry, classes=("ants", "bees"), name="tiny")
    out = tmp_path / "out"
    first = score(val, registry / "tiny", out, DAY1)
    make_image_bundle(registry, classes=("bees", "ants"), name="tiny")  # same weights, swapped
    night = score(val, registry / "tiny", out, DAY2)
    assert night.model != first.model  # a new version, judged against its predecessor's runs
    assert flagged(night) == {"predictions.top1_label"}


def test_disjoint_random_halves_and_a_rescore_are_not_flagged(val, model, tmp_path):
    files = sorted(val.rglob("*.jpg"))
    order = np.random.default_rng(7).permutation(len(files))
    for half, picks in (("a", order[: len(files) // 2]), ("b", order[len(files) // 2:])):
        for i in picks:
            dst = tmp_path / half / files[i].relative_to(val)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(files[i], dst)
    out = tmp_path / "out"
    score(tmp_path / "a", model, out, DAY1, on_drift="fail")
    second = score(tmp_path / "b", model, out, DAY2, on_drift="fail")
    assert second.health["decision"] == "ok", second.health_line()
    rescored = score(tmp_path / "b", model, out, DAY2, on_drift="fail")
    assert rescored.health["decision"] == "ok"
    assert max(d["psi"] for d in rescored.health["drift"]) < 0.25


def test_run_health_off_profiles_nothing_and_records_no_health(val, model, tmp_path):
    summary = score(val, model, tmp_path / "out", DAY1, on_drift="off")
    assert summary.health is None and summary.health_line() == ""
    record = json.loads((tmp_path / "out" / "_runs" / f"{summary.run_id}.json").read_text())
    assert "health" not in record
    assert not (tmp_path / "out" / HEALTH_TABLE).exists()


def test_a_run_health_partition_held_by_another_run_never_fails_a_committed_run(
        val, model, tmp_path, monkeypatch, caplog):
    from scoring.partition import abort_partition, open_partition
    from scoring.run_health import table
    from scoring.run_health.table import RUN_HEALTH_SCHEMA

    out = tmp_path / "out"
    monkeypatch.setattr(table, "LOCK_WAIT_S", 0.2)
    held = open_partition(out, HEALTH_TABLE, DAY1, RUN_HEALTH_SCHEMA,
                          {"model_name": "other", "model_version": "1", "bundle_sha256": "0"},
                          run_id="another-tables-run")
    try:
        summary = score(val, model, out, DAY1)
    finally:
        abort_partition(held)
    assert len(read_partition(out, DAY1)) == 153
    record = json.loads((out / "_runs" / f"{summary.run_id}.json").read_text())
    assert record["health"]["decision"] == "no_baseline"  # the next run's baseline is intact
    assert "run_health rows were not written" in caplog.text
    assert "being written by run another-tables-run" in caplog.text
