"""The options of importing a checkpoint trained elsewhere, declared once: name, type, default,
help, checks.

``training.recipes.import_model`` reads them from one object; ``flows`` derives the
``lensflow import-model`` flags and the ``import-model`` flow's parameters from this model. Where
the checkpoint, the class names file, the sample images, the registry and the model name are is
not an option and stays with each surface.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from export.declared_options import Options, PositiveInt
from export.pixels import RESIZE_FILTERS

#: Comma-separated numbers: "0.5" or "0.3,0.6,0.5".
_NUMBERS = r"^\s*[-+0-9.eE]+(\s*,\s*[-+0-9.eE]+)*\s*$"
#: Three comma-separated numbers, one per RGB channel.
_RGB = r"^\s*[-+0-9.eE]+\s*,\s*[-+0-9.eE]+\s*,\s*[-+0-9.eE]+\s*$"
ImportTask = Literal["single_label", "multi_label", "regression", "points"]
Interpolation = Literal[RESIZE_FILTERS]  # type: ignore[valid-type]


class ImportOptions(Options):
    """A state dict of a torchvision or timm classifier, exported as it is (its own classifier)."""

    arch: str = Field(description="architecture the checkpoint was trained as: a torchvision "
                      "or timm model name (prefix timm/ or torchvision/ to force one)")
    task: ImportTask = Field("single_label", description="single_label (softmax) | multi_label "
                             "(sigmoid, thresholds) | regression (raw outputs) | points "
                             "(x,y pairs in [-1, 1] of the centre crop)")
    num_outputs: PositiveInt | None = Field(None, description="outputs of the classifier "
                                            "(default: the class file's names, else the "
                                            "checkpoint's classifier)")
    thresholds: Annotated[str, Field(pattern=_NUMBERS)] = Field(
        "0.5", description="multi_label decision threshold: one number, or one per class "
        "(comma-separated)")
    input_size: PositiveInt | None = Field(None, description="side of the square input in "
                                           "pixels (default: the architecture's)")
    resize_size: PositiveInt | None = Field(None, description="shorter side before the centre "
                                            "crop (default: the architecture's ratio to "
                                            "input_size)")
    mean: Annotated[str, Field(pattern=_RGB)] | None = Field(
        None, description="R,G,B normalisation mean (default: the architecture's)")
    std: Annotated[str, Field(pattern=_RGB)] | None = Field(
        None, description="R,G,B normalisation std (default: the architecture's)")
    interpolation: Interpolation | None = Field(
        None, description=f"resize filter: {' | '.join(RESIZE_FILTERS)} (default: the "
        "architecture's)")
    pt2: bool = Field(True, description="also write a torch.export .pt2 program")
    promote: bool = Field(True, description="point REG/NAME/current at the bundle when parity "
                          "passes")
