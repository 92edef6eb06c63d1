"""Bring your own model: a state dict trained elsewhere → a parity-checked bundle, top to bottom.

read the checkpoint → name the outputs (class file, ``num_outputs`` or the checkpoint's own
classifier) → build the architecture with its own classifier and load the weights strictly →
the input recipe (the architecture's, with overrides) → a sample of the user's own images for
the parity gate → ``export.convert.export_bundle``: the same export, gate and commit a lensflow
training output gets. The bundle's lineage records where the weights came from (file name,
sha256) and which images the gate saw. Promotion stays with the caller (``export.bundle.promote``),
as after ``export_training_output``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.convert import VALIDATION_ROWS, ExportResult, export_bundle
from export.manifest import POINT_FRAME
from export.pixels import Preprocessing, decode_for_model, is_image_name
from training.errors import TrainingError
from training.models.library_model import (
    checkpoint_outputs,
    classifier_keys,
    load_checkpoint,
    read_state_dict,
)
from training.recipes.import_options import ImportOptions
from training.recipes.training_output import code_version, fingerprint_items, fingerprint_path

#: Said when there is no sample: the gate then sees seeded random pixels only.
NO_SAMPLE_NOTE = ("no sample images: parity checked on seeded random inputs only; pass a folder "
                  "of your own images (--sample-images) so the gate checks real data "
                  "(recommended)")


@dataclass(frozen=True)
class ImportResult:
    """The committed bundle and what its parity gate ran on."""

    export: ExportResult
    sample_images: int
    notes: tuple[str, ...]

    def to_dict(self) -> dict:
        return {**self.export.to_dict(), "sample_images": self.sample_images,
                "notes": list(self.notes)}


def import_checkpoint(checkpoint: str | Path, registry: str | Path, name: str,
                      options: ImportOptions, *, classes: str | Path | None = None,
                      sample_images: str | Path | None = None,
                      warn: Callable[[str], None] | None = None) -> ImportResult:
    """Export ``checkpoint`` (a state dict of ``options.arch``) to ``registry/name`` and run the
    parity gate, on ``sample_images`` (a folder of the user's images) when given.

    classes: a text file with one output name per line (class, target or point coordinate).
    warn: told ``NO_SAMPLE_NOTE`` once the checkpoint fits, when there is no sample folder.
    Raises ``ParityError`` (with the committed bundle's path) when an export is not faithful.
    """
    checkpoint = Path(checkpoint).expanduser()
    state = read_state_dict(checkpoint)
    names = read_names(classes) if classes is not None else None
    n_out = _outputs(options, names, state, classes)
    model, arch_prep = load_checkpoint(options.arch, n_out, state, f"checkpoint {checkpoint}")
    prep = preprocessing(arch_prep, options)
    sample, sample_record = _sample(sample_images, prep)
    manifest = {
        "task": "regression" if options.task == "points" else options.task,
        "arch": options.arch,
        "classes": names or default_names(options.task, n_out),
        "preprocessing": prep.to_dict(),
        "thresholds": _thresholds(options, n_out),
        "targets": _targets(options.task, names, n_out),
        "lineage": {
            "source": "imported",
            "task": options.task,
            "weights": {"file": checkpoint.name, **fingerprint_path(checkpoint)},
            "classes_file": (fingerprint_path(Path(classes).expanduser())
                             if classes is not None else None),
            "options": options.model_dump(),
            "parity_sample": sample_record,
            "code": code_version(),
        },
    }
    if sample is None and warn is not None:
        warn(NO_SAMPLE_NOTE)
    result = export_bundle(model, manifest, registry, name, validation_inputs=sample,
                           pt2=options.pt2)
    notes = () if sample is not None else (NO_SAMPLE_NOTE,)
    return ImportResult(result, 0 if sample is None else len(sample), notes)


def read_names(path: str | Path) -> list[str]:
    """One output name per non-blank line; a repeated name is an error naming its line."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TrainingError(f"classes {path}: cannot read ({e})") from None
    names: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        name = line.strip()
        if not name:
            continue
        if name in names:
            raise TrainingError(f"classes {path}, line {number}: {name!r} repeats line "
                                f"{names[name]}")
        names[name] = number
    if not names:
        raise TrainingError(f"classes {path}: no names (one per line)")
    return list(names)


def default_names(task: str, n_out: int) -> list[str]:
    """Names of unnamed outputs: the class index, or x0, y0, x1, y1, ... for points."""
    if task == "points":
        return [f"{axis}{i}" for i in range(n_out // 2) for axis in "xy"]
    return [str(i) for i in range(n_out)]


def _outputs(options: ImportOptions, names: list[str] | None, state: dict[str, torch.Tensor],
             classes: str | Path | None) -> int:
    """The number of outputs, checked against every source that states one."""
    declared = len(names) if names else options.num_outputs
    source = f"classes {classes}: {len(names)} names" if names else \
        f"--num-outputs {options.num_outputs}"
    if names and options.num_outputs is not None and options.num_outputs != len(names):
        raise TrainingError(f"{source} but --num-outputs is {options.num_outputs}")
    found = checkpoint_outputs(state, classifier_keys(options.arch))
    if found is not None and declared is not None and found[1] != declared:
        raise TrainingError(f"{source} but the checkpoint's classifier ({found[0]}) has "
                            f"{found[1]} outputs")
    n_out = declared or (found[1] if found else None)
    if n_out is None:  # no classifier in the checkpoint: the key check will say which are missing
        n_out = 1
    if options.task == "points" and n_out % 2:
        raise TrainingError(f"--task points: {n_out} outputs are not x,y pairs")
    return n_out


def preprocessing(arch_prep: Preprocessing, options: ImportOptions) -> Preprocessing:
    """The architecture's input recipe with the options' overrides applied."""
    size = options.input_size or arch_prep.input_size
    # At another input size the resize keeps the architecture's ratio, rounded down as timm's
    # eval transform does (floor(size / crop_pct)).
    resize = options.resize_size or (
        arch_prep.resize_size if size == arch_prep.input_size
        else math.floor(size * arch_prep.resize_size / arch_prep.input_size + 1e-6))
    return Preprocessing(
        input_size=size,
        resize_size=resize,
        mean=_rgb(options.mean, "mean") if options.mean else arch_prep.mean,
        std=_rgb(options.std, "std") if options.std else arch_prep.std,
        interpolation=options.interpolation or arch_prep.interpolation,
    )


def _rgb(text: str, option: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in text.split(","))
    if option == "std" and min(values) <= 0:
        raise TrainingError(f"--std {text}: every channel's std must be positive")
    return values  # type: ignore[return-value]


def _thresholds(options: ImportOptions, n_out: int) -> float | list[float] | None:
    if options.task != "multi_label":
        return None
    values = [float(v) for v in options.thresholds.split(",")]
    if len(values) not in (1, n_out):
        raise TrainingError(f"--thresholds: {len(values)} values for {n_out} classes (give one, "
                            "or one per class)")
    return values[0] if len(values) == 1 else values


def _targets(task: str, names: list[str] | None, n_out: int) -> dict | None:
    """What regression outputs mean, as training writes it for the manifest."""
    if task == "regression":
        return {"kind": "values", "names": names or default_names(task, n_out)}
    if task == "points":
        labels = names or default_names(task, n_out)
        return {"kind": "points", "names": labels,
                "points": [labels[i:i + 2] for i in range(0, n_out, 2)], "frame": POINT_FRAME,
                "range": [-1.0, 1.0]}
    return None


def _sample(folder: str | Path | None, prep: Preprocessing) -> tuple[torch.Tensor | None, dict]:
    """Up to ``VALIDATION_ROWS`` of the folder's images, spread over its sorted files, as the
    uint8 NHWC batch the graph takes; and the record of them for the lineage."""
    if folder is None:
        return None, {"images": 0, "note": NO_SAMPLE_NOTE}
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise TrainingError(f"sample images {root}: no such directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_image_name(p.name))
    if not files:
        raise TrainingError(f"sample images {root}: no image files")
    picked = [files[i] for i in np.unique(
        np.linspace(0, len(files) - 1, min(len(files), VALIDATION_ROWS)).round().astype(int))]
    images = []
    for path in picked:
        try:
            images.append(torch.from_numpy(decode_for_model(path, prep).copy()))
        except Exception as e:  # Pillow raises many types for a file that is not an image
            raise TrainingError(f"sample image {path}: cannot decode ({e})") from None
    record = {"images": len(images), "of": len(files),
              **fingerprint_items(root, [(p, "") for p in picked])}
    return torch.stack(images).contiguous(), record
