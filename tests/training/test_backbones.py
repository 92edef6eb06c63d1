"""create_backbone / create_model: torchvision and timm bodies, layer groups, heads and weights."""

from __future__ import annotations

import copy
import urllib.error

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from timm.data import create_transform
from torch import nn

from export.pixels import IMAGENET_MEAN, Preprocessing
from training.errors import TrainingError
from training.models.backbones import (
    Backbone,
    ImageModel,
    create_backbone,
    create_model,
)
from training.models.ranges import SigmoidRange


def _ids(module: nn.Module) -> list[int]:
    return [id(p) for p in module.parameters()]


def _assert_partition(groups, whole: nn.Module) -> None:
    in_groups = [i for g in groups for i in _ids(g)]
    assert len(in_groups) == len(set(in_groups)), "a parameter sits in two groups"
    assert set(in_groups) == set(_ids(whole))
    assert all(_ids(g) for g in groups), "an empty group"


@pytest.mark.parametrize(
    ("arch", "first", "last"),
    [
        ("resnet18", "conv1.weight", "layer4.1.bn2.bias"),
        ("mobilenet_v3_small", "features.0.0.weight", "classifier.0.weight"),
        ("tf_efficientnet_lite0", "conv_stem.weight", "bn2.weight"),
    ],
)
def test_backbone_gives_pooled_features_and_early_late_groups(arch, first, last):
    backbone = create_backbone(arch, "none")
    assert isinstance(backbone, Backbone)
    backbone.body.eval()
    with torch.no_grad():
        features = backbone.body(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, backbone.num_features)
    _assert_partition(backbone.groups, backbone.body)
    params = dict(backbone.body.named_parameters())
    early, late = backbone.groups
    assert id(params[first]) in _ids(early)
    assert id(params[last]) in _ids(late)
    assert sum(p.numel() for p in late.parameters()) > sum(p.numel() for p in early.parameters())


@pytest.mark.slow
def test_container_parameters_land_in_a_group():
    # vit's class token and position embedding belong to containers, not to a leaf block.
    backbone = create_backbone("vit_b_16", "none")
    _assert_partition(backbone.groups, backbone.body)
    early_ids = _ids(backbone.groups[0])
    assert id(backbone.body.class_token) in early_ids
    assert id(backbone.body.encoder.pos_embedding) in early_ids


def test_preprocessing_comes_from_each_library_recipe():
    torchvision_pre = create_backbone("resnet18", "none").preprocessing
    assert (torchvision_pre.input_size, torchvision_pre.resize_size) == (224, 256)
    assert torchvision_pre.mean == pytest.approx(IMAGENET_MEAN)
    assert torchvision_pre.interpolation == "bilinear"
    timm_pre = create_backbone("tf_efficientnet_lite0", "none").preprocessing
    assert timm_pre.mean == (0.5, 0.5, 0.5) and timm_pre.interpolation == "bicubic"
    assert timm_pre.resize_size == 256  # 224 / crop_pct 0.875
    timm_resnet = create_backbone("timm/resnet18", "none")
    assert hasattr(timm_resnet.body, "pretrained_cfg"), "timm/ prefix should pick timm"


def test_create_model_head_groups_and_input_size():
    model, pre = create_model("resnet18", 5, "none", dropout=0.3, input_size=64)
    assert isinstance(model, ImageModel) and model.arch == "resnet18"
    assert (pre.input_size, pre.resize_size) == (64, 73)
    groups = model.layer_groups()
    assert len(groups) == 3 and groups[-1] is model.head
    _assert_partition(groups, model)
    assert isinstance(model.head[0], nn.Dropout) and model.head[0].p == 0.3
    assert model.head[1].in_features == model.num_features == 512
    model.eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model.head(model.body(x)))
    assert model(x).shape == (3, 5)


def test_layer_groups_follow_a_deepcopied_model():
    model, _ = create_model("mobilenet_v3_small", 2, "none")
    clone = copy.deepcopy(model)
    _assert_partition(clone.layer_groups(), clone)
    assert not set(_ids(clone.layer_groups()[0])) & set(_ids(model))


