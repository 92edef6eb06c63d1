"""Format conversions of an exportable graph: TorchScript, ONNX and a torch.export program.

TorchScript is traced (``torch.jit.trace``) and frozen (``torch.jit.freeze``, which folds
batch-norm into convolutions and inlines weights); ONNX goes through the torch.export-based
exporter (``torch.onnx.export(dynamo=True)``, opset 18) with a symbolic ``batch`` axis and is
checked with ``onnx.checker``; the ``.pt2`` ExportedProgram (``torch.export.export`` +
``torch.export.save``) is optional — a model torch.export cannot capture still gets the other two.
So is the AOTInductor package (``<name>.aoti.pt2``: ``torch._inductor.aoti_compile_and_package``
of that program, compiled C++ for this machine's CPU, weights frozen in), which needs a C++
compiler and minutes of CPU, and is made only when asked for.
See the PyTorch docs "torch.export-based ONNX exporter", "TorchScript: tracing vs scripting" and
"AOTInductor: Ahead-Of-Time Compilation for Torch.Export-ed Models".
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from export.errors import ConversionError
from export.manifest import IMAGE_TASKS, graph_precision, point_frame, tta_views
from export.wrappers import (
    CollabPairsWrapper,
    CollabUsersWrapper,
    ImageExportWrapper,
    check_collab_model,
)

OPSET = 18
# torch.export specialises a dimension of size 0 or 1, so the example batch must be larger.
EXAMPLE_BATCH = 2


@dataclass(frozen=True)
class GraphSpec:
    """One graph of a bundle: the wrapped module, its single input and its named outputs.

    ``input_high`` bounds valid input values per last-axis column (256 for uint8 pixels,
    ``n_users`` for users, ``(n_users, n_items)`` for pairs) so random inputs are always valid.
    """

    name: str
    module: nn.Module = field(repr=False)
    input_name: str
    input_shape: tuple[int, ...]  # without the batch axis
    input_dtype: torch.dtype
    input_high: tuple[int, ...]
    output_names: tuple[str, ...]
    #: What the gate compares against: the fp32 eager graph when ``module`` runs in reduced
    #: precision, so the gate measures what the precision costs against the trained model.
    reference: nn.Module | None = field(default=None, repr=False)

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """A random valid input of ``batch`` rows."""
        shape = (batch, *self.input_shape)
        if len(self.input_high) == 1:
            return torch.randint(0, self.input_high[0], shape, generator=generator,
                                 dtype=self.input_dtype)
        columns = [torch.randint(0, high, (batch,), generator=generator, dtype=self.input_dtype)
                   for high in self.input_high]
        return torch.stack(columns, dim=1)

    def run_eager(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The reference outputs for ``x`` (the fp32 eager graph)."""
        with torch.inference_mode():
            out = (self.reference or self.module)(x)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _n_users(model: nn.Module, manifest: dict) -> int:
    if manifest.get("users"):
        return len(manifest["users"])
    if isinstance(getattr(model, "n_users", None), int):
        return model.n_users
    raise ConversionError("manifest 'users': collab export needs the user vocabulary "
                          "(or a model attribute n_users)")


def graph_specs(model: nn.Module, manifest: dict) -> list[GraphSpec]:
    """The graphs a bundle of this task holds: ``model`` (and ``pairs`` for collab)."""
    task = manifest.get("task")
    precision = graph_precision(manifest)
    if task in IMAGE_TASKS:
        prep = manifest.get("preprocessing") or {}
        try:
            size = int(prep["input_size"])
            kwargs = {"tta": bool(tta_views(manifest)),
                      "points": point_frame(manifest) is not None}
            wrapper = ImageExportWrapper(model, task, prep["mean"], prep["std"],
                                         precision=precision, **kwargs)
            reference = None if precision == "fp32" else ImageExportWrapper(
                model, task, prep["mean"], prep["std"], **kwargs).eval()
        except (KeyError, TypeError, ValueError) as err:
            raise ConversionError(
                f"manifest 'preprocessing': needs input_size, mean and std ({err!r})") from None
        return [GraphSpec("model", wrapper.eval(), "images", (size, size, 3), torch.uint8,
                          (256,), ("scores", "logits"), reference)]
    if task == "collab":
        if manifest.get("tta"):
            raise ConversionError("manifest 'tta': test-time augmentation is for image graphs; "
                                  "a recommender has no views to average")
        check_collab_model(model)
        n_users, n_items = _n_users(model, manifest), int(model.n_items)
        return [
            GraphSpec("model", CollabUsersWrapper(model).eval(), "users", (), torch.int64,
                      (n_users,), ("scores",)),
            GraphSpec("pairs", CollabPairsWrapper(model).eval(), "pairs", (2,), torch.int64,
                      (n_users, n_items), ("ratings",)),
        ]
    raise ConversionError(
        f"manifest 'task': {task!r} is not one of single_label, multi_label, regression, collab")


