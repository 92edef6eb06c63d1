"""The one runtime wrapper: a bundle's exported graph in ONNX Runtime, TorchScript or AOTInductor.

All take a numpy batch and return ``{output_name: array}`` (in the graph's output order), so the
parity gate and the scorers never care which one runs, and all are set up here alike: quiet
sessions, intra-op threads = the cores this process may use (``os.sched_getaffinity``, not the
machine's total), idle threads that do not spin. TorchScript and AOTInductor packages are code
(an AOTInductor ``.pt2`` holds a compiled shared library): they are loaded only when asked for,
and only bytes that hash to what the bundle's pinned manifest lists. ONNX Runtime asks for its
CUDA provider only when a GPU is really there (torch sees one *and* this ORT build has the
provider), so CPU-only machines get no provider-failure spam; ``device="cuda"`` without one is a
one-line :class:`RuntimeUnavailableError`. A CUDA session reads a CUDA torch tensor in place
(IO binding), so a batch decoded on the GPU never visits the host.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from export.bundle import Bundle
from export.errors import BundleIntegrityError, ExportError, GraphMismatchError
from export.loader_workers import available_cores
from export.manifest import IMAGE_OUTPUTS

KINDS = ("onnx", "torchscript", "aoti")
DEVICES = ("auto", "cpu", "cuda")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_SUFFIX = {"onnx": ".onnx", "torchscript": ".ts", "aoti": ".aoti.pt2"}


class RuntimeUnavailableError(ExportError):
    """The requested runtime or device is not usable here (e.g. ``device="cuda"`` with no GPU)."""


def cuda_present() -> bool:
    """Whether torch sees a usable CUDA GPU (the one check both runtimes agree on)."""
    import torch

    return torch.cuda.is_available()


def onnx_cuda_available() -> bool:
    """Whether ONNX Runtime can run on a GPU here: torch sees one and ORT has the provider."""
    import onnxruntime as ort

    return cuda_present() and CUDA in ort.get_available_providers()


def use_cuda(device: str, provider_available: bool = True) -> bool:
    """Whether to run on the GPU for ``device`` (auto | cpu | cuda); cuda without one refuses."""
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
    """ONNX Runtime ``InferenceSession`` on the CUDA provider when a GPU is there, else the CPU.

    tf32: let CUDA convolutions and matmuls use TF32 (off for the parity gate, which checks the
    graph at float32, not what a faster math mode trades away).
    """

    kind = "onnx"

    def __init__(self, path: Path, device: str = "auto", threads: int | None = None, *,
                 tf32: bool = True, sha256: str | None = None):
        import onnxruntime as ort

        cuda = use_cuda(device, CUDA in ort.get_available_providers())
        # CUDA: cuDNN's frontend logs an ERROR line for every convolution plan it cannot build
        # before falling back to one it can (187 lines for one fp16 lite0 session on an H200):
        # noise, since a session that cannot run raises. Real failures still raise here.
        ort.set_default_logger_severity(4 if cuda else 3)
        providers: list = [CPU]
        if cuda:
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()  # reuse the CUDA/cuDNN libraries the torch wheel installed
            providers = [(CUDA, {"use_tf32": "1" if tf32 else "0"}), CPU]
        # With sha256 the session is built from the very bytes that hashed to it.
        model = str(path) if sha256 is None else verified_bytes(path, sha256)
        self.session = ort.InferenceSession(model, session_options(threads), providers=providers)
        self.providers = self.session.get_providers()
        if cuda and CUDA not in self.providers:
            raise RuntimeUnavailableError(
                f"{path}: ONNX Runtime could not start its CUDA provider (active: "
                f"{self.providers})")
        self.device = "cuda" if CUDA in self.providers else "cpu"
        self.input_name = self.session.get_inputs()[0].name
        self.input_shape = list(self.session.get_inputs()[0].shape)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs) -> dict[str, np.ndarray]:
        """Outputs of a numpy batch, or of a torch tensor; a CUDA tensor on a CUDA session is
        bound in place (IO binding): the batch never visits the host, only the outputs do."""
        if self.device == "cuda" and getattr(inputs, "is_cuda", False):
            return self._run_bound(inputs)
        values = self.session.run(self.output_names, {self.input_name: as_numpy(inputs)})
        return dict(zip(self.output_names, values, strict=True))

    def _run_bound(self, images) -> dict[str, np.ndarray]:
        import torch

        images = images.contiguous()
        # torch fills the tensor on its own stream; ORT reads it on another.
        torch.cuda.current_stream(images.device).synchronize()
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", images.device.index or 0,
                           torch.empty((), dtype=images.dtype).numpy().dtype,
                           list(images.shape), images.data_ptr())
        for name in self.output_names:
            binding.bind_output(name, "cuda", images.device.index or 0)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu(), strict=True))


def as_numpy(inputs) -> np.ndarray:
    """A batch as a numpy array (a torch tensor is moved to the host first)."""
    if hasattr(inputs, "detach"):
        return inputs.detach().cpu().numpy()
    return inputs


def session_options(threads: int | None = None):
    """Quiet ONNX Runtime session options; ``threads`` intra-op threads (default every core
    this process may use)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1
    # Idle ORT threads would otherwise busy-wait on cores the decode workers need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def verified_bytes(path: Path, sha256: str | None) -> bytes:
    """A graph file's bytes, read once; with ``sha256`` (the digest the bundle's verified manifest
    lists) only when they hash to it, so a file swapped after verification is never loaded."""
    data = Path(path).read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise BundleIntegrityError(f"{path}: sha256 differs from the manifest's; not loaded")
    return data


