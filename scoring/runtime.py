"""Runtimes that run a bundle's exported graph: ONNX Runtime (CUDA or CPU provider), TorchScript.

Both take a numpy batch and return ``{output_name: array}``, so a scorer never cares which one
runs. ONNX Runtime asks for its CUDA provider only when a GPU is really there (torch sees one and
this ORT build has the provider), so CPU-only machines get no provider-failure spam;
``device="cuda"`` without a GPU is a one-line :class:`RuntimeUnavailableError`. Intra-op threads
default to the cores this process may use (``os.sched_getaffinity``), not the machine's total.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from export.bundle import Bundle
from export.loader_workers import available_cores
from scoring.errors import RuntimeUnavailableError

KINDS = ("onnx", "torchscript")
DEVICES = ("auto", "cpu", "cuda")
_SUFFIX = {"onnx": ".onnx", "torchscript": ".ts"}
# Output names of an image bundle's graph when TorchScript returns a bare tuple.
IMAGE_OUTPUTS = ("scores", "logits")


def cuda_present() -> bool:
    """Whether torch sees a usable CUDA GPU (the one check both runtimes agree on)."""
    import torch

    return torch.cuda.is_available()


class Runtime:
    """One loaded graph. ``run`` maps a batch to named outputs."""

    kind: str
    device: str
    input_name: str
    output_names: list[str]

    def run(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.kind}/{self.device}"


class OnnxRuntime(Runtime):
    """ONNX Runtime ``InferenceSession`` on the CUDA provider when a GPU is there, else the CPU."""

    kind = "onnx"

    def __init__(self, path: Path, device: str, threads: int | None = None):
        import onnxruntime as ort

        use_cuda = _resolve_cuda(device, "CUDAExecutionProvider" in ort.get_available_providers())
        ort.set_default_logger_severity(3)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads or available_cores()
        # Idle ORT threads would otherwise busy-wait on cores the decode workers need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if use_cuda:
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()  # reuse the CUDA/cuDNN libraries the torch wheel installed
            providers = ["CUDAExecutionProvider", *providers]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        active = self.session.get_providers()
        if use_cuda and "CUDAExecutionProvider" not in active:
            raise RuntimeUnavailableError(
                f"{path}: ONNX Runtime could not start its CUDA provider (active: {active})")
        self.device = "cuda" if "CUDAExecutionProvider" in active else "cpu"
        self.providers = active
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        values = self.session.run(self.output_names, {self.input_name: inputs})
        return dict(zip(self.output_names, values, strict=True))


class TorchScriptRuntime(Runtime):
    """``torch.jit.load`` of the bundle's ``.ts``, run under ``torch.inference_mode``."""

    kind = "torchscript"

    def __init__(self, path: Path, device: str, output_names: list[str], input_name: str):
        import torch

        self.device = "cuda" if _resolve_cuda(device, True) else "cpu"
        with warnings.catch_warnings():
            # TorchScript is the bundle's second format by design; its deprecation note is noise.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated")
            self.module = torch.jit.load(str(path), map_location=self.device).eval()
        self.input_name = input_name
        self.output_names = list(output_names)

    def run(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            result = self.module(torch.from_numpy(np.ascontiguousarray(inputs)).to(self.device))
        if isinstance(result, dict):
            return {k: v.cpu().numpy() for k, v in result.items()}
        if isinstance(result, torch.Tensor):
            result = (result,)
        if len(result) != len(self.output_names):
            self.output_names = [f"output_{i}" for i in range(len(result))]
        return {name: t.cpu().numpy() for name, t in zip(self.output_names, result, strict=True)}


def _resolve_cuda(device: str, provider_available: bool) -> bool:
    if device not in DEVICES:
        raise RuntimeUnavailableError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return False
    gpu = cuda_present()
    if device == "cuda" and not gpu:
        raise RuntimeUnavailableError("device 'cuda' requested but no CUDA GPU is available")
    if device == "cuda" and not provider_available:
        raise RuntimeUnavailableError(
            "device 'cuda' requested but this onnxruntime has no CUDAExecutionProvider")
    return gpu and provider_available


def _graph_io(bundle: Bundle, graph: str) -> tuple[str, list[str]]:
    """Input and output names of a graph whose TorchScript form does not name them.

    From the manifest's ``graphs.<graph>`` entry, else the sibling ONNX graph, else the names of
    an image bundle's graph.
    """
    declared = bundle.manifest.get("graphs", {}).get(graph, {})
    if declared.get("outputs"):
        return declared.get("input", "images"), list(declared["outputs"])
    if bundle.has_file(f"{graph}.onnx"):
        import onnx

        proto = onnx.load(str(bundle.file(f"{graph}.onnx")), load_external_data=False)
        return proto.graph.input[0].name, [o.name for o in proto.graph.output]
    return "images", list(IMAGE_OUTPUTS)


def open_runtime(
    bundle: Bundle,
    kind: str = "onnx",
    device: str = "auto",
    graph: str = "model",
    *,
    threads: int | None = None,
) -> Runtime:
    """Load ``<graph>.onnx`` or ``<graph>.ts`` of a bundle on the requested device.

    device: ``auto`` (CUDA when present), ``cpu`` or ``cuda`` (an error without a GPU).
    threads: ONNX Runtime intra-op threads; default the cores available to this process.
    """
    if kind not in KINDS:
        raise RuntimeUnavailableError(f"runtime must be one of {', '.join(KINDS)}, got {kind!r}")
    declared = bundle.manifest.get("graphs", {}).get(graph, {}).get("files") or {}
    relpath = declared.get(kind) or f"{graph}{_SUFFIX[kind]}"
    if not bundle.has_file(relpath):
        raise RuntimeUnavailableError(f"bundle {bundle.path}: has no {relpath} for runtime {kind}")
    if kind == "onnx":
        return OnnxRuntime(bundle.file(relpath), device, threads)
    input_name, output_names = _graph_io(bundle, graph)
    return TorchScriptRuntime(bundle.file(relpath), device, output_names, input_name)
