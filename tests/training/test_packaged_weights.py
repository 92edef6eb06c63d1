"""The packaged EfficientNet-Lite0 weights: a complete rename table, and real ImageNet skill."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from paths import SHARED_DATA
from PIL import Image
from torchvision.transforms import v2

from training.errors import TrainingError
from training.models.backbones import create_backbone
from training.models.packaged_weights import (
    PACKAGED_ARCH,
    lite0_rename_table,
    packaged_lite0_state_dict,
    packaged_preprocessing,
    packaged_weights_path,
    rename_to_timm,
)

IMAGENET_BEE, IMAGENET_ANT = 309, 310


def _shared_data() -> Path:
    return SHARED_DATA


def _timm_shapes() -> dict[str, torch.Size]:
    return {k: v.shape for k, v in timm.create_model(PACKAGED_ARCH).state_dict().items()}


def test_rename_table_maps_every_packaged_key_onto_every_timm_key_once():
    table = lite0_rename_table()
    packaged = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    assert set(table) == set(packaged)
    assert sorted(table.values()) == sorted(_timm_shapes())
    assert len(set(table.values())) == len(table)
    # Spot checks of the structure: flat block 15 is the single block of the last stage, and
    # the head BatchNorm is `_bn1` in the old layout but `bn2` in timm.
    assert table["_blocks.15._project_conv.weight"] == "blocks.6.0.conv_pwl.weight"
    assert table["_blocks.3._depthwise_conv.weight"] == "blocks.2.0.conv_dw.weight"
    assert table["_bn1.running_var"] == "bn2.running_var"


def test_renamed_weights_load_strictly_into_timm_with_packaged_tensors():
    packaged = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    state = packaged_lite0_state_dict()
    model = timm.create_model(PACKAGED_ARCH)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.classifier.weight, packaged["_fc.weight"])
    last_block_of_stage_5 = packaged["_blocks.14._depthwise_conv.weight"]
    assert torch.equal(model.blocks[5][3].conv_dw.weight, last_block_of_stage_5)


def test_a_wrong_shape_or_missing_tensor_names_the_key():
    packaged = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    shapes = _timm_shapes()
    bad = dict(packaged) | {"_blocks.2._bn1.weight": torch.zeros(7)}
    with pytest.raises(TrainingError, match=r"_blocks\.2\._bn1\.weight.*blocks\.1\.1\.bn2\.weight"):
        rename_to_timm(bad, shapes, origin="lite0.pth")
    partial = {k: v for k, v in packaged.items() if k != "_conv_head.weight"}
    with pytest.raises(TrainingError, match=r"lite0.pth: missing .*_conv_head\.weight"):
        rename_to_timm(partial, shapes, origin="lite0.pth")


def test_packaged_backbone_uses_half_mean_half_std_preprocessing():
    backbone = create_backbone(PACKAGED_ARCH, "packaged")
    assert backbone.preprocessing == packaged_preprocessing()
    assert backbone.preprocessing.mean == (0.5, 0.5, 0.5)
    assert backbone.preprocessing.std == (0.5, 0.5, 0.5)
    assert backbone.preprocessing.input_size == 224
    packaged = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    assert torch.equal(backbone.body.conv_stem.weight, packaged["_conv_stem.weight"])


@pytest.mark.slow
def test_imagenet_logits_tell_ants_from_bees():
    val = _shared_data() / "hymenoptera_data" / "val"
    if not val.is_dir():
        pytest.skip(f"{val} absent")
    pre = packaged_preprocessing()
    transform = v2.Compose([
        v2.PILToTensor(),
        v2.Resize(pre.resize_size, interpolation=v2.InterpolationMode(pre.interpolation),
                  antialias=True),
        v2.CenterCrop(pre.input_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(pre.mean, pre.std),
    ])
    model = timm.create_model(PACKAGED_ARCH)
    model.load_state_dict(packaged_lite0_state_dict(), strict=True)
    model.eval()
    correct = total = 0
    for folder, want, other in (("ants", IMAGENET_ANT, IMAGENET_BEE),
                                ("bees", IMAGENET_BEE, IMAGENET_ANT)):
        files = sorted(p for p in (val / folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        for start in range(0, len(files), 32):
            batch = torch.stack([transform(Image.open(f).convert("RGB"))
                                 for f in files[start:start + 32]])
            with torch.inference_mode():
                logits = model(batch)
            correct += int((logits[:, want] > logits[:, other]).sum())
            total += len(batch)
    accuracy = correct / total
    print(f"packaged lite0 ImageNet logits: ant-vs-bee right on {correct}/{total} = {accuracy:.1%}")
    assert total >= 100
    assert accuracy >= 0.9
