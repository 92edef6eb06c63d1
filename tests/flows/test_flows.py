"""Flows called directly against a temporary Prefect API (``prefect_test_harness``).

Small generated images and a 32 px bundle: what a user would check after a run — the state and
its message, the committed partition, the artifacts — without a worker.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml
from flow_test_data import (
    artifacts_by_key,
    make_images,
    partition_rows_and_run_ids,
)
from paths import REPO
from prefect.exceptions import ParameterTypeError
from prefect.states import Failed
from tiny_image_bundle import make_image_bundle

from export.bundle import current_version
from flows.cache_keys import dataset_fingerprint
from flows.deploy_settings import deploy_settings
from flows.failures import retry_on_storage_error
from flows.prefect_flows import FLOWS
from flows.run_date import date_in_timezone
from flows.score_flows import (
    nightly_flow,
    score_image_folder_flow,
    score_recommendations_flow,
)
from scoring.errors import ScoringError
from scoring.partition import partition_dir


@pytest.fixture
def bundle_registry(tmp_path):
    registry = tmp_path / "registry"
    make_image_bundle(registry, name="tiny")
    return registry


def test_score_image_folder_commits_partition_and_publishes_artifacts(
        tmp_path, bundle_registry, client):
    images = make_images(tmp_path / "images", 5)
    out = tmp_path / "out"
    # Decoding workers inside a flow run, as in a deployment. (Whether a forked worker inherits
    # a failing Prefect exit hook depends on which services ran before; test_image_scoring
    # plants one on purpose.)
    state = score_image_folder_flow(str(images), str(bundle_registry / "tiny"), str(out),
                                    run_date=date(2026, 11, 22), batch_size=2, workers=2,
                                    return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()

    partition = partition_dir(out, "image_predictions", date(2026, 11, 22))
    assert (partition / "_SUCCESS").is_file()
    rows, run_ids = partition_rows_and_run_ids(partition)
    assert rows == 5 and summary["scored"] == 5
    assert run_ids == {str(state.state_details.flow_run_id)}

    artifacts = artifacts_by_key(client, state.state_details.flow_run_id)
    assert str(partition) in artifacts["score-image-folder-summary"].data
    assert float(artifacts["score-image-folder-progress"].data) == pytest.approx(100.0)


def test_run_date_defaults_to_the_scheduled_day_in_the_configured_timezone(
        tmp_path, bundle_registry, prefect_api, monkeypatch):
    # UTC+14: its calendar day differs from UTC's for ten hours of every day.
    monkeypatch.setenv("LENSFLOW_TIMEZONE", "Pacific/Kiritimati")
    images = make_images(tmp_path / "images", 2)
    out = tmp_path / "out"
    state = score_image_folder_flow(str(images), str(bundle_registry / "tiny"), str(out),
                                    workers=0, return_state=True)
    assert state.is_completed(), state.message
    expected = datetime.now(ZoneInfo("Pacific/Kiritimati")).date()
    assert [p.name for p in (out / "image_predictions").iterdir()] == [f"run_date={expected}"]


def test_date_in_timezone_takes_the_local_calendar_day():
    instant = datetime(2026, 11, 22, 23, 30, tzinfo=timezone.utc)
    assert date_in_timezone(instant, "Europe/Berlin") == date(2026, 11, 23)
    assert date_in_timezone(instant, "America/New_York") == date(2026, 11, 22)


def test_missing_folder_fails_fast_with_its_message(tmp_path, bundle_registry, prefect_api):
    out = tmp_path / "out"
    state = score_image_folder_flow(str(tmp_path / "nope"), str(bundle_registry / "tiny"),
                                    str(out), return_state=True)
    assert state.is_failed()
    assert state.message == f"folder {tmp_path / 'nope'}: no such directory"
    assert not out.exists()


def test_unpromoted_model_fails_naming_the_model(tmp_path, prefect_api):
    make_image_bundle(tmp_path / "registry", name="draft", promoted=False)
    images = make_images(tmp_path / "images", 1)
    state = score_image_folder_flow(str(images), str(tmp_path / "registry" / "draft"),
                                    str(tmp_path / "out"), return_state=True)
    assert state.is_failed()
    assert "draft" in state.message and "promote" in state.message


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"runtime": "tensorflow"},
                                 {"run_date": "22/11/2026"}, {"device": "tpu"}])
def test_bad_parameters_fail_before_any_work(tmp_path, bundle_registry, prefect_api, bad):
    images = make_images(tmp_path / "images", 1)
    out = tmp_path / "out"
    with pytest.raises(ParameterTypeError, match=next(iter(bad))):
        score_image_folder_flow(str(images), str(bundle_registry / "tiny"), str(out), **bad)
    assert not out.exists()


def test_nightly_runs_every_job_and_fails_naming_the_broken_one(
        tmp_path, bundle_registry, prefect_api):
    good = make_images(tmp_path / "good", 3)
    jobs = [{"folder": str(tmp_path / "missing"), "model": str(bundle_registry / "tiny"),
             "out": str(tmp_path / "out-missing")},
            {"folder": str(good), "model": str(bundle_registry / "tiny")}]
    state = nightly_flow(str(tmp_path / "out"), image_jobs=jobs, run_date=date(2026, 1, 2),
                         return_state=True)
    assert state.is_failed()
    assert state.message.startswith("1 of 2 nightly jobs failed")
    assert str(tmp_path / "missing") in state.message
    partition = partition_dir(tmp_path / "out", "image_predictions", date(2026, 1, 2))
    assert partition_rows_and_run_ids(partition)[0] == 3


def test_nightly_refuses_two_jobs_writing_one_partition(tmp_path, bundle_registry, prefect_api):
    job = {"folder": str(make_images(tmp_path / "a", 1)), "model": str(bundle_registry / "tiny")}
    state = nightly_flow(str(tmp_path / "out"), image_jobs=[job, job], return_state=True)
    assert state.is_failed()
    assert "image_jobs[1] and image_jobs[0]" in state.message
    assert not (tmp_path / "out").exists()


def test_dataset_fingerprint_follows_names_sizes_and_mtimes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"1234")
    first = dataset_fingerprint(tmp_path)
    assert dataset_fingerprint(tmp_path) == first
    (tmp_path / "a" / "y.png").write_bytes(b"")
    second = dataset_fingerprint(tmp_path)
    assert second != first
    (tmp_path / "a" / "x.png").write_bytes(b"12345")
    assert dataset_fingerprint(tmp_path) not in (first, second)


def test_only_storage_errors_are_retried():
    assert retry_on_storage_error(None, None, Failed(data=OSError("stale NFS handle")))
    assert not retry_on_storage_error(None, None, Failed(data=ScoringError("bad folder")))
    assert not retry_on_storage_error(None, None, Failed(data=ValueError("bug")))


def test_deploy_settings_are_absolute_and_reject_unknown_timezones(tmp_path):
    settings = deploy_settings({"LENSFLOW_HOME": str(tmp_path), "LENSFLOW_OUT": "nightly-out"},
                               cwd=Path("/"))
    assert settings.out == str(tmp_path / "nightly-out")
    assert settings.registry == str(tmp_path / "runs" / "registry")
    assert settings.timezone == "UTC"
    with pytest.raises(ValueError, match="LENSFLOW_TIMEZONE"):
        deploy_settings({"LENSFLOW_TIMEZONE": "Mars/Olympus"}, cwd=tmp_path)


def test_serve_builds_the_deployments_of_prefect_yaml(monkeypatch, tmp_path):
    from flows.serve import build_deployments

    monkeypatch.setenv("LENSFLOW_REGISTRY", str(tmp_path / "reg"))
    monkeypatch.setenv("LENSFLOW_TIMEZONE", "Europe/Berlin")
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {(d.flow_name, d.name): d for d in build_deployments()}
    assert len(deployments) == len(spec["deployments"])
    for entry in spec["deployments"]:
        assert entry["work_pool"]["name"] == "lensflow-process"
    nightly = deployments[("nightly", "nightly")]
    assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == \
        [("0 2 * * *", "Europe/Berlin")]
    assert nightly.parameters["rec_jobs"][0]["model"] == str(tmp_path / "reg" / "recommender")
    score = deployments[("score-image-folder", "on-demand")]
    assert score.parameters["model"] == str(tmp_path / "reg" / "image-classifier")
    # Deployment defaults pass each flow's own validation once the per-run inputs are given.
    per_run = {"score-image-folder": {"folder": "x"}, "train-image-model": {"data": "x"},
               "train-recommender": {"data": "x"},
               "train-multilabel-model": {"data": "x", "csv": "x.csv"},
               "train-regression-model": {"data": "x", "csv": "x.csv"},
               "import-model": {"checkpoint": "x.pt", "arch": "resnet18"}}
    for (flow_name, _), deployment in deployments.items():
        FLOWS[flow_name].validate_parameters(
            {**per_run.get(flow_name, {}), **deployment.parameters})


def test_plots_are_embedded_byte_for_byte(tmp_path):
    import base64

    from PIL import Image

    from flows.artifacts import plots_markdown

    Image.new("RGB", (3, 2), "blue").save(tmp_path / "lr_find.png")
    text = plots_markdown({"lr_find": tmp_path / "lr_find.png", "gone": tmp_path / "x.png"})
    encoded = re.search(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", text).group(1)
    assert base64.b64decode(encoded) == (tmp_path / "lr_find.png").read_bytes()
    assert "_missing:" in text


@pytest.mark.slow
def test_trained_recommender_is_promoted_then_scored_by_the_nightly_run(tmp_path, client):
    from flows.demo_data import make_planted_ratings
    from flows.train_flows import train_recommender_flow

    ratings = make_planted_ratings(tmp_path / "ml", n_users=60, n_items=40)
    registry = tmp_path / "registry"
    state = train_recommender_flow(str(ratings), str(registry), "movies", factors=8, epochs=1,
                                   bs=256, train_dir=str(tmp_path / "train"), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    current = current_version(registry, "movies")
    assert result["bundle"] == str(registry / "movies" / current)
    artifacts = artifacts_by_key(client, state.state_details.flow_run_id)
    assert "### lr_find\n\n![lr_find](data:image/png;base64," in \
        artifacts["train-recommender-plots"].data
    assert artifacts["train-recommender-parity"].data.strip()
    assert float(artifacts["train-recommender-progress"].data) == pytest.approx(100.0)

    out = tmp_path / "out"
    nightly = nightly_flow(str(out), rec_jobs=[{"model": str(registry / "movies"), "top_k": 3,
                                                "full_table": True}],
                           run_date=date(2026, 3, 4), return_state=True)
    assert nightly.is_completed(), nightly.message
    topk = partition_dir(out, "recommendations_topk", date(2026, 3, 4))
    full = partition_dir(out, "recommendations_full", date(2026, 3, 4))
    topk_rows, topk_runs = partition_rows_and_run_ids(topk)
    assert partition_rows_and_run_ids(full)[0] == 60 * 40  # every user × every item
    assert 0 < topk_rows <= 60 * 3
    # Lineage: the parts name the subflow run that wrote them, which the nightly result lists.
    assert topk_runs == {nightly.result()["jobs"][0]["flow_run_id"]}


def test_an_image_bundle_is_refused_by_recommendation_scoring(tmp_path, bundle_registry,
                                                               prefect_api):
    state = score_recommendations_flow(str(bundle_registry / "tiny"), str(tmp_path / "out"),
                                       return_state=True)
    assert state.is_failed()
    assert "is a 'single_label' bundle, not a recommender" in state.message


def test_the_scoring_flow_refuses_a_failed_parity_bundle_unless_allowed(tmp_path, prefect_api):
    bundle = make_image_bundle(tmp_path / "registry", name="failed", promoted=False,
                               parity_passed=False)
    images = make_images(tmp_path / "images", 2)
    out = tmp_path / "out"
    state = score_image_folder_flow(str(images), str(bundle), str(out), return_state=True)
    assert state.is_failed()
    assert f"failed/{bundle.name}: its parity gate failed" in state.message
    assert "\n" not in state.message and not out.exists()
    state = score_image_folder_flow(str(images), str(bundle), str(out), allow_failed_parity=True,
                                    return_state=True)
    assert state.is_completed(), state.message


def test_the_scoring_flow_refuses_an_unsigned_bundle_where_a_verify_key_is_set(
        tmp_path, bundle_registry, prefect_api, monkeypatch):
    from export.signing import REQUIRE_SIGNED_ENV, VERIFY_KEY_ENV, write_key_pair

    _, public = write_key_pair(tmp_path / "keys")
    monkeypatch.delenv(REQUIRE_SIGNED_ENV, raising=False)
    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    images = make_images(tmp_path / "images", 1)
    state = score_image_folder_flow(str(images), str(bundle_registry / "tiny"),
                                    str(tmp_path / "out"), return_state=True)
    assert state.is_failed()
    assert f"unsigned, and {VERIFY_KEY_ENV} is set" in state.message
    assert "\n" not in state.message and not (tmp_path / "out").exists()
