"""``--head-init``: a single-label head starts from a linear probe (toward the pretrained
classifier) by default, says so on the console and in ``history.json`` / ``lineage.json``, and
still exports with parity."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torchvision
from colour_images import colour_folder
from prefect.utilities.callables import parameter_schema
from safetensors.torch import save_file
from typer.testing import CliRunner

from export.bundle import load_bundle, resolve_bundle
from flows.cli import app, main

TINY = ["--arch", "resnet18", "--size", "32", "--bs", "4", "--freeze-epochs", "1",
        "--epochs", "1", "--workers", "0", "--patience", "0"]


def test_head_init_is_a_flow_parameter_and_an_impossible_start_is_one_line(tmp_path,
                                                                           monkeypatch, capsys):
    from flows.train_flows import train_image_model_flow

    schema = parameter_schema(train_image_model_flow).model_dump()
    assert schema["properties"]["head_init"]["default"] == "auto"
    folder = colour_folder(tmp_path / "images")
    monkeypatch.setattr(sys, "argv", ["lensflow", "train", "images", str(folder), *TINY,
                                      "--weights", "none", "--head-init", "classifier",
                                      "--out", str(tmp_path / "train")])
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 2
    assert not (tmp_path / "train").exists()  # refused before writing anything
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the data summary
    assert last.startswith("error: head_init classifier: weights 'none' of resnet18 bring no "
                           "classifier")


@pytest.mark.slow
def test_the_head_starts_from_a_probe_toward_the_weights_files_classifier_with_parity(
        tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.safetensors"
    save_file(torchvision.models.resnet18().state_dict(), weights)  # 1000-class classifier
    folder = colour_folder(tmp_path / "images")
    result = CliRunner().invoke(app, [
        "train", "images", str(folder), *TINY, "--weights", str(weights), "--lr", "auto",
        "--out", str(tmp_path / "train"), "--registry", str(tmp_path / "reg"),
        "--name", "colours"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # the console wraps long lines
    assert "head: a linear probe on the frozen body's features" in said
    history = json.loads((tmp_path / "train" / "history.json").read_text())
    start = history["head_init"]
    assert start["kind"] == "probe" and start["prior"]["source_classes"] == 1000
    assert set(start["cv_loss_by_prior"]) == {"zero", "classifier"}  # both tried, one chosen
    # Chosen on the validation images: more right answers, then the lower loss.
    chosen = min(start["valid_loss_by_prior"], key=lambda k: (
        -start["valid_accuracy_by_prior"][k], start["valid_loss_by_prior"][k]))
    assert f"toward {start['toward']}: the better validation accuracy" in said
    assert set(start["prior"]["top_source_classes"]) == {"blue", "red"}
    assert history["history"][0]["stage"] == "start"  # validated before any training step
    assert history["history"][0]["valid_loss"] == pytest.approx(
        start["valid_loss_by_prior"][chosen], rel=1e-5)
    assert history["lr_choice"]["frozen"]["source"] == "finder"  # sweep on the shared features
    lineage = json.loads((tmp_path / "train" / "lineage.json").read_text())
    assert lineage["head_init"] == start and lineage["options"]["head_init"] == "auto"
    bundle = load_bundle(resolve_bundle(str(tmp_path / "reg" / "colours")))
    assert bundle.manifest["lineage"]["head_init"]["kind"] == "probe"

    again = CliRunner().invoke(app, [
        "train", "images", str(folder), *TINY, "--weights", str(weights), "--lr", "1e-3",
        "--head-init", "classifier", "--out", str(tmp_path / "classifier")],
        catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert "head: started from the pretrained 1000-class classifier" in \
        " ".join(again.output.split())
    kept = json.loads((tmp_path / "classifier" / "history.json").read_text())["head_init"]
    assert kept["kind"] == "classifier" and kept["train_loss"] <= kept["uniform_loss"] + 1e-6
