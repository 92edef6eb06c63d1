"""The trained image model on disk: ``weights.safetensors`` plus ``model.json``, read by export.

Weights go through safetensors (no pickle on disk, as the bundle contract requires); the JSON
spec holds what ``create_model`` needs to rebuild the same module tree (arch, outputs, head
options, input recipe), so loading is "build with ``weights=none``, then load strictly". A
``model.json`` from before heads had a kind has no ``head``: it was a ``linear`` one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from export.manifest import IMAGE_TASKS
from export.pixels import Preprocessing
from training.errors import TrainingError
from training.models.backbones import ImageModel, check_weights_fit, create_model
from training.models.heads import check_head

WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "model.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ImageModelSpec:
    """What an image model is: enough to rebuild it and to read its outputs.

    classes: output names (class names for the label tasks, target names for regression).
    y_range: (low, high) the outputs are squashed into, or None.
    head, dropout: the head's kind (``linear`` | ``fastai``) and its dropout ``p``.
    """

    arch: str
    task: str
    n_out: int
    classes: list[str] | None = None
    y_range: tuple[float, float] | None = None
    dropout: float = 0.2
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    head: str = "linear"

    def __post_init__(self) -> None:
        check_head(self.head)
        if self.task not in IMAGE_TASKS:
            raise TrainingError(f"task must be one of {', '.join(IMAGE_TASKS)}, got {self.task!r}")
        if self.n_out < 1:
            raise TrainingError(f"n_out must be at least 1, got {self.n_out}")
        if self.classes is not None and len(self.classes) != self.n_out:
            raise TrainingError(
                f"classes has {len(self.classes)} names but n_out is {self.n_out}"
            )

    def to_dict(self) -> dict:
        return {
            "arch": self.arch,
            "task": self.task,
            "n_out": self.n_out,
            "classes": None if self.classes is None else list(self.classes),
            "y_range": None if self.y_range is None else [float(v) for v in self.y_range],
            "dropout": float(self.dropout),
            "head": self.head,
            "preprocessing": self.preprocessing.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ImageModelSpec:
        missing = [k for k in ("arch", "task", "n_out", "preprocessing") if k not in d]
        if missing:
            raise TrainingError(f"image model spec lacks {', '.join(missing)}")
        y_range = d.get("y_range")
        classes = d.get("classes")
        return cls(
            arch=str(d["arch"]),
            task=str(d["task"]),
            n_out=int(d["n_out"]),
            classes=None if classes is None else [str(c) for c in classes],
            y_range=None if y_range is None else (float(y_range[0]), float(y_range[1])),
            dropout=float(d.get("dropout", 0.2)),
            preprocessing=Preprocessing.from_dict(d["preprocessing"]),
            head=str(d.get("head", "linear")),
        )


def save_image_model(out_dir: str | Path, model: ImageModel, spec: ImageModelSpec) -> Path:
    """Write ``weights.safetensors`` and ``model.json`` into ``out_dir``; returns ``out_dir``."""
    from safetensors.torch import save_file

    if model.arch != spec.arch:
        raise TrainingError(f"spec arch {spec.arch!r} differs from the model's {model.arch!r}")
    if model.head_kind != spec.head:
        raise TrainingError(f"spec head {spec.head!r} differs from the model's "
                            f"{model.head_kind!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # Write beside, then rename, so a crash never leaves a half file under the final name.
    weights_tmp = out_dir / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, weights_tmp, metadata={"arch": spec.arch})
    os.replace(weights_tmp, out_dir / WEIGHTS_FILE)
    spec_tmp = out_dir / f".{SPEC_FILE}.tmp"
    spec_tmp.write_text(json.dumps({"format_version": FORMAT_VERSION, **spec.to_dict()}, indent=2))
    os.replace(spec_tmp, out_dir / SPEC_FILE)
    return out_dir


def read_image_model_spec(out_dir: str | Path) -> ImageModelSpec:
    """The spec in ``out_dir/model.json``, or a TrainingError naming the file."""
    path = Path(out_dir) / SPEC_FILE
    if not path.is_file():
        raise TrainingError(f"{path} not found: not a saved image model directory")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrainingError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise TrainingError(f"{path} does not hold a JSON object")
    try:
        if int(data.get("format_version", FORMAT_VERSION)) > FORMAT_VERSION:
            raise TrainingError(f"format_version {data['format_version']} is newer than this "
                                f"lensflow reads ({FORMAT_VERSION})")
        return ImageModelSpec.from_dict(data)
    except (TrainingError, KeyError, TypeError, ValueError, IndexError) as e:
        raise TrainingError(f"{path}: {e}") from e


def load_image_model(out_dir: str | Path) -> tuple[ImageModel, ImageModelSpec]:
    """Rebuild the model saved in ``out_dir`` and load its weights strictly; eval mode."""
    from safetensors.torch import load_file

    spec = read_image_model_spec(out_dir)
    path = Path(out_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise TrainingError(f"{path} not found")
    try:
        state = load_file(path, device="cpu")
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise TrainingError(f"{path} is not a readable safetensors file: {e}") from e
    model, _ = create_model(
        spec.arch, spec.n_out, "none", y_range=spec.y_range, dropout=spec.dropout,
        input_size=spec.preprocessing.input_size, head=spec.head,
    )
    check_weights_fit(model.state_dict(), state, f"{path} and {SPEC_FILE}")
    model.load_state_dict(state, strict=True)
    return model.eval(), spec