@contextlib.contextmanager
def quiet_torchscript() -> Iterator[None]:
    """TorchScript is the format the bundle promises; its deprecation notices are not news."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*deprecated.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def to_torchscript(spec: GraphSpec, path: Path) -> None:
    """Trace, freeze and save the graph; trace checking is left to the parity gate."""
    example = spec.sample(EXAMPLE_BATCH, torch.Generator().manual_seed(0))
    try:
        with quiet_torchscript():
            traced = torch.jit.trace(spec.module, example, check_trace=False)
            torch.jit.save(torch.jit.freeze(traced), str(path))
    except Exception as err:
        raise ConversionError(f"{path.name}: TorchScript trace failed ({err})") from err


def _batch_dynamic_shapes(spec: GraphSpec) -> dict:
    return {spec.input_name: {0: torch.export.Dim("batch", min=1)}}


def to_exported_program(spec: GraphSpec, path: Path | None) -> torch.export.ExportedProgram:
    """Capture the graph with torch.export (dynamic batch) and save it when ``path`` is given."""
    example = spec.sample(EXAMPLE_BATCH, torch.Generator().manual_seed(0))
    program = torch.export.export(spec.module, (example,),
                                  dynamic_shapes=_batch_dynamic_shapes(spec))
    if path is not None:
        torch.export.save(program, path)
    return program


#: File suffix of an AOTInductor package (``.pt2`` alone is the ExportedProgram).
AOTI_SUFFIX = ".aoti.pt2"


def to_aoti_package(program: torch.export.ExportedProgram, path: Path) -> None:
    """Compile the captured graph ahead of time for this machine's CPU into a ``.pt2`` package.

    ``freezing`` folds the weights into the compiled code as constants, which lets Inductor
    pre-pack convolution weights for oneDNN (the CPU speed-up the AOTInductor docs describe).
    """
    from torch._inductor import aoti_compile_and_package

    with torch.no_grad():
        aoti_compile_and_package(program, package_path=str(path),
                                 inductor_configs={"freezing": True})


def to_onnx(spec: GraphSpec, path: Path,
            program: torch.export.ExportedProgram | None = None) -> None:
    """Export to a single-file ONNX model at opset 18 with a symbolic batch axis, then check it."""
    example = spec.sample(EXAMPLE_BATCH, torch.Generator().manual_seed(0))
    try:
        onnx_program = torch.onnx.export(
            program if program is not None else spec.module, (example,), dynamo=True,
            opset_version=OPSET, input_names=[spec.input_name],
            output_names=list(spec.output_names), dynamic_shapes=_batch_dynamic_shapes(spec),
            verbose=False)
        onnx_program.save(path, external_data=False)
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:
        raise ConversionError(f"{path.name}: ONNX export failed ({err})") from err


def describe_graph(spec: GraphSpec, files: dict[str, str | None]) -> dict:
    """Manifest entry of a graph: ``input`` and ``outputs`` names, file names, and a
    ``signature`` with every tensor's dtype and shape (the batch axis is ``"batch"``)."""
    example = spec.sample(EXAMPLE_BATCH, torch.Generator().manual_seed(0))
    outputs = spec.run_eager(example)
    return {
        "input": spec.input_name,
        "outputs": list(spec.output_names),
        "files": files,
        "signature": {
            "inputs": [{"name": spec.input_name,
                        "dtype": str(spec.input_dtype).removeprefix("torch."),
                        "shape": ["batch", *spec.input_shape]}],
            "outputs": [{"name": name, "dtype": str(out.dtype).removeprefix("torch."),
                         "shape": ["batch", *out.shape[1:]]}
                        for name, out in zip(spec.output_names, outputs, strict=True)],
        },
    }


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def convert_graph(spec: GraphSpec, out_dir: Path, *, pt2: bool = True,
                  aoti: bool = False) -> dict:
    """Write ``<name>.ts``, ``<name>.onnx`` and, where torch.export manages, ``<name>.pt2``
    (and with ``aoti`` the compiled ``<name>.aoti.pt2``).

    Returns the graph's manifest entry; a failed ``.pt2`` or AOTInductor compile is recorded
    there as ``pt2_error`` or ``aoti_error``.
    """
    files: dict[str, str | None] = {"torchscript": f"{spec.name}.ts",
                                    "onnx": f"{spec.name}.onnx", "pt2": None}
    to_torchscript(spec, out_dir / files["torchscript"])
    program, errors = None, {}
    if pt2 or aoti:
        try:
            program = to_exported_program(spec, out_dir / f"{spec.name}.pt2" if pt2 else None)
            files["pt2"] = f"{spec.name}.pt2" if pt2 else None
        except Exception as err:  # optional format: record why, keep the others
            (out_dir / f"{spec.name}.pt2").unlink(missing_ok=True)
            errors["pt2_error"] = _first_line(err)
    if aoti and program is not None:
        target = out_dir / f"{spec.name}{AOTI_SUFFIX}"
        try:
            to_aoti_package(program, target)
            files["aoti"] = target.name
        except Exception as err:  # no compiler, an op Inductor cannot lower: keep the others
            target.unlink(missing_ok=True)
            errors["aoti_error"] = _first_line(err)
    to_onnx(spec, out_dir / files["onnx"], program)
    return describe_graph(spec, files) | errors
