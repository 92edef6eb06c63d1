"""The two classifier heads: linear (pool, dropout, linear) and fastai's create_head.

Both on a torchvision and a timm body, at 32 px with random weights: shapes, layer groups,
freezing, precompute, the checkpoint round trip and export with the parity gate.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_export_models import image_manifest
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from export.bundle import load_bundle
from export.convert import export_bundle
from export.wrappers import ImageExportWrapper
from training.errors import TrainingError
from training.evaluation.metrics import accuracy
from training.fit.learner import Learner
from training.fit.precompute import fit_head_precomputed
from training.models.backbones import create_backbone, create_model
from training.models.checkpoint import ImageModelSpec, load_image_model, save_image_model
from training.models.heads import AdaptiveConcatPool2d
from training.models.ranges import SigmoidRange
from training.recipes.options import ImageTrainOptions

torch.set_num_threads(1)

ARCHS = ["resnet18", "timm/resnet10t"]
SIZE = 32


def _ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


def _fastai(arch: str, n_out: int = 3, **kwargs):
    torch.manual_seed(0)
    model, _ = create_model(arch, n_out, "none", input_size=SIZE, head="fastai", **kwargs)
    return model


def _trained_like(model: nn.Module) -> nn.Module:
    """BatchNorm statistics (body and head) moved off their init, as after training."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, SIZE, SIZE) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_fastai_head_is_fastais_create_head(arch):
    model = _fastai(arch)
    nf = model.num_features
    assert nf == 512
    kinds = [type(m) for m in model.head]
    assert kinds == [AdaptiveConcatPool2d, nn.Flatten, nn.BatchNorm1d, nn.Dropout, nn.Linear,
                     nn.ReLU, nn.BatchNorm1d, nn.Dropout, nn.Linear]
    _, _, bn1, drop1, lin1, _, bn2, drop2, lin2 = model.head
    assert (bn1.num_features, lin1.in_features, lin1.out_features) == (2 * nf, 2 * nf, 512)
    assert (bn2.num_features, lin2.in_features, lin2.out_features) == (512, 512, 3)
    assert (drop1.p, drop2.p) == (0.25, 0.5)  # fastai's ps=0.5, halved before the first linear
    assert lin1.bias is None and lin2.bias is None  # each linear follows a BatchNorm
    x = torch.randn(2, 3, SIZE, SIZE)
    model.eval()
    with torch.no_grad():
        features = model.body(x)
        assert features.dim() == 4 and features.shape[:2] == (2, nf)  # the unpooled map
        assert torch.equal(model(x), model.head(features))
    assert model(x).shape == (2, 3)
    assert model.head_kind == "fastai"


@pytest.mark.parametrize("arch", ARCHS)
def test_linear_head_stays_pool_dropout_linear(arch):
    torch.manual_seed(0)
    model, _ = create_model(arch, 3, "none", input_size=SIZE)
    assert model.head_kind == "linear"
    assert [type(m) for m in model.head] == [nn.Dropout, nn.Linear]
    assert model.head[0].p == 0.2 and model.head[1].in_features == model.num_features == 512
    model.eval()
    with torch.no_grad():
        assert model.body(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 512)
        assert model(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 3)


def test_concat_pool_is_max_then_average():
    x = torch.arange(8.0).view(1, 2, 2, 2)
    pooled = AdaptiveConcatPool2d()(x).flatten()
    assert pooled.tolist() == [3.0, 7.0, 1.5, 5.5]


@pytest.mark.parametrize("arch", ARCHS)
def test_whole_head_is_the_last_group_and_body_groups_match_the_linear_model(arch):
    model = _fastai(arch)
    groups = model.layer_groups()
    assert len(groups) == 3 and groups[-1] is model.head
    in_groups = [i for g in groups for i in _ids(g)]
    assert len(in_groups) == len(set(in_groups)) and set(in_groups) == _ids(model)
    linear, _ = create_model(arch, 3, "none", input_size=SIZE)
    for fastai_group, linear_group in zip(model._group_names, linear._group_names, strict=True):
        assert fastai_group == linear_group  # the cut keeps parameter names and their split


