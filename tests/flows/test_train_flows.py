"""Training flows called directly against a temporary Prefect API (``prefect_test_harness``).

The ``test_wiring_*`` tests replace data preparation, training, export and promotion with fakes
(``_fake_training``): they check only the flow's wiring — states, artifacts, that a
``ParityError`` stops promotion, the options object the recipe receives — not that anything
trains, exports or promotes. Tiny real trainings of the CSV-labelled tasks follow (slow).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from flow_test_data import artifacts_by_key, make_tinted_images
from prefect import flow

from export.bundle import load_bundle, resolve_bundle
from training.recipes.options import ImageTrainOptions


def test_prepared_data_is_cached_until_a_file_changes(tmp_path, prefect_api, monkeypatch):
    from flows.cache_keys import result_cache_dir
    from flows.demo_data import make_shapes_dataset
    from flows.train_flows import prepare_image_data_task

    monkeypatch.setenv("LENSFLOW_CACHE_DIR", str(tmp_path / "cache"))
    data = make_shapes_dataset(tmp_path / "shapes", n_train=4, n_valid=2, size=24)

    @flow
    def prepare_twice() -> list:
        prep = prepare_image_data_task.with_options(result_storage=result_cache_dir())
        states = [prep(str(data), None, 0.2, 42, return_state=True) for _ in range(2)]
        (data / "train" / "circle" / "circle_0000.jpg").touch()
        os.utime(data / "train" / "circle" / "circle_0000.jpg", (1, 1))
        states.append(prep(str(data), None, 0.2, 42, return_state=True))
        states.append(prep(str(data), None, 0.3, 42, return_state=True))
        return [s.name for s in states]

    assert prepare_twice() == ["Completed", "Cached", "Completed", "Completed"]
    assert any((tmp_path / "cache").iterdir())



def _fake_training(monkeypatch, tmp_path, export):
    """Replace the plain training/export functions: this checks the flow's wiring, not ML."""
    from PIL import Image

    import training.recipes.image as recipe

    def train(prepared, out_dir, options=None, *, progress=None, **overrides):
        trained_with.append(options)
        plots = Path(out_dir) / "plots"
        plots.mkdir(parents=True)
        (Path(out_dir) / "model.json").write_text(json.dumps({"task": "single_label"}))
        Image.new("RGB", (4, 4), "red").save(plots / "learning_curve.png")
        progress({"event": "epoch_end", "stage": "frozen", "epoch": 0, "lrs": [1e-3],
                  "train_loss": 1.0, "valid_loss": 0.9, "metrics": {"accuracy": 0.5}})
        return recipe.ImageTrainResult(Path(out_dir), {"accuracy": 0.5, "valid_loss": 0.9}, 0,
                                       False, 1.0, {"learning_curve": plots / "learning_curve.png"})

    promoted, trained_with = [], []
    monkeypatch.setattr("training.data.images.prepare_image_data",
                        lambda data, **kw: SimpleNamespace(summary=lambda: f"prepared {data}"))
    monkeypatch.setattr(recipe, "train_image_model", train)
    monkeypatch.setattr(recipe, "export_image_model", export)
    monkeypatch.setattr("flows.train_flows.promote", lambda path: promoted.append(path) or path)
    monkeypatch.setenv("LENSFLOW_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "data").mkdir()
    return promoted, trained_with


def test_wiring_a_parity_error_fails_the_flow_with_its_report_and_no_promote(
        tmp_path, monkeypatch, client):
    from export.errors import ParityError
    from flows.train_flows import train_image_model_flow

    def export(train_out, registry, name, **kw):
        report = SimpleNamespace(to_markdown=lambda: "| onnx | max abs diff 0.3 | FAILED |")
        raise ParityError(f"bundle {registry}/{name}/v1: onnx differs from eager by 0.3",
                          bundle_path=Path(registry) / name / "v1", report=report)

    promoted, _ = _fake_training(monkeypatch, tmp_path, export)
    state = train_image_model_flow(str(tmp_path / "data"), str(tmp_path / "reg"), "pets",
                                   train_dir=str(tmp_path / "train"), return_state=True)
    assert state.is_failed()
    assert state.message == f"bundle {tmp_path}/reg/pets/v1: onnx differs from eager by 0.3"
    assert promoted == []
    artifacts = artifacts_by_key(client, state.state_details.flow_run_id)
    assert "FAILED" in artifacts["train-image-model-parity"].data
    assert "data:image/png;base64," in artifacts["train-image-model-plots"].data
    metrics = json.loads(artifacts["train-image-model-metrics"].data)
    assert {"metric": "accuracy", "value": "0.5"} in metrics


def test_wiring_the_exported_bundle_reaches_promote_and_options_the_recipe(tmp_path, monkeypatch,
                                                                           client):
    from flows.train_flows import train_image_model_flow

    bundle = tmp_path / "reg" / "pets" / "v2"
    report = SimpleNamespace(to_markdown=lambda: "| onnx | PASSED |")
    promoted, trained_with = _fake_training(
        monkeypatch, tmp_path, lambda *a, **kw: SimpleNamespace(bundle_path=bundle,
                                                                parity=report))
    state = train_image_model_flow(str(tmp_path / "data"), str(tmp_path / "reg"), "pets",
                                   train_dir=str(tmp_path / "train"), epochs=1, lr="slide",
                                   freeze_epochs=0, return_state=True)
    assert state.is_completed(), state.message
    assert promoted == [bundle]
    # The flat flow parameters reach the recipe as one validated options object.
    assert trained_with == [ImageTrainOptions(epochs=1, lr="slide", freeze_epochs=0)]
    assert state.result()["bundle"] == str(bundle)



def test_wiring_sgdr_and_tta_parameters_reach_the_recipe_and_the_export(tmp_path, monkeypatch,
                                                                client):
    from export.options import ExportOptions
    from flows.train_flows import train_image_model_flow

    exported_with = []
    bundle = tmp_path / "reg" / "pets" / "v1"

    def export(train_out, registry, name, **kw):
        exported_with.append(kw["options"])
        return SimpleNamespace(bundle_path=bundle,
                               parity=SimpleNamespace(to_markdown=lambda: "| ok |"))

    promoted, trained_with = _fake_training(monkeypatch, tmp_path, export)
    state = train_image_model_flow(str(tmp_path / "data"), str(tmp_path / "reg"), "pets",
                                   train_dir=str(tmp_path / "train"), freeze_epochs=1,
                                   epochs=3, schedule="sgdr", cycle_mult=2, tta=True,
                                   return_state=True)
    assert state.is_completed(), state.message
    assert trained_with == [ImageTrainOptions(freeze_epochs=1, epochs=3, schedule="sgdr",
                                              cycle_mult=2)]
    assert exported_with == [ExportOptions(tta=True)] and promoted == [bundle]


TINY_TRAINING = {"arch": "resnet18", "weights": "none", "size": 32, "bs": 4, "freeze_epochs": 1,
                 "epochs": 1, "lr": 1e-3, "patience": 0}


@pytest.mark.slow
def test_multilabel_flow_trains_tunes_threshold_and_promotes(tmp_path, client):
    from flows.train_csv_flows import train_multilabel_model_flow

    data = make_tinted_images(tmp_path / "tints")
    state = train_multilabel_model_flow(str(data / "img"), str(data / "tints.csv"),
                                        str(tmp_path / "reg"), "tints",
                                        train_dir=str(tmp_path / "train"), return_state=True,
                                        **TINY_TRAINING)
    assert state.is_completed(), state.message
    bundle = load_bundle(resolve_bundle(str(tmp_path / "reg" / "tints")))
    assert bundle.task == "multi_label" and bundle.manifest["classes"] == ["blue", "red"]
    assert bundle.manifest["thresholds"] == state.result()["metrics"]["threshold"]
    keys = set(artifacts_by_key(client, state.state_details.flow_run_id))
    assert {"train-multilabel-model-metrics", "train-image-model-parity"} <= keys


@pytest.mark.slow
def test_regression_flow_trains_value_targets_and_refuses_targets_with_points(tmp_path, client):
    from flows.train_csv_flows import train_regression_model_flow

    data = make_tinted_images(tmp_path / "tints")
    args = (str(data / "img"), str(data / "tints.csv"), str(tmp_path / "reg"), "tint")
    state = train_regression_model_flow(*args, targets="tint", train_dir=str(tmp_path / "t"),
                                        return_state=True, **TINY_TRAINING)
    assert state.is_completed(), state.message
    metrics = state.result()["metrics"]
    assert {"valid_mse", "baseline_mse"} <= metrics.keys()
    assert load_bundle(resolve_bundle(str(tmp_path / "reg" / "tint"))).task == "regression"

    bad = train_regression_model_flow(*args, targets="tint", points="tint,tint",
                                      return_state=True, **TINY_TRAINING)
    assert bad.is_failed()
    assert "points" in bad.message and "Traceback" not in bad.message
