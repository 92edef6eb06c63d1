"""The options of an export, declared once (see ``training.recipes.options``): ``lensflow export``,
the ``--registry`` step of ``lensflow train`` and the training flows take theirs from here."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from export.declared_options import Options


class ExportOptions(Options):
    """How a training output becomes a bundle."""

    tta: bool = Field(False, description="image models: the exported graph averages the scores "
                      "of the centre crop and its mirror (test-time augmentation; ~2x the "
                      "compute per image)")
    aoti: bool = Field(False, description="also compile an AOTInductor package of each graph for "
                       "this machine's CPU, run by --runtime aoti (minutes per graph; a failed "
                       "compile is recorded in the manifest and the bundle goes on)")
    precision: Literal["fp32", "fp16"] = Field(
        "fp32", description="image models: fp16 exports the graphs in half precision (inputs "
        "uint8, outputs float32 as before), gated against the fp32 model at fp16's own "
        "tolerance; for GPUs (tensor cores), slower than fp32 on most CPUs")