def test_freezing_leaves_the_head_and_its_batchnorm_training():
    model = _fastai("resnet18")
    data = TensorDataset(torch.randn(16, 3, SIZE, SIZE), torch.randint(0, 3, (16,)))
    learner = Learner(model, DataLoader(data, batch_size=8), None, nn.CrossEntropyLoss(),
                      device="cpu")
    learner.freeze(train_bn=False)
    assert all(p.requires_grad for p in model.head.parameters())
    assert not any(p.requires_grad for p in model.body.parameters())
    learner.set_train_mode(True)
    head_bns = [m for m in model.head.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(head_bns) == 2 and all(bn.training for bn in head_bns)
    assert not any(m.training for m in model.body.modules() if isinstance(m, nn.BatchNorm2d))


def test_precompute_trains_the_fastai_head_as_through_the_frozen_body():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 3, SIZE, SIZE, generator=g), torch.randint(0, 2, (48,), generator=g)
    train, valid = TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:])

    def learner() -> Learner:
        return Learner(_fastai("resnet18", 2), DataLoader(train, batch_size=16, shuffle=True),
                       DataLoader(valid, batch_size=16), nn.CrossEntropyLoss(),
                       {"accuracy": accuracy}, device="cpu", seed=1)

    through = learner()
    before = {k: v.clone() for k, v in through.model.head.state_dict().items()}
    through.freeze(train_bn=False)
    reference = through.fit_one_cycle(2, 1e-2)
    cached = learner()  # after the first fit: a Learner seeds the global RNG when built
    records = fit_head_precomputed(cached, 2, 1e-2, train_loader=cached.train_loader)
    for name, value in through.model.head.state_dict().items():
        assert torch.allclose(value.float(), cached.model.head.state_dict()[name].float(),
                              atol=1e-4), name
    assert not torch.equal(before["2.running_mean"], cached.model.head[2].running_mean)
    for a, b in zip(reference, records, strict=True):
        assert a.valid_loss == pytest.approx(b.valid_loss, abs=1e-4)


def test_y_range_and_dropout_apply_to_the_fastai_head():
    model = _fastai("resnet18", 2, y_range=(-1.0, 4.0), dropout=0.2)
    assert isinstance(model.head[-1], SigmoidRange)
    assert [m.p for m in model.head if isinstance(m, nn.Dropout)] == [0.1, 0.2]
    with torch.no_grad():
        out = _trained_like(model)(torch.randn(4, 3, SIZE, SIZE))
    assert out.min() > -1.0 and out.max() < 4.0


def test_bodies_without_a_feature_map_refuse_the_fastai_head():
    with pytest.raises(TrainingError, match="densenet121.*head 'linear'"):
        create_backbone("densenet121", "none", pool=False)
    with pytest.raises(TrainingError, match="head must be one of linear, fastai"):
        create_model("resnet18", 2, "none", head="mlp")


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_round_trip_keeps_the_head(tmp_path, arch):
    model, pre = create_model(arch, 2, "none", input_size=SIZE, head="fastai")
    model = _trained_like(model)
    spec = ImageModelSpec(arch, "single_label", 2, ["ant", "bee"], None, 0.5, pre, head="fastai")
    save_image_model(tmp_path, model, spec)
    assert json.loads((tmp_path / "model.json").read_text())["head"] == "fastai"
    loaded, loaded_spec = load_image_model(tmp_path)
    assert loaded_spec == spec and loaded.head_kind == "fastai"
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(TrainingError, match="head"):
        save_image_model(tmp_path / "other", model, ImageModelSpec(
            arch, "single_label", 2, ["ant", "bee"], None, 0.5, pre))


def test_model_json_without_a_head_is_a_linear_model(tmp_path):
    model, pre = create_model("resnet18", 2, "none", input_size=SIZE)
    save_image_model(tmp_path, model.eval(), ImageModelSpec(
        "resnet18", "single_label", 2, ["a", "b"], preprocessing=pre))
    path = tmp_path / "model.json"
    old = json.loads(path.read_text())
    del old["head"]
    path.write_text(json.dumps(old))
    loaded, spec = load_image_model(tmp_path)
    assert spec.head == "linear" and loaded.head_kind == "linear"


def test_head_is_an_option_defaulting_to_linear():
    # benchmarks/heads.py: both heads 147/153 on ants/bees, a tie, so linear stays.
    assert ImageTrainOptions().head == "linear"
    assert ImageTrainOptions(head="fastai").head == "fastai"
    with pytest.raises(ValueError, match="head"):
        ImageTrainOptions(head="mlp")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_fastai_head_exports_with_parity(tmp_path, arch):
    model = _trained_like(_fastai(arch, 2))
    manifest = image_manifest("single_label", n_out=2) | {"arch": arch}
    photos = torch.randint(0, 256, (6, SIZE, SIZE, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    result = export_bundle(model, manifest, tmp_path, "ants", validation_inputs=photos)
    assert result.parity.passed
    runtimes = {row.runtime for row in result.parity.rows}
    assert {"torchscript", "onnxruntime-cpu"} <= runtimes
    graph = load_bundle(result.bundle_path).manifest["graphs"]["model"]
    assert graph["files"]["pt2"] and "pt2_error" not in graph  # torch.export managed it too
    program = torch.export.load(result.bundle_path / graph["files"]["pt2"]).module()
    scores, _ = program(photos)
    reference, _ = ImageExportWrapper(model, "single_label", manifest["preprocessing"]["mean"],
                                      manifest["preprocessing"]["std"])(photos)
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=1e-4)
