"""The parity gate: exports must compute what the eager model computes, within tolerances.

At export every graph is run in eager PyTorch (the reference), TorchScript, the AOTInductor
package when the bundle has one, and ONNX Runtime on
a real validation batch (when given) and on random valid inputs at batch sizes 1, 7 and 64 — sizes
the export never saw, which catches a batch axis baked in as a constant. An element passes when
``|a - b| <= atol + rtol * |b|`` (``numpy.allclose``'s rule, b the reference). Decisions must
agree too: top-1 class for single_label, thresholded labels for multi_label; a row whose
reference is within tolerance of the decision boundary cannot be decided and is not counted.

The random inputs and their eager outputs are stored in the bundle (``parity_inputs.safetensors``)
so ``check_bundle`` can re-run the gate from the bundle alone, without the training code. It
runs ONNX Runtime only unless asked for TorchScript: a ``.ts`` file is code, and a registry
reader should not run code it did not ask for.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from export.bundle import PARITY, Bundle, load_bundle
from export.errors import BundleIntegrityError
from export.formats import GraphSpec
from export.manifest import thresholds_for
from export.runtime import (
    AotiRuntime,
    OnnxRuntime,
    Runtime,
    RuntimeUnavailableError,
    TorchScriptRuntime,
    check_graph_input,
    onnx_cuda_available,
)

PARITY_INPUTS = "parity_inputs.safetensors"
RANDOM_BATCHES = (1, 7, 64)
SEED = 0


@dataclass(frozen=True)
class ParityTolerances:
    """Element rule ``|a-b| <= atol + rtol*|b|``; ``min_agreement`` of decisions per input."""

    atol: float = 1e-4
    rtol: float = 1e-3
    min_agreement: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


#: The gate's tolerances for a graph of each ``precision`` (``export.manifest.PRECISIONS``).
#: fp16 keeps 10 mantissa bits (~3 significant digits) and freezing folds batch-norm into the
#: half weights, so its elements may drift by a few hundredths: on an H200 (gpu_check.py) lite0
#: drifted up to 0.017 (TorchScript, CPU) and 0.013 (ONNX Runtime CUDA) from the fp32 model on
#: the gate's random images, resnet50 up to 0.046 on its logits of ~|5|. Hence 3e-2 + 1% of the
#: reference, about twice the worst seen; decisions must still agree wherever the fp32 reference
#: is more decisive than that.
PRECISION_TOLERANCES = {"fp32": ParityTolerances(),
                        "fp16": ParityTolerances(atol=3e-2, rtol=1e-2)}


@dataclass(frozen=True)
class ParityRow:
    """One runtime on one input of one graph, against the reference outputs.

    ``max_rel`` is taken over elements whose reference exceeds ``atol`` in magnitude (relative
    error of a near-zero value says nothing); ``agreement`` is None for regression and collab.
    """

    graph: str
    runtime: str
    input: str
    batch: int
    max_abs: float
    max_rel: float
    agreement: float | None
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ParityReport:
    passed: bool
    tolerances: ParityTolerances
    rows: tuple[ParityRow, ...]

    @property
    def real_inputs(self) -> bool:
        """Whether a real batch (validation images, the user's sample) was among the inputs;
        without one the gate saw seeded random inputs only."""
        return any(r.input == "validation" for r in self.rows)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "tolerances": self.tolerances.to_dict(),
                "inputs": "real and seeded random" if self.real_inputs else "seeded random only",
                "rows": [r.to_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, d: dict) -> ParityReport:
        return cls(passed=bool(d["passed"]), tolerances=ParityTolerances(**d["tolerances"]),
                   rows=tuple(ParityRow(**r) for r in d["rows"]))

    def failures(self) -> list[str]:
        """One line per failing row: which runtime diverged on which input, and by how much."""
        t = self.tolerances
        lines = []
        for r in self.rows:
            if r.passed:
                continue
            why = [f"max_abs {r.max_abs:.3g} (atol {t.atol:g}, rtol {t.rtol:g})"]
            if r.agreement is not None and r.agreement < t.min_agreement:
                why.append(f"agreement {r.agreement:.4f} < {t.min_agreement:g}")
            lines.append(f"{r.runtime} on {r.graph}/{r.input} (batch {r.batch}): "
                         + ", ".join(why))
        return lines

    def to_markdown(self) -> str:
        t = self.tolerances
        head = (f"**Parity {'passed' if self.passed else 'FAILED'}** — atol {t.atol:g}, "
                f"rtol {t.rtol:g}, min agreement {t.min_agreement:g}\n\n"
                + ("" if self.real_inputs else
                   "Inputs: seeded random only — no real data was checked.\n\n") +
                "| graph | runtime | input | batch | max abs | max rel | agreement | ok |\n"
                "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |\n")
        body = "".join(
            f"| {r.graph} | {r.runtime} | {r.input} | {r.batch} | {r.max_abs:.2e} | "
            f"{r.max_rel:.2e} | {'—' if r.agreement is None else f'{r.agreement:.4f}'} | "
            f"{'✅' if r.passed else '❌'} |\n" for r in self.rows)
        return head + body


def _agreement(task: str, out: np.ndarray, ref: np.ndarray, tol: ParityTolerances,
               thresholds: np.ndarray | None) -> float | None:
    if task == "single_label":
        if ref.shape[-1] < 2:
            return 1.0
        top2 = np.sort(ref, axis=-1)[:, -2:]
        decisive = (top2[:, 1] - top2[:, 0]) > tol.atol + tol.rtol * np.abs(top2[:, 1])
        same = out.argmax(-1) == ref.argmax(-1)
        return float(np.mean(same | ~decisive))
    if task == "multi_label":
        t = thresholds if thresholds is not None else np.full(ref.shape[-1], 0.5)
        decisive = np.abs(ref - t) > tol.atol + tol.rtol * np.abs(t)
        same = (out >= t) == (ref >= t)
        return float(np.mean(same | ~decisive))
    return None


def compare(graph: str, runtime: str, input_name: str, outputs: Sequence[np.ndarray],
            reference: Sequence[np.ndarray], task: str, tol: ParityTolerances,
            thresholds: np.ndarray | None = None) -> ParityRow:
    """Row of one runtime's outputs against the reference outputs (first output = scores)."""
    batch = int(reference[0].shape[0])
    if len(outputs) != len(reference) or any(
            o.shape != r.shape for o, r in zip(outputs, reference, strict=False)):
        return ParityRow(graph, runtime, input_name, batch, float("inf"), float("inf"),
                         0.0 if task in ("single_label", "multi_label") else None, False)
    max_abs, max_rel, within = 0.0, 0.0, True
    for o, r in zip(outputs, reference, strict=True):
        o64, r64 = o.astype(np.float64), r.astype(np.float64)
        diff = np.abs(o64 - r64)
        within &= bool(np.all(diff <= tol.atol + tol.rtol * np.abs(r64)))
        max_abs = max(max_abs, float(np.max(diff, initial=0.0)))
        big = np.abs(r64) > tol.atol
        if big.any():
            max_rel = max(max_rel, float(np.max(diff[big] / np.abs(r64[big]))))
    if np.isnan(max_abs):
        within = False
    agreement = _agreement(task, outputs[0], reference[0], tol, thresholds)
    passed = within and (agreement is None or agreement >= tol.min_agreement)
    return ParityRow(graph, runtime, input_name, batch, max_abs, max_rel, agreement, passed)


def gate_runtimes(bundle_dir: Path, entry: dict, *, torchscript: bool = True,
                  files: dict | None = None) -> dict[str, Runtime]:
    """Runtime label → loaded graph, for every runtime worth comparing here.

    entry: the graph's manifest entry (``files``, ``input``, ``outputs``). TorchScript and the
    AOTInductor package when the bundle has one (code, so only when ``torchscript``) run on the
    CPU; ONNX Runtime on the CPU and, where a GPU and the
    provider exist, on CUDA with TF32 off. A CUDA provider that fails to start is left out, as a
    machine without one would be.
    files: the manifest's file table; TorchScript bytes must then hash to what it lists.
    """
    names = entry["files"]
    runtimes: dict[str, Runtime] = {}
    if torchscript:
        expected = ((files or {}).get(names["torchscript"]) or {}).get("sha256")
        runtimes["torchscript"] = TorchScriptRuntime(
            bundle_dir / names["torchscript"], "cpu", entry.get("outputs") or (),
            entry.get("input", ""), sha256=expected)
        if names.get("aoti"):
            runtimes["aoti"] = AotiRuntime(
                bundle_dir / names["aoti"], "cpu", entry.get("outputs") or (),
                entry.get("input", ""),
                sha256=((files or {}).get(names["aoti"]) or {}).get("sha256"))
    runtimes["onnxruntime-cpu"] = OnnxRuntime(bundle_dir / names["onnx"], "cpu")
    if onnx_cuda_available():
        try:
            runtimes["onnxruntime-cuda"] = OnnxRuntime(bundle_dir / names["onnx"], "cuda",
                                                       tf32=False)
        except RuntimeUnavailableError:
            pass
    return runtimes


def _outputs(runtime: Runtime, x: np.ndarray) -> list[np.ndarray]:
    return list(runtime.run(x).values())


def _gate_inputs(spec: GraphSpec,
                 validation: torch.Tensor | None) -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(SEED)
    inputs = [("validation", validation)] if validation is not None else []
    return inputs + [(f"random-b{b}", spec.sample(b, generator)) for b in RANDOM_BATCHES]


def run_gate(specs: Sequence[GraphSpec], graphs: dict[str, dict], bundle_dir: Path,
             manifest: dict, tolerances: ParityTolerances,
             validation: dict[str, torch.Tensor] | None = None) -> ParityReport:
    """Compare every runtime with eager on every input; write ``parity_inputs.safetensors``.

    ``graphs`` is the manifest's graph table (file names); ``validation`` maps graph name to a
    real input batch already in the graph's input format.
    """
    task, rows, stored = manifest["task"], [], {}
    for spec in specs:
        runtimes = gate_runtimes(bundle_dir, graphs[spec.name])
        for input_name, x in _gate_inputs(spec, (validation or {}).get(spec.name)):
            reference = [t.numpy() for t in spec.run_eager(x)]
            if input_name != "validation":
                # Copies: safetensors refuses aliases (regression's scores *are* its logits).
                stored[f"{spec.name}/{input_name}/input"] = x.clone().contiguous()
                for out_name, ref in zip(spec.output_names, reference, strict=True):
                    stored[f"{spec.name}/{input_name}/output/{out_name}"] = torch.tensor(ref)
            thresholds = (thresholds_for(manifest, reference[0].shape[-1])
                          if task == "multi_label" else None)
            for label, runtime in runtimes.items():
                rows.append(compare(spec.name, label, input_name, _outputs(runtime, x.numpy()),
                                    reference, task, tolerances, thresholds))
    save_file(stored, str(bundle_dir / PARITY_INPUTS))
    return ParityReport(all(r.passed for r in rows), tolerances, tuple(rows))


def _stored_cases(tensors: dict[str, torch.Tensor], graph: str,
                  output_names: list[str]) -> list[tuple[str, np.ndarray, list[np.ndarray]]]:
    names = sorted({k.split("/")[1] for k in tensors if k.startswith(graph + "/")},
                   key=lambda n: (len(n), n))
    return [(n, tensors[f"{graph}/{n}/input"].numpy(),
             [tensors[f"{graph}/{n}/output/{o}"].numpy() for o in output_names]) for n in names]


def check_bundle(bundle_path: str | Path | Bundle, tolerances: ParityTolerances | None = None,
                 *, torchscript: bool = False) -> ParityReport:
    """Re-run the gate from a written bundle: digest and hashes, then ONNX Runtime (and
    TorchScript, which is code, only when ``torchscript``) against the eager outputs stored at
    export (tolerances default to the ones the bundle passed with).

    bundle_path: a bundle reference, or a :class:`Bundle` ``load_bundle`` has just checked.
    """
    bundle = bundle_path if isinstance(bundle_path, Bundle) else load_bundle(bundle_path)
    manifest = bundle.manifest
    if tolerances is None:
        stored_tol = json.loads(bundle.file(PARITY).read_text()).get("tolerances") \
            if bundle.has_file(PARITY) else None
        tolerances = ParityTolerances(**stored_tol) if stored_tol else ParityTolerances()
    if not manifest.get("graphs"):
        raise BundleIntegrityError(f"bundle {bundle.path}: manifest lists no graphs to check")
    tensors = load_file(str(bundle.file(PARITY_INPUTS)))
    rows = []
    for graph, entry in manifest.get("graphs", {}).items():
        output_names = list(entry["outputs"])
        cases = _stored_cases(tensors, graph, output_names)
        if not cases:
            raise BundleIntegrityError(f"bundle {bundle.path}: {PARITY_INPUTS} has no inputs "
                                       f"for graph {graph!r}")
        runtimes = gate_runtimes(bundle.path, entry, torchscript=torchscript,
                                 files=manifest["files"])
        onnx_runtime = runtimes["onnxruntime-cpu"]
        check_graph_input(bundle, graph, getattr(onnx_runtime, "input_shape", []),
                          entry["files"]["onnx"])
        for input_name, x, reference in cases:
            thresholds = (thresholds_for(manifest, reference[0].shape[-1])
                          if bundle.task == "multi_label" else None)
            for label, runtime in runtimes.items():
                rows.append(compare(graph, label, input_name, _outputs(runtime, x), reference,
                                    bundle.task, tolerances, thresholds))
    return ParityReport(all(r.passed for r in rows), tolerances, tuple(rows))
