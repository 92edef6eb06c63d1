"""``lensflow import-model``: a state dict trained with plain PyTorch → bundle → nightly Parquet.

The done-when of "bring your own model": the Parquet predictions of ``lensflow score images``
are the model's own eager predictions (top-1 all equal, probabilities within the parity
tolerances). Then the one-line refusals of the usual mistakes, and the other tasks' manifests.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torchvision
from cli_runs import assert_one_line, lensflow
from plain_torch_model import (
    ARCH,
    CLASSES,
    assert_scored_like_eager,
    make_tinted_images,
    train_plain_model,
)
from safetensors.torch import save_file

from export.bundle import current_version, load_bundle
from export.manifest import thresholds_for


@pytest.mark.slow
def test_a_plain_pytorch_model_scores_to_parquet_as_it_predicts_eagerly(tmp_path, monkeypatch,
                                                                        capsys):
    train = tmp_path / "train"
    make_tinted_images(train, 8)
    model = train_plain_model(train)
    checkpoint = tmp_path / "model.pt"
    torch.save(model.state_dict(), checkpoint)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    inbox = make_tinted_images(tmp_path / "inbox", 6, seed=1, by_class=False)

    code, out, err = lensflow(
        monkeypatch, capsys, "import-model", checkpoint, "--arch", f"timm/{ARCH}",
        "--classes", tmp_path / "classes.txt", "--registry", tmp_path / "reg", "--name", "byo",
        "--sample-images", train, "--input-size", 32, "--no-pt2")
    assert code == 0, err
    assert "Parity passed" in out and "promoted:" in out
    bundle = load_bundle(tmp_path / "reg" / "byo" / current_version(tmp_path / "reg", "byo"))
    manifest = bundle.manifest
    assert manifest["classes"] == list(CLASSES)
    # The architecture's own recipe at 32 px: timm's mean/std and floor(32 / crop_pct 0.95).
    assert manifest["preprocessing"]["resize_size"] == 33
    assert manifest["preprocessing"]["mean"] == pytest.approx([0.5, 0.5, 0.5])
    weights = manifest["lineage"]["weights"]
    assert weights["file"] == "model.pt"
    assert weights["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert manifest["lineage"]["parity_sample"]["images"] == 16
    parity = json.loads(bundle.file("parity.json").read_text())
    assert parity["inputs"] == "real and seeded random"

    code, out, err = lensflow(monkeypatch, capsys, "score", "images", tmp_path / "inbox",
                              "--model", tmp_path / "reg" / "byo", "--out", tmp_path / "out",
                              "--run-date", "2026-11-30", "--workers", 0)
    assert code == 0, err
    partition = tmp_path / "out" / "image_predictions" / "run_date=2026-11-30"
    worst = assert_scored_like_eager(partition, model, inbox)
    print(f"largest probability difference, Parquet vs eager: {worst:.2e}")


@pytest.fixture
def resnet18_checkpoint(tmp_path):
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), path)
    return path


def _import(monkeypatch, capsys, checkpoint, *args):
    return lensflow(monkeypatch, capsys, "import-model", checkpoint, "--registry",
                    checkpoint.parent / "reg", "--name", "m", *args)


def test_an_architecture_that_does_not_fit_lists_the_keys(resnet18_checkpoint, monkeypatch,
                                                         capsys):
    code, _, err = _import(monkeypatch, capsys, resnet18_checkpoint, "--arch", "resnet34")
    assert code == 2
    assert_one_line(err, "resnet18.pt", "--arch resnet34", "missing keys ['layer1.2.bn1.bias'")
    assert not (resnet18_checkpoint.parent / "reg").exists()


def test_a_name_both_libraries_have_hints_at_the_one_that_fits(tmp_path, monkeypatch, capsys):
    path = tmp_path / "effnet.safetensors"
    save_file(torchvision.models.efficientnet_b0(num_classes=2).state_dict(), str(path))
    code, _, err = _import(monkeypatch, capsys, path, "--arch", "timm/efficientnet_b0")
    assert code == 2
    assert_one_line(err, "unexpected keys", "it fits --arch torchvision/efficientnet_b0")


def test_class_names_must_match_the_classifier(resnet18_checkpoint, tmp_path, monkeypatch,
                                               capsys):
    (tmp_path / "classes.txt").write_text("ant\nbee\n")
    code, _, err = _import(monkeypatch, capsys, resnet18_checkpoint, "--arch", "resnet18",
                           "--classes", tmp_path / "classes.txt")
    assert code == 2
    assert_one_line(err, "classes.txt: 2 names", "classifier (fc.weight) has 3 outputs")
    code, _, err = _import(monkeypatch, capsys, resnet18_checkpoint, "--arch", "resnet18",
                           "--num-outputs", 5)
    assert_one_line(err, "--num-outputs 5", "has 3 outputs")
    (tmp_path / "classes.txt").write_text("ant\nbee\nant\n")
    code, _, err = _import(monkeypatch, capsys, resnet18_checkpoint, "--arch", "resnet18",
                           "--classes", tmp_path / "classes.txt")
    assert_one_line(err, "classes.txt, line 3: 'ant' repeats line 1")


def test_a_file_that_is_not_a_state_dict_is_refused_without_unpickling(tmp_path, monkeypatch,
                                                                      capsys):
    whole = tmp_path / "whole_model.pt"
    torch.save(torchvision.models.resnet18(num_classes=3), whole)  # the whole module, pickled
    code, _, err = _import(monkeypatch, capsys, whole, "--arch", "resnet18")
    assert code == 2
    assert_one_line(err, "whole_model.pt: not a state dict", "torchvision.models.resnet.ResNet",
                    "save model.state_dict()")

    garbage = tmp_path / "notes.pt"
    garbage.write_text("not a checkpoint\n")
    code, _, err = _import(monkeypatch, capsys, garbage, "--arch", "resnet18")
    assert_one_line(err, "notes.pt: not a safetensors or torch.save file")

    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    code, _, err = _import(monkeypatch, capsys, tensor, "--arch", "resnet18")
    assert_one_line(err, "tensor.pt: holds a Tensor, not a state dict")

    code, _, err = _import(monkeypatch, capsys, tmp_path / "absent.pt", "--arch", "resnet18")
    assert_one_line(err, "absent.pt: no such file")


def test_a_training_checkpoint_of_a_compiled_ddp_model_is_unwrapped(tmp_path):
    from training.models.library_model import read_state_dict

    state = torchvision.models.resnet18(num_classes=3).state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1},
                "model_state_dict": {f"module._orig_mod.{k}": v for k, v in state.items()}},
               path)
    assert list(read_state_dict(path)) == list(state)


def test_bad_option_values_are_refused_before_any_work(resnet18_checkpoint, monkeypatch,
                                                       capsys):
    code, _, err = _import(monkeypatch, capsys, resnet18_checkpoint, "--arch", "resnet18",
                           "--mean", "0.5,0.5")
    assert code == 2
    assert_one_line(err, "--mean")
    code, _, err = _import(monkeypatch, capsys, resnet18_checkpoint, "--arch", "resnet18",
                           "--task", "detection")
    assert_one_line(err, "--task")
    code, _, err = _import(monkeypatch, capsys, resnet18_checkpoint, "--arch", "resnet18",
                           "--task", "multi_label", "--thresholds", "0.2,0.3")
    assert_one_line(err, "--thresholds: 2 values for 3 classes")


@pytest.mark.parametrize("task, extra, check", [
    ("multi_label", ["--thresholds", "0.3,0.6,0.5"],
     lambda m: list(thresholds_for(m, 3)) == [0.3, 0.6, 0.5]),
    ("regression", [], lambda m: m["targets"] == {"kind": "values", "names": ["0", "1", "2"]}),
])
def test_each_task_writes_the_manifest_scoring_reads(task, extra, check, resnet18_checkpoint,
                                                     monkeypatch, capsys):
    manifests = _captured_exports(monkeypatch)
    code, _, err = _import(monkeypatch, capsys, resnet18_checkpoint, "--arch", "resnet18",
                           "--task", task, "--no-promote", *extra)
    assert code == 0, err
    assert manifests[0]["task"] == task and check(manifests[0])


def test_points_are_xy_pairs_in_the_centre_crop(tmp_path, monkeypatch, capsys):
    from export.manifest import point_frame

    path = tmp_path / "points.safetensors"
    save_file(torchvision.models.resnet18(num_classes=4).state_dict(), str(path))
    manifests = _captured_exports(monkeypatch)
    code, _, err = _import(monkeypatch, capsys, path, "--arch", "resnet18", "--task", "points",
                           "--input-size", 64, "--interpolation", "bicubic", "--no-promote")
    assert code == 0, err
    manifest = manifests[0]
    assert manifest["task"] == "regression"
    assert manifest["targets"]["points"] == [["x0", "y0"], ["x1", "y1"]]
    # torchvision's recipe (resize 256 → crop 224) kept at 64 px, the filter overridden.
    assert point_frame(manifest).resize_size == 73
    assert point_frame(manifest).interpolation == "bicubic"
    assert "seeded random inputs only" in err

    save_file(torchvision.models.resnet18(num_classes=3).state_dict(), str(path))
    code, _, err = _import(monkeypatch, capsys, path, "--arch", "resnet18", "--task", "points")
    assert_one_line(err, "--task points: 3 outputs are not x,y pairs")


def _captured_exports(monkeypatch) -> list[dict]:
    """Stand in for export_bundle: record the manifest, skip the conversions."""
    import training.recipes.import_model as recipe
    from export.convert import ExportResult
    from export.parity import ParityReport, ParityTolerances

    manifests: list[dict] = []

    def export(model, manifest, registry, name, **_):
        manifests.append(manifest)
        return ExportResult(Path(registry) / name / "v1", name, "v1", "0" * 64,
                            ParityReport(True, ParityTolerances(), ()))

    monkeypatch.setattr(recipe, "export_bundle", export)
    return manifests


def test_every_import_option_is_a_flag_and_a_flow_parameter_with_its_default():
    import typer
    from prefect.utilities.callables import parameter_schema

    from flows.cli import app
    from flows.import_flows import import_model_flow
    from training.recipes.import_options import ImportOptions

    flags = {p.name: p for p in typer.main.get_command(app).commands["import-model"].params}
    schema = parameter_schema(import_model_flow).model_dump()
    for name, field in ImportOptions.model_fields.items():
        assert f"--{name.replace('_', '-')}" in flags[name].opts, name
        assert flags[name].help == field.description, name
        assert schema["properties"][name].get("description") == field.description, name
        if field.is_required():  # --arch: required on both surfaces, no default to show
            assert flags[name].required and name in schema["required"], name
        else:
            assert flags[name].default == field.get_default(), name
            assert schema["properties"][name].get("default") == field.get_default(), name
    assert {"checkpoint", "registry", "name", "arch"} <= set(schema["required"])
