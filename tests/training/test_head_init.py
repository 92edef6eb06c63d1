"""A linear head that starts from the pretrained classifier (``training.models.head_init``)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from training.errors import TrainingError
from training.models.backbones import create_backbone, create_model
from training.models.head_init import SourceClassifier, classifier_init
from training.models.packaged_weights import packaged_lite0_state_dict

F, K = 16, 6


def _source() -> SourceClassifier:
    """Source class k fires on feature k (scaled), so its logits are easy to read."""
    weight = torch.zeros(K, F)
    weight[torch.arange(K), torch.arange(K)] = 4.0
    return SourceClassifier(weight, torch.zeros(K))


def _images_like(source_classes: list[int], n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples per new class c, each a noisy image of source class ``source_classes[c]``."""
    g = torch.Generator().manual_seed(seed)
    features, targets = [], []
    for c, k in enumerate(source_classes):
        x = 0.3 * torch.randn(n, F, generator=g).abs()
        x[:, k] += 1.0
        features.append(x)
        targets.append(torch.full((n,), c))
    return torch.cat(features), torch.cat(targets)


def test_each_class_starts_from_the_source_classes_its_images_resemble():
    features, targets = _images_like([1, 3, 4], n=20, seed=0)
    start = classifier_init(_source(), features, targets, ["a", "b", "c"])
    assert [start.top_sources[c][0][0] for c in "abc"] == [1, 3, 4]
    assert start.train_loss < 0.5 * start.uniform_loss
    assert start.uniform_loss == pytest.approx(math.log(3))
    head = nn.Sequential(nn.Dropout(0.2), nn.Linear(F, 3))
    start.apply(head)
    held_out, truth = _images_like([1, 3, 4], n=30, seed=1)
    with torch.no_grad():
        assert (head.eval()(held_out).argmax(1) == truth).float().mean() == 1.0
    torch.testing.assert_close(head[1].weight, start.weight)


def test_a_source_that_says_nothing_starts_near_the_uniform_head():
    """Both classes look alike to the source: the start is not confidently wrong."""
    g = torch.Generator().manual_seed(0)
    features = torch.rand(200, F, generator=g)
    targets = torch.randint(0, 2, (200,), generator=g)
    start = classifier_init(_source(), features, targets, ["a", "b"])
    assert start.train_loss <= start.uniform_loss + 1e-6
    held_out = torch.rand(100, F, generator=g)
    probs = torch.softmax(held_out @ start.weight.T + start.bias, 1)
    assert (probs - 0.5).abs().max() < 0.25  # the largest temperature tried would give ~0.5


def test_a_class_missing_from_the_cache_starts_at_the_mean_image():
    features, targets = _images_like([2, 5], n=10, seed=0)
    start = classifier_init(_source(), features, targets, ["a", "b", "never_seen"])
    mean_row = torch.softmax(features @ _source().weight.T, 1).mean(0) @ _source().weight
    torch.testing.assert_close(start.weight[2], start.temperature * mean_row)


def test_the_packaged_backbone_keeps_its_imagenet_classifier_beside_the_body():
    backbone = create_backbone("tf_efficientnet_lite0", "packaged")
    state = packaged_lite0_state_dict()
    assert torch.equal(backbone.source_classifier.weight, state["classifier.weight"])
    assert torch.equal(backbone.source_classifier.bias, state["classifier.bias"])
    assert not any(n.startswith("classifier") for n in backbone.body.state_dict())
    model, _ = create_model("tf_efficientnet_lite0", 2, "packaged")
    assert model.source_classifier is backbone.source_classifier or torch.equal(
        model.source_classifier.weight, state["classifier.weight"])
    assert "source_classifier" not in dict(model.named_modules())


def test_weights_files_bring_their_classifier_and_random_weights_none(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.resnet18(num_classes=10)
    save_file(source.state_dict(), tmp_path / "r18.safetensors")
    found = create_backbone("resnet18", tmp_path / "r18.safetensors").source_classifier
    assert torch.equal(found.weight, source.fc.weight.detach())
    assert torch.equal(found.bias, source.fc.bias.detach())
    assert create_backbone("resnet18", "none").source_classifier is None
    # The fastai head pools the feature map itself: the classifier does not read its input.
    fastai_model, _ = create_model("resnet18", 2, tmp_path / "r18.safetensors", head="fastai")
    assert fastai_model.source_classifier is None


def test_the_start_must_fit_the_head():
    features, targets = _images_like([0, 1], n=5, seed=0)
    start = classifier_init(_source(), features, targets, ["a", "b"])
    with pytest.raises(TrainingError, match=r"head_init.*\(3, 16\)"):
        start.apply(nn.Linear(F, 3))