class TorchScriptRuntime(Runtime):
    """``torch.jit.load`` of a ``.ts`` file, run under ``torch.inference_mode``.

    A TorchScript file is code. It is read into memory once and, with ``sha256`` (the digest the
    bundle's pinned manifest lists), loaded only when those very bytes hash to it, so a file
    swapped after verification is never run.
    output_names: names of a graph that returns a bare tensor or tuple.
    """

    kind = "torchscript"

    def __init__(self, path: Path, device: str = "auto",
                 output_names: list[str] | tuple[str, ...] = IMAGE_OUTPUTS,
                 input_name: str = "images", *, sha256: str | None = None):
        import torch

        from export.formats import quiet_torchscript

        self.device = "cuda" if use_cuda(device) else "cpu"
        data = verified_bytes(path, sha256)
        with quiet_torchscript():
            self.module = torch.jit.load(io.BytesIO(data), map_location=self.device).eval()
        self.input_name = input_name
        self.output_names = list(output_names)

    def run(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            x = inputs if torch.is_tensor(inputs) else torch.from_numpy(
                np.ascontiguousarray(inputs))
            result = self.module(x.to(self.device))
        if isinstance(result, dict):
            return {k: v.cpu().numpy() for k, v in result.items()}
        if isinstance(result, torch.Tensor):
            result = (result,)
        names = self.output_names if len(result) == len(self.output_names) \
            else [f"output_{i}" for i in range(len(result))]
        return {name: t.cpu().numpy() for name, t in zip(names, result, strict=True)}


class AotiRuntime(Runtime):
    """An AOTInductor package (``torch._inductor.aoti_load_package``) on the CPU it was
    compiled for, run under ``torch.inference_mode``.

    The package holds a compiled shared library. Its bytes are read once, checked against
    ``sha256`` and loaded from a private copy, so a file swapped after verification is never
    run. threads: torch intra-op threads (the package's kernels use torch's OpenMP pool);
    default every core this process may use.
    """

    kind = "aoti"

    def __init__(self, path: Path, device: str = "auto",
                 output_names: list[str] | tuple[str, ...] = IMAGE_OUTPUTS,
                 input_name: str = "images", *, sha256: str | None = None,
                 threads: int | None = None):
        import torch
        from torch._inductor import aoti_load_package

        # Packages are compiled for the CPU at export; "auto" on a GPU machine still runs here.
        if device == "cuda" or (device not in ("auto", "cpu")):
            use_cuda(device)  # an unknown device or cuda without a GPU: the usual one line
            raise RuntimeUnavailableError(
                f"{path}: this AOTInductor package was compiled for the CPU, not CUDA")
        self.device = "cpu"
        data = verified_bytes(path, sha256)
        torch.set_num_threads(threads or available_cores())
        with tempfile.TemporaryDirectory(prefix="lensflow-aoti-") as private:
            copy = Path(private) / "model.pt2"
            copy.write_bytes(data)
            os.chmod(copy, 0o400)
            self.module = aoti_load_package(str(copy))
        self.input_name = input_name
        self.output_names = list(output_names)

    def run(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            result = self.module(torch.as_tensor(np.ascontiguousarray(as_numpy(inputs))))
        if isinstance(result, torch.Tensor):
            result = (result,)
        names = self.output_names if len(result) == len(self.output_names) \
            else [f"output_{i}" for i in range(len(result))]
        return {name: t.numpy() for name, t in zip(names, result, strict=True)}


def open_bundle_graph(bundle: Bundle, kind: str = "onnx", device: str = "auto",
                      graph: str = "model", *, threads: int | None = None) -> Runtime:
    """Load ``<graph>.onnx``, ``<graph>.ts`` or ``<graph>.aoti.pt2`` of a bundle (files as its
    manifest names them).

    TorchScript and AOTInductor (code) are loaded only when ``kind`` asks for them. Every graph
    is loaded from bytes that hash to what the bundle's pinned manifest lists, so a caller that
    loaded the bundle without hashing every file (scoring) still runs only exported bytes. An
    image graph whose input size differs from the manifest's ``preprocessing.input_size`` is
    refused in one line.
    device: ``auto`` (CUDA when present), ``cpu`` or ``cuda`` (an error without a GPU).
    threads: ONNX Runtime (or torch, for AOTInductor) intra-op threads; default the cores
        available to this process.
    """
    if kind not in KINDS:
        raise RuntimeUnavailableError(f"runtime must be one of {', '.join(KINDS)}, got {kind!r}")
    declared = bundle.manifest.get("graphs", {}).get(graph, {})
    relpath = (declared.get("files") or {}).get(kind) or f"{graph}{_SUFFIX[kind]}"
    if not bundle.has_file(relpath):
        raise RuntimeUnavailableError(f"bundle {bundle.path}: has no {relpath} for runtime {kind}")
    sha256 = bundle.manifest["files"][relpath].get("sha256")
    if kind == "onnx":
        runtime = OnnxRuntime(bundle.file(relpath), device, threads, sha256=sha256)
        check_graph_input(bundle, graph, runtime.input_shape, relpath)
        return runtime
    onnx_file = (declared.get("files") or {}).get("onnx") or f"{graph}.onnx"
    if bundle.has_file(onnx_file):
        check_graph_input(bundle, graph, onnx_input_shape(bundle.file(onnx_file)), onnx_file)
    input_name, output_names = _graph_io(bundle, graph, declared)
    if kind == "aoti":
        return AotiRuntime(bundle.file(relpath), device, output_names, input_name,
                           sha256=sha256, threads=threads)
    return TorchScriptRuntime(bundle.file(relpath), device, output_names, input_name,
                              sha256=sha256)


def onnx_input_shape(path: Path) -> list:
    """Dims of an ONNX graph's first input (ints, or names of dynamic axes)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]


def check_graph_input(bundle: Bundle, graph: str, shape: Sequence, relpath: str) -> None:
    """Refuse an image graph whose fixed input size is not the manifest's ``input_size``."""
    prep = bundle.manifest.get("preprocessing")
    if graph != "model" or not isinstance(prep, dict) or "input_size" not in prep or not shape:
        return
    size = prep["input_size"]
    layout = prep.get("input_layout", "NHWC")
    spatial = list(shape[1:3] if layout == "NHWC" else shape[2:4])
    fixed = [d for d in spatial if isinstance(d, int) and d > 0]
    if len(shape) != 4 or any(d != size for d in fixed):
        raise GraphMismatchError(
            f"bundle {bundle.path}: manifest preprocessing.input_size {size} differs from "
            f"{relpath}'s input shape {[d if isinstance(d, int) else 'N' for d in shape]}")


def _graph_io(bundle: Bundle, graph: str, declared: dict) -> tuple[str, list[str]]:
    """Input and output names of a graph: the manifest's ``graphs.<graph>`` entry, else the
    sibling ONNX graph, else the names of an image bundle's graph."""
    if declared.get("outputs"):
        return declared.get("input", "images"), list(declared["outputs"])
    if bundle.has_file(f"{graph}.onnx"):
        import onnx

        proto = onnx.load(str(bundle.file(f"{graph}.onnx")), load_external_data=False)
        return proto.graph.input[0].name, [o.name for o in proto.graph.output]
    return "images", list(IMAGE_OUTPUTS)
