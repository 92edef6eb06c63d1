"""SGDR and TTA as a user reaches them: ``lensflow train --schedule sgdr``, ``lensflow export
--tta`` and the training flows' parameters, all from the one options declaration."""

from __future__ import annotations

import json
import sys

import pytest
import typer
from colour_images import colour_folder
from prefect.utilities.callables import parameter_schema

from export.manifest import TTA_VIEWS
from export.options import ExportOptions
from export.parity import PRECISION_TOLERANCES
from flows.cli import app, main
from training.recipes.options import ImageTrainOptions

EXPORT_FLAGS = {name: f"--{name.replace('_', '-')}" for name in ExportOptions.model_fields}


def _params(*path: str) -> dict:
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return {p.name: p for p in command.params}


def test_export_options_are_flags_of_export_and_of_training_with_a_registry_and_flow_params():
    from flows.train_csv_flows import train_multilabel_model_flow, train_regression_model_flow
    from flows.train_flows import train_image_model_flow

    for path in (("export",), ("train", "images"), ("train", "multilabel"),
                 ("train", "regression")):
        params = _params(*path)
        for name, flag in EXPORT_FLAGS.items():
            default = ExportOptions.model_fields[name].default
            assert flag in params[name].opts and params[name].default == default, path
    for flow in (train_image_model_flow, train_multilabel_model_flow,
                 train_regression_model_flow):
        schema = parameter_schema(flow).model_dump()["properties"]
        for name, field in ExportOptions.model_fields.items():
            assert schema[name]["default"] == field.default, (flow.name, name)
            assert schema[name]["description"] == field.description, (flow.name, name)


def test_export_flags_reach_the_exporter_as_one_options_model(monkeypatch, tmp_path):
    import training.recipes.publish as publish

    seen = []

    def record(train_out, registry, name, options=None):
        seen.append(options)
        raise SystemExit(0)

    monkeypatch.setattr(publish, "export_training_output", record)
    monkeypatch.setattr(sys, "argv", ["lensflow", "export", str(tmp_path / "train"),
                                      "--registry", str(tmp_path / "reg"), "--name", "pets",
                                      "--aoti", "--precision", "fp16"])
    with pytest.raises(SystemExit):
        main()
    assert seen == [ExportOptions(aoti=True, tta=False, precision="fp16")]


def test_a_precision_lensflow_has_no_graph_for_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["lensflow", "export", str(tmp_path / "train"),
                                      "--registry", str(tmp_path / "reg"), "--name", "pets",
                                      "--precision", "bf16"])
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "bf16" in err and "fp16" in err and "Traceback" not in err


def test_an_sgdr_run_that_ends_mid_cycle_is_one_line_before_any_work(monkeypatch, capsys,
                                                                     tmp_path):
    monkeypatch.setattr(sys, "argv", ["lensflow", "train", "images", str(tmp_path / "missing"),
                                      "--schedule", "sgdr", "--epochs", "5", "--cycle-mult",
                                      "2"])
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: schedule=sgdr: 5 epochs end mid-cycle with cycle_len=1, "
                   "cycle_mult=2: a stage must end a cycle (1, 3, 7 epochs do)")


@pytest.mark.slow
def test_sgdr_training_reports_tta_metrics_and_exports_a_tta_bundle(tmp_path, monkeypatch):
    from training.data.images import from_folder
    from training.recipes.image import train_image_model

    data = from_folder(colour_folder(tmp_path / "images"), valid_pct=0.25, seed=0)
    options = ImageTrainOptions(arch="resnet18", weights="none", size=32,
                                bs=4, freeze_epochs=0, epochs=3, lr=1e-3, workers=0,
                                schedule="sgdr", cycle_mult=2)
    result = train_image_model(data, tmp_path / "train", options)
    metrics = json.loads((result.out_dir / "metrics.json").read_text())
    assert metrics["tta"]["views"] == list(TTA_VIEWS)
    assert {"valid_loss", "accuracy", "error_rate"} <= metrics["tta"].keys()
    assert metrics["tta"]["accuracy"] == pytest.approx(1 - metrics["tta"]["error_rate"])
    history = json.loads((result.out_dir / "history.json").read_text())
    assert history["schedule"]["schedule"] == "sgdr"
    assert history["history"][0]["stage"] == "start"  # the probe start, validated as epoch 0
    assert [(c["stage"], c["first_epoch"], c["last_epoch"]) for c in history["cycles"]] == [
        ("unfrozen", 1, 1), ("unfrozen", 2, 3)]
    assert (result.out_dir / "plots" / "lr_schedule.png").is_file()

    monkeypatch.setattr(sys, "argv", ["lensflow", "export", str(result.out_dir), "--registry",
                                      str(tmp_path / "reg"), "--name", "colours", "--tta"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0
    (bundle,) = [p for p in (tmp_path / "reg" / "colours").iterdir() if p.is_dir()]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["tta"] == {"views": list(TTA_VIEWS)}
    assert manifest["metrics"]["tta"]["accuracy"] == metrics["tta"]["accuracy"]
    assert json.loads((bundle / "parity.json").read_text())["passed"] is True

    # The same training output as an fp16 bundle: gated at fp16's tolerance, recorded as such.
    monkeypatch.setattr(sys, "argv", ["lensflow", "export", str(result.out_dir), "--registry",
                                      str(tmp_path / "reg"), "--name", "half", "--precision",
                                      "fp16"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0
    (half,) = [p for p in (tmp_path / "reg" / "half").iterdir() if p.is_dir()]
    manifest = json.loads((half / "manifest.json").read_text())
    assert manifest["precision"] == "fp16" and manifest["tta"] is None
    parity = json.loads((half / "parity.json").read_text())
    assert parity["passed"] is True
    assert parity["tolerances"] == PRECISION_TOLERANCES["fp16"].to_dict()
