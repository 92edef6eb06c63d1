"""``export_bundle``: one call from a trained eager model to a committed, parity-checked bundle.

The per-format conversions live in ``export.formats``; this module is the recipe that uses them.

The recipe reads top to bottom: check the manifest, convert every graph (TorchScript, ONNX,
optional ``.pt2``), save the eager weights as safetensors, run the parity gate, write its report,
commit. A bundle whose parity failed is still committed, unsigned, so it can be inspected, then
``ParityError`` is raised with its path; ``promote`` refuses it and scoring refuses it unless
told otherwise. The commit records the bundle digest beside it, signed when a signing key is
given or ``$LENSFLOW_SIGNING_KEY`` is set and the gate passed.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_model
from torch import nn

from export.bundle import MANIFEST, PARITY, BundleWriter, load_bundle
from export.errors import ConversionError, ExportError, ParityError
from export.formats import GraphSpec, convert_graph, graph_specs
from export.manifest import IMAGE_TASKS, graph_precision
from export.parity import (
    PARITY_INPUTS,
    PRECISION_TOLERANCES,
    ParityReport,
    ParityTolerances,
    run_gate,
)
from export.signing import load_signing_key, signing_key_from_env

WEIGHTS = "weights.safetensors"
PARITY_MD = "parity.md"
BUNDLE_FORMAT = 1
VALIDATION_ROWS = 256  # enough to catch drift on real data, cheap enough for every export


@dataclass(frozen=True)
class ExportResult:
    """Where the bundle was committed, its identity, and the parity report that gated it."""

    bundle_path: Path
    name: str
    version: str
    sha256: str
    parity: ParityReport

    def to_dict(self) -> dict:
        return {"bundle_path": str(self.bundle_path), "name": self.name,
                "version": self.version, "sha256": self.sha256, "parity": self.parity.to_dict()}


def _normalised_manifest(manifest: dict) -> dict:
    manifest = dict(manifest)
    task = manifest.get("task")
    if task in IMAGE_TASKS:
        prep = manifest.get("preprocessing")
        prep = prep.to_dict() if hasattr(prep, "to_dict") else dict(prep or {})
        # The graph takes what PIL/numpy give: uint8 RGB, channels last.
        manifest["preprocessing"] = prep | {"input_layout": "NHWC", "input_dtype": "uint8"}
    return manifest


def _check_outputs(specs: list[GraphSpec], manifest: dict) -> None:
    if manifest["task"] not in ("single_label", "multi_label") or not manifest.get("classes"):
        return
    spec = specs[0]
    width = spec.run_eager(spec.sample(2, torch.Generator().manual_seed(0)))[0].shape[-1]
    if width != len(manifest["classes"]):
        raise ConversionError(f"manifest 'classes': {len(manifest['classes'])} names but the "
                              f"model outputs {width} scores")


def _image_validation(x: torch.Tensor, prep: dict) -> torch.Tensor:
    size = int(prep["input_size"])
    if x.dtype == torch.uint8 and x.ndim == 4 and tuple(x.shape[1:]) == (size, size, 3):
        return x
    if x.is_floating_point() and x.ndim == 4 and tuple(x.shape[1:]) == (3, size, size):
        # A normalised NCHW batch from a DataLoader: back to the uint8 pixels the graph takes.
        mean = torch.tensor(prep["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(prep["std"]).view(1, 3, 1, 1)
        pixels = ((x.float().cpu() * std + mean) * 255.0).round().clamp(0, 255)
        return pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    raise ExportError(f"validation_inputs: shape {tuple(x.shape)} {x.dtype} is neither uint8 "
                      f"(N, {size}, {size}, 3) nor normalised float (N, 3, {size}, {size})")


def _validation_batches(specs: list[GraphSpec], manifest: dict,
                        inputs: object) -> dict[str, torch.Tensor] | None:
    if inputs is None:
        return None
    x = torch.as_tensor(np.asarray(inputs) if not torch.is_tensor(inputs) else inputs)
    x = x[:VALIDATION_ROWS].cpu()
    if manifest["task"] in IMAGE_TASKS:
        return {"model": _image_validation(x, manifest["preprocessing"])}
    pairs_spec = specs[1]
    if x.ndim != 2 or x.shape[1] != 2 or x.is_floating_point():
        raise ExportError(f"validation_inputs: collab needs integer (N, 2) user/item pairs, "
                          f"got {tuple(x.shape)} {x.dtype}")
    x = x.long()
    bounds = torch.tensor(pairs_spec.input_high)
    if (x < 0).any() or (x >= bounds).any():
        raise ExportError("validation_inputs: a user or item index is outside the vocabulary")
    return {"pairs": x, "model": torch.unique(x[:, 0])[:64]}


def _copy_extras(bundle_dir: Path, plots_dir: Path | None,
                 extra_files: dict[str, Path] | None) -> None:
    if plots_dir is not None:
        shutil.copytree(plots_dir, bundle_dir / "plots", dirs_exist_ok=True)
    reserved = {MANIFEST, PARITY, PARITY_MD, PARITY_INPUTS, WEIGHTS}
    for rel, src in (extra_files or {}).items():
        target = bundle_dir / rel
        if rel in reserved or target.exists() or ".." in Path(rel).parts:
            raise ExportError(f"extra_files: {rel!r} clashes with a bundle file or leaves it")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def export_bundle(model: nn.Module, manifest: dict, registry: str | Path, name: str, *,
                  validation_inputs: object = None,
                  tolerances: ParityTolerances | None = None,
                  plots_dir: Path | None = None, extra_files: dict[str, Path] | None = None,
                  weights: bool = True, pt2: bool = True, aoti: bool = False,
                  signing_key: str | Path | None = None) -> ExportResult:
    """Convert, check parity and commit ``<registry>/<name>/<version>/``.

    validation_inputs: a real batch — images as uint8 (N, H, W, 3) or normalised float
        (N, 3, H, W); collab as int (N, 2) user/item index pairs. Up to 256 rows are used.
    tolerances: the gate's element and decision rule (default: the one for the manifest's
        ``precision``, ``export.parity.PRECISION_TOLERANCES``).
    aoti: also compile an AOTInductor package of each graph for this machine's CPU (minutes;
        a failed compile is recorded as the graph's ``aoti_error`` and the bundle goes on).
    signing_key: EC private key PEM that signs the bundle, model-signing format (default
        ``$LENSFLOW_SIGNING_KEY``; unsigned when neither is set or the gate failed).
    Raises ``ParityError`` (after committing the bundle, unsigned) when an export diverges.
    """
    # A bad key fails here, before minutes of conversion.
    key = load_signing_key(signing_key) if signing_key else signing_key_from_env()
    manifest = _normalised_manifest(manifest)
    tolerances = tolerances or PRECISION_TOLERANCES[graph_precision(manifest)]
    # Export runs on CPU and must neither move nor mode-switch the caller's model.
    model = copy.deepcopy(model).cpu().float().eval()
    specs = graph_specs(model, manifest)
    _check_outputs(specs, manifest)
    validation = _validation_batches(specs, manifest, validation_inputs)
    with BundleWriter(registry, name) as writer:
        out = writer.dir
        graphs = {spec.name: convert_graph(spec, out, pt2=pt2, aoti=aoti) for spec in specs}
        if weights:
            save_model(model, str(out / WEIGHTS))
        report = run_gate(specs, graphs, out, manifest, tolerances, validation)
        (out / PARITY).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        (out / PARITY_MD).write_text(report.to_markdown())
        _copy_extras(out, plots_dir, extra_files)
        path = writer.commit(manifest | {
            "bundle_format": BUNDLE_FORMAT,
            "graphs": graphs,
            "weights": WEIGHTS if weights else None,
            "parity": {"passed": report.passed, "tolerances": tolerances.to_dict(),
                       "inputs": PARITY_INPUTS},
        }, signing_key=key if report.passed else None)  # a failed gate is never signed
    if not report.passed:
        failures = report.failures()
        more = f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
        raise ParityError(f"bundle {path}: parity failed — {'; '.join(failures[:3])}{more} "
                          "(kept unsigned for inspection)", bundle_path=path, report=report)
    bundle = load_bundle(path)
    return ExportResult(path, bundle.name, bundle.version, bundle.sha256, report)
