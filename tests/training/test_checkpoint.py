"""save_image_model / load_image_model: a safetensors + JSON round trip export can rely on."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from export.pixels import Preprocessing
from training.errors import TrainingError
from training.models.checkpoint import (
    ImageModelSpec,
    load_image_model,
    read_image_model_spec,
    save_image_model,
)


def _trained_like(arch: str, n_out: int, **kwargs):
    """A model whose weights and BatchNorm statistics differ from any fresh init."""
    from training.models.backbones import create_model

    torch.manual_seed(1)
    model, pre = create_model(arch, n_out, "none", input_size=64, **kwargs)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64) * 3 + 1)  # moves BatchNorm running stats
        model.head[1].weight.normal_()
    return model.eval(), pre


@pytest.mark.parametrize(
    ("arch", "task", "n_out", "classes", "y_range"),
    [
        ("resnet18", "single_label", 3, ["ant", "bee", "wasp"], None),
        ("tf_efficientnet_lite0", "regression", 2, ["x", "y"], (0.0, 64.0)),
    ],
)
def test_round_trip_gives_identical_outputs(tmp_path, arch, task, n_out, classes, y_range):
    model, pre = _trained_like(arch, n_out, y_range=y_range, dropout=0.1)
    spec = ImageModelSpec(arch, task, n_out, classes, y_range, 0.1, pre)
    save_image_model(tmp_path / "out", model, spec)
    loaded, loaded_spec = load_image_model(tmp_path / "out")
    assert loaded_spec == spec
    assert not loaded.training
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.layer_groups()[-1] is loaded.head


def test_files_are_safetensors_and_plain_json(tmp_path):
    model, pre = _trained_like("resnet18", 2)
    spec = ImageModelSpec("resnet18", "multi_label", 2, ["cat", "dog"], None, 0.2, pre)
    save_image_model(tmp_path, model, spec)
    tensors = load_file(tmp_path / "weights.safetensors")
    assert set(tensors) == set(model.state_dict())
    written = json.loads((tmp_path / "model.json").read_text())
    assert written["arch"] == "resnet18" and written["classes"] == ["cat", "dog"]
    assert written["preprocessing"]["input_size"] == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "weights.safetensors"]


def test_spec_dict_round_trip_and_validation():
    spec = ImageModelSpec("resnet18", "regression", 1, None, (1.0, 5.0), 0.0,
                          Preprocessing(input_size=128, resize_size=146))
    assert ImageModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(TrainingError, match="task"):
        ImageModelSpec("resnet18", "segmentation", 1)
    with pytest.raises(TrainingError, match="classes"):
        ImageModelSpec("resnet18", "single_label", 3, ["a", "b"])


def test_missing_files_are_named(tmp_path):
    with pytest.raises(TrainingError, match="model.json not found"):
        load_image_model(tmp_path)
    model, pre = _trained_like("resnet18", 2)
    save_image_model(tmp_path, model, ImageModelSpec("resnet18", "single_label", 2, ["a", "b"],
                                                     preprocessing=pre))
    (tmp_path / "weights.safetensors").unlink()
    with pytest.raises(TrainingError, match="weights.safetensors not found"):
        load_image_model(tmp_path)


def test_corrupt_files_are_named(tmp_path):
    model, pre = _trained_like("resnet18", 2)
    spec = ImageModelSpec("resnet18", "single_label", 2, ["a", "b"], preprocessing=pre)
    save_image_model(tmp_path, model, spec)
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(TrainingError, match="weights.safetensors is not a readable"):
        load_image_model(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(TrainingError, match="model.json is not readable JSON"):
        read_image_model_spec(tmp_path)


def test_weights_that_do_not_match_the_spec_are_refused(tmp_path):
    model, pre = _trained_like("resnet18", 2)
    save_image_model(tmp_path, model, ImageModelSpec("resnet18", "single_label", 2, ["a", "b"],
                                                     preprocessing=pre))
    spec_path = tmp_path / "model.json"
    spec = json.loads(spec_path.read_text())
    spec |= {"n_out": 3, "classes": ["a", "b", "c"]}
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(TrainingError, match=r"weights.safetensors and model.json.*head\.1\.weight"):
        load_image_model(tmp_path)


def test_save_refuses_a_spec_for_another_arch(tmp_path):
    model, pre = _trained_like("resnet18", 2)
    with pytest.raises(TrainingError, match="arch"):
        save_image_model(tmp_path, model, ImageModelSpec("resnet34", "single_label", 2, ["a", "b"],
                                                         preprocessing=pre))