def test_y_range_bounds_outputs():
    model, _ = create_model("resnet18", 3, "none", y_range=(-1.0, 4.0))
    assert isinstance(model.head[-1], SigmoidRange)
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        linear = model.head[1]
        # Output 1 is minus output 0, scaled far into the tails: one end each, whatever the
        # random initialisation gave.
        linear.weight[1] = -linear.weight[0]
        linear.weight.mul_(1000.0)
        linear.bias.zero_()
        out = model(torch.randn(8, 3, 64, 64) * 10)
    assert out.min() >= -1.0 and out.max() <= 4.0
    assert out.min() < 0.0 < 3.0 < out.max(), "outputs should reach both ends of the range"


def test_model_traces_to_the_same_outputs():
    model, _ = create_model("resnet18", 4, "none", y_range=(0.0, 1.0))
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    traced = torch.jit.trace(model, x)
    other = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(traced(other), model(other))


@pytest.mark.slow
def test_timm_model_exports_to_onnx_with_dynamic_batch(tmp_path):
    import onnxruntime as ort
    model, _ = create_model("tf_efficientnet_lite0", 3, "none")
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    program = torch.onnx.export(model, (x,), dynamo=True,
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    program.save(tmp_path / "model.onnx")
    session = ort.InferenceSession(tmp_path / "model.onnx", providers=["CPUExecutionProvider"])
    other = torch.randn(3, 3, 64, 64)
    got = session.run(None, {session.get_inputs()[0].name: other.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(other), atol=1e-4, rtol=1e-4)


def _random_resnet18(num_classes: int = 1000) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=num_classes)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_file_loads_into_the_body(tmp_path, suffix):
    source = _random_resnet18(num_classes=10)  # a different classifier is ignored
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), path)
    else:
        torch.save(source.state_dict(), path)
    backbone = create_backbone("resnet18", path)
    source.fc = nn.Identity()
    source.eval()
    backbone.body.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.body(x), source(x), rtol=0, atol=0)


def test_weights_file_that_does_not_fit_lists_the_keys(tmp_path):
    state = _random_resnet18().state_dict()
    del state["layer3.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    expected = r"partial\.pt.*layer3\.0\.conv1\.weight.*extra\.weight"
    with pytest.raises(TrainingError, match=expected):
        create_backbone("resnet18", path)


def test_unreadable_or_absent_weights_file_is_named(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a tensor file")
    with pytest.raises(TrainingError, match="garbage.safetensors"):
        create_backbone("resnet18", garbage)
    with pytest.raises(TrainingError, match="nowhere.pt not found"):
        create_backbone("resnet18", tmp_path / "nowhere.pt")


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"conv1.weight": torch.zeros(1), "opt": torch.optim.SGD}, path)
    with pytest.raises(TrainingError, match="pickled.pt"):
        create_backbone("resnet18", path)


def test_packaged_weights_only_for_lite0():
    with pytest.raises(TrainingError, match="tf_efficientnet_lite0"):
        create_backbone("resnet18", "packaged")


def test_imagenet_without_network_suggests_packaged(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(TrainingError, match="--weights packaged"):
        create_backbone("resnet18", "imagenet")


def test_unknown_arch_suggests_close_names():
    with pytest.raises(TrainingError, match="resnet18"):
        create_backbone("resnet81", "none")


def test_bad_head_arguments_name_the_parameter():
    with pytest.raises(TrainingError, match="y_range"):
        create_model("resnet18", 1, "none", y_range=(2.0, 1.0))
    with pytest.raises(TrainingError, match="n_out"):
        create_model("resnet18", 0, "none")
    with pytest.raises(TrainingError, match="input_size"):
        create_model("vit_b_16", 2, "none", input_size=64)


@pytest.mark.parametrize(("size", "crop_pct"), [(224, 0.875), (224, 0.95), (110, 0.55),
                                                (288, 1.0), (33, 0.55)])
def test_crop_pct_resizes_as_timms_eval_transform(size, crop_pct):
    # 110 / 0.55 and 33 / 0.55 are a hair under an integer in floating point.
    resize = create_transform(input_size=size, crop_pct=crop_pct).transforms[0]
    ours = Preprocessing(input_size=size, resize_size=size).with_crop_pct(crop_pct)
    assert ours.resize_size == resize.size
