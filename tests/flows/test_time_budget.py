"""``--time-budget MINUTES``: declared once with the training options, so the CLI and the Prefect
flows take it; a run whose budget is spent stops training, says so, and still writes a usable
training output (the best epoch so far, here the validated head start)."""

from __future__ import annotations

import json

from colour_images import colour_folder
from prefect.utilities.callables import parameter_schema
from typer.testing import CliRunner

from flows.cli import app
from flows.demo_data import make_planted_ratings

TINY = ["--arch", "resnet18", "--size", "32", "--bs", "4", "--workers", "0", "--weights", "none"]


def test_a_spent_budget_trains_no_epoch_and_returns_the_validated_start(tmp_path):
    folder = colour_folder(tmp_path / "images")
    # 0.0001 minutes (6 ms) are spent reading the data: no stage may start.
    result = CliRunner().invoke(app, [
        "train", "images", str(folder), *TINY, "--time-budget", "0.0001",
        "--out", str(tmp_path / "train")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "time budget of 0.006 s: stopped after epoch 0" in said
    history = json.loads((tmp_path / "train" / "history.json").read_text())
    assert [e["stage"] for e in history["history"]] == ["start"]
    assert history["time_budget"]["stopped"] and history["best_epoch"] == 0
    lineage = json.loads((tmp_path / "train" / "lineage.json").read_text())
    assert lineage["options"]["time_budget"] == 0.0001
    assert (tmp_path / "train" / "weights.safetensors").is_file()

    roomy = CliRunner().invoke(app, [
        "train", "images", str(folder), *TINY, "--time-budget", "60", "--epochs", "2",
        "--out", str(tmp_path / "roomy")], catch_exceptions=False)
    assert roomy.exit_code == 0, roomy.output
    history = json.loads((tmp_path / "roomy" / "history.json").read_text())
    assert not history["time_budget"]["stopped"]
    assert [e["stage"] for e in history["history"]][1:] == ["unfrozen"] * 2


def test_the_budget_is_a_flow_parameter_and_bounds_the_recommender_too(tmp_path):
    from flows.train_flows import train_image_model_flow, train_recommender_flow

    for flow_fn in (train_image_model_flow, train_recommender_flow):
        schema = parameter_schema(flow_fn).model_dump()
        assert schema["properties"]["time_budget"]["default"] is None, flow_fn.name
    ratings = make_planted_ratings(tmp_path / "ratings", n_users=40, n_items=50, seed=1)
    # The LR finder alone outlasts 6 ms: the first epoch runs, the rest do not.
    result = CliRunner().invoke(app, [
        "train", "ratings", str(ratings), "--factors", "4", "--epochs", "3",
        "--time-budget", "0.0001", "--out", str(tmp_path / "train")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    history = json.loads((tmp_path / "train" / "history.json").read_text())
    assert len(history["history"]) == 1
    spec = json.loads((tmp_path / "train" / "model.json").read_text())
    assert spec["params"]["time_budget_used"]["stopped_epoch"] == 0
    assert "time budget of 0.006 s: stopped after epoch 0" in " ".join(result.output.split())
