"""The runtimes the parity gate runs a bundle's exports in: TorchScript and ONNX Runtime.

ONNX Runtime always runs on ``CPUExecutionProvider``; ``CUDAExecutionProvider`` joins only when
PyTorch sees a GPU *and* ONNX Runtime lists the provider — requesting CUDA on a machine without
one makes ONNX Runtime log errors and silently fall back, which would mislabel the comparison.
The gate runs CUDA with TF32 off: it checks that the graph is right at float32, not how much
precision a faster math mode trades away.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.formats import quiet_torchscript

Runner = Callable[[np.ndarray], list[np.ndarray]]
Provider = str | tuple[str, dict[str, str]]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def onnx_provider_sets() -> dict[str, list[Provider]]:
    """Runtime label → ONNX Runtime provider list, for every provider worth comparing here."""
    sets: dict[str, list[Provider]] = {"onnxruntime-cpu": [CPU]}
    if torch.cuda.is_available() and CUDA in ort.get_available_providers():
        sets["onnxruntime-cuda"] = [(CUDA, {"use_tf32": "0"}), CPU]
    return sets


def session_options() -> ort.SessionOptions:
    """Quiet sessions with intra-op threads matching PyTorch's (its default is physical cores)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    return options


def onnx_runner(path: Path, providers: list[Provider]) -> Runner | None:
    """A function running the ONNX model, or None when the first provider did not load."""
    session = ort.InferenceSession(str(path), session_options(), providers=providers)
    wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
    if session.get_providers()[0] != wanted:
        return None
    input_name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> list[np.ndarray]:
        return session.run(None, {input_name: x})

    return run


def torchscript_runner(path: Path) -> Runner:
    """A function running the TorchScript module on CPU."""
    with quiet_torchscript():
        module = torch.jit.load(str(path), map_location="cpu")
    module.eval()

    def run(x: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            out = module(torch.from_numpy(x))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.numpy() for o in outputs]

    return run


def graph_runners(bundle_dir: Path, files: dict[str, str | None]) -> dict[str, Runner]:
    """Runtime label → runner for one graph whose file names are ``files`` (manifest entry)."""
    runners = {"torchscript": torchscript_runner(bundle_dir / files["torchscript"])}
    for label, providers in onnx_provider_sets().items():
        runner = onnx_runner(bundle_dir / files["onnx"], providers)
        if runner is not None:
            runners[label] = runner
    return runners
