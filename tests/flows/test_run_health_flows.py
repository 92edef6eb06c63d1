"""Run health where people look: ``lensflow score`` and ``lensflow report`` in a terminal, the
flow's markdown artifact and its one-line failure, and a 2-worker Dask run whose profile equals
the in-process run's exactly."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest
from cli_runs import assert_one_line, lensflow
from dask_cluster_runs import two_worker_cluster
from flow_test_data import artifacts_by_key, make_images
from PIL import Image
from tiny_image_bundle import make_image_bundle

from scoring.image_scoring import score_image_folder
from scoring.run_health.profile import RunProfile

DAY1, DAY2 = date(2026, 11, 1), date(2026, 11, 2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("health")
    images = make_images(root / "images", 40, size=48)
    make_images(images / "more", 24, size=64, seed=1)
    (images / "more" / "broken.jpg").write_bytes(b"not a jpeg")
    constant = root / "constant"
    for src in sorted(images.rglob("*.png")):
        dst = constant / src.relative_to(images)
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 48), (20, 20, 20)).save(dst)
    make_image_bundle(root / "registry", name="tiny")
    return {"images": images, "constant": constant, "model": root / "registry" / "tiny"}


def record_of(out: Path, run_id: str) -> dict:
    return json.loads((out / "_runs" / f"{run_id}.json").read_text())


def test_cli_refuses_a_drifted_night_in_one_line_and_report_prints_the_bars(
        data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    score = ("score", "images", "--model", data["model"], "--out", out, "--workers", "0")
    code, stdout, _ = lensflow(monkeypatch, capsys, *score[:2], data["images"], *score[2:],
                               "--run-date", DAY1, "--on-drift", "fail")
    assert code == 0 and "run health: no baseline yet" in stdout
    code, _, err = lensflow(monkeypatch, capsys, *score[:2], data["constant"], *score[2:],
                            "--run-date", DAY2, "--on-drift", "fail")
    assert code == 2
    assert_one_line(err, "error: image_predictions 2026-11-02", "not committed",
                    "inputs.content", "--accept-drift")
    assert not (out / "image_predictions" / f"run_date={DAY2}").exists()

    code, stdout, _ = lensflow(monkeypatch, capsys, "report", out, "--table",
                               "image_predictions", "--date", DAY2)
    assert code == 0
    assert "refused (fail), against the last 1 run(s); drifted:" in stdout
    assert "inputs.content" in stdout and "near_constant" in stdout and "█" in stdout

    code, stdout, _ = lensflow(monkeypatch, capsys, *score[:2], data["constant"], *score[2:],
                               "--run-date", DAY2, "--on-drift", "fail", "--accept-drift")
    assert code == 0 and "run health: accepted" in stdout
    code, stdout, _ = lensflow(monkeypatch, capsys, "report", out, "--table",
                               "image_predictions", "--date", DAY2, "--all")
    assert code == 0
    assert stdout.index("refused (fail)") < stdout.index("accepted (fail)")
    code, _, err = lensflow(monkeypatch, capsys, "report", out, "--table", "recommendations_topk",
                            "--date", DAY2)
    assert code == 2
    assert_one_line(err, "no run health for table recommendations_topk on 2026-11-02",
                    "(it has image_predictions)")


def test_the_flow_publishes_the_health_artifact_and_fails_a_drifted_night_in_one_line(
        data, tmp_path, prefect_api):
    from prefect.client.orchestration import get_client

    from flows.score_flows import score_image_folder_flow

    out = str(tmp_path / "out")
    first = score_image_folder_flow(str(data["images"]), str(data["model"]), out, run_date=DAY1,
                                    workers=0, on_drift="fail", return_state=True)
    assert first.is_completed(), first.message
    night = score_image_folder_flow(str(data["constant"]), str(data["model"]), out,
                                    run_date=DAY2, workers=0, on_drift="fail", return_state=True)
    assert night.is_failed()
    assert "\n" not in night.message and "not committed" in night.message
    assert "inputs.content" in night.message
    assert not (tmp_path / "out" / "image_predictions" / f"run_date={DAY2}").exists()
    with get_client(sync_client=True) as client:
        ok = artifacts_by_key(client, first.state_details.flow_run_id)
        refused = artifacts_by_key(client, night.state_details.flow_run_id)
    assert "no baseline yet" in ok["score-image-folder-health"].data
    text = refused["score-image-folder-health"].data
    assert "## Run health" in text and "refused (fail)" in text
    assert "near_constant" in text and "baseline" in text and "<< drifted" in text


def test_a_nightly_run_passes_on_drift_to_its_jobs_and_names_the_refused_one(
        data, tmp_path, prefect_api):
    from flows.score_flows import nightly_flow

    out = tmp_path / "out"
    good = [{"folder": str(data["images"]), "model": str(data["model"])}]
    first = nightly_flow(str(out), image_jobs=good, run_date=DAY1, on_drift="fail",
                         return_state=True)
    assert first.is_completed(), first.message
    black = [{"folder": str(data["constant"]), "model": str(data["model"])}]
    night = nightly_flow(str(out), image_jobs=black, run_date=DAY2, on_drift="fail",
                         return_state=True)
    assert night.is_failed()
    assert night.message.startswith("1 of 1 nightly jobs failed: images ")
    assert "not committed" in night.message and "inputs.content" in night.message
    assert not (out / "image_predictions" / f"run_date={DAY2}").exists()


@pytest.mark.slow
def test_a_two_worker_dask_run_profiles_exactly_as_the_in_process_run(data, tmp_path,
                                                                      prefect_api):
    import distributed

    from flows.score_flows import score_image_folder_flow

    single = score_image_folder(data["images"], data["model"], tmp_path / "single",
                                run_date=DAY1, workers=0)
    with two_worker_cluster() as local, distributed.Client(local, set_as_default=False) as client:
        state = score_image_folder_flow(str(data["images"]), str(data["model"]),
                                        str(tmp_path / "dask"), run_date=DAY1, shards=4,
                                        dask_address=local.scheduler_address, return_state=True)
        assert state.is_completed(), state.message
        assert len(client.scheduler_info()["workers"]) == 2
    on_dask = RunProfile.from_dict(
        record_of(tmp_path / "dask", state.result()["run_id"])["health"]["profile"])
    here = RunProfile.from_dict(record_of(tmp_path / "single", single.run_id)["health"]["profile"])
    assert on_dask == here
    assert on_dask.distribution("rows.outcome").as_mapping() == {
        "scored": 64, "UnidentifiedImageError": 1}
