"""A tiny image bundle for scoring tests: the exported-graph contract at 32×32, in a few ms.

The graph takes uint8 ``images`` (N, H, W, 3) RGB and returns ``scores`` and ``logits``, as the
export stage's image bundles do; it is written with ``export.bundle.BundleWriter`` so loading it
verifies hashes exactly like a real bundle.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from export.bundle import BundleWriter, promote

PREPROCESSING = {
    "input_size": 32, "resize_size": 36, "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225], "interpolation": "bilinear",
}


class TinyImageModel(nn.Module):
    """uint8 NHWC → normalise → conv → pool → linear, with the task's output activation."""

    def __init__(self, n_out: int, task: str):
        super().__init__()
        self.task = task
        self.register_buffer("mean", torch.tensor(PREPROCESSING["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(PREPROCESSING["std"]).view(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, n_out)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).float() / 255.0
        x = (x - self.mean) / self.std
        logits = self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))
        if self.task == "single_label":
            return torch.softmax(logits, dim=1), logits
        if self.task == "multi_label":
            return torch.sigmoid(logits), logits
        return logits, logits


def make_image_bundle(
    registry: Path,
    task: str = "single_label",
    classes: tuple[str, ...] = ("ant", "bee", "cat", "dog", "eel", "fox"),
    name: str = "tiny",
    seed: int = 0,
    promoted: bool = True,
    parity_passed: bool = True,
) -> Path:
    """Write and (by default) promote a bundle; returns its directory.

    parity_passed: what its ``parity.json`` records (a failed gate cannot be promoted).
    """
    torch.manual_seed(seed)
    n_out = 2 if task == "regression" else len(classes)
    model = TinyImageModel(n_out, task).eval()
    example = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    manifest = {
        "task": task,
        "classes": list(classes) if task != "regression" else [],
        "preprocessing": PREPROCESSING,
        "thresholds": [0.5] * n_out if task == "multi_label" else None,
        "graphs": {"model": {"input": "images", "outputs": ["scores", "logits"]}},
    }
    with BundleWriter(registry, name) as writer, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, example).save(str(writer.dir / "model.ts"))
        torch.onnx.export(
            model, (example,), str(writer.dir / "model.onnx"), input_names=["images"],
            output_names=["scores", "logits"], dynamic_axes={"images": {0: "batch"}},
            dynamo=False,
        )
        (writer.dir / "parity.json").write_text(json.dumps({"passed": parity_passed}))
        path = writer.commit(manifest)
    if promoted:
        promote(path)
    return path
