"""fp16 graphs: half-precision arithmetic inside, the same uint8 in and float32 out, gated against
the fp32 model at fp16's own tolerance; refused where a graph has no use for it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from tiny_export_models import (
    PREPROCESSING,
    TinyCNN,
    TinyCollab,
    collab_manifest,
    image_manifest,
    trained_like,
)

from export.convert import export_bundle
from export.errors import ManifestError
from export.formats import graph_specs
from export.parity import PRECISION_TOLERANCES, check_bundle
from export.runtime import OnnxRuntime, onnx_cuda_available
from export.wrappers import ImageExportWrapper

torch.set_num_threads(1)
SIZE = PREPROCESSING["input_size"]
FP16 = {"precision": "fp16"}


def pixels(n: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, SIZE, SIZE, 3), generator=g, dtype=torch.uint8)


def wrap(model, task="single_label", **kw) -> ImageExportWrapper:
    return ImageExportWrapper(model, task, PREPROCESSING["mean"], PREPROCESSING["std"], **kw)


@pytest.mark.parametrize("task", ["single_label", "multi_label", "regression"])
def test_the_fp16_wrapper_computes_in_half_and_answers_in_float32(task):
    model = trained_like(TinyCNN(3, (0.0, 1.0) if task == "regression" else None))
    half = wrap(model, task, precision="fp16").eval()
    x = pixels()
    with torch.no_grad():
        scores, logits = half(x)
        ref_scores, _ = wrap(model, task).eval()(x)
    assert scores.dtype == logits.dtype == torch.float32
    assert half.model.head.weight.dtype == torch.float16
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched
    assert 0 < (scores - ref_scores).abs().max() < 1e-2  # half precision, and close


def test_the_gate_holds_the_fp16_graph_to_the_fp32_model():
    model = trained_like(TinyCNN(4))
    spec = graph_specs(model, image_manifest() | FP16)[0]
    x = pixels()
    with torch.no_grad():
        fp32 = wrap(model).eval()(x)[0]
        fp16 = spec.module(x)[0]
    assert torch.equal(spec.run_eager(x)[0], fp32)  # the reference is the fp32 graph
    assert not torch.equal(fp16, fp32)


def test_an_fp16_bundle_passes_at_its_tolerance_and_its_onnx_weights_are_half(tmp_path):
    model = trained_like(TinyCNN(4))
    x = pixels(8, seed=1)
    result = export_bundle(model, image_manifest() | FP16, tmp_path, "half",
                           validation_inputs=x)
    assert result.parity.passed
    assert result.parity.tolerances == PRECISION_TOLERANCES["fp16"]
    manifest = json.loads((result.bundle_path / "manifest.json").read_text())
    assert manifest["precision"] == "fp16"
    assert manifest["parity"]["tolerances"]["atol"] == PRECISION_TOLERANCES["fp16"].atol
    graph = onnx.load(str(result.bundle_path / "model.onnx"))
    convs = {i.name: i.data_type for i in graph.graph.initializer
             if i.name.endswith("weight") and len(i.dims) == 4}
    assert len(convs) == 2 and set(convs.values()) == {onnx.TensorProto.FLOAT16}
    signature = manifest["graphs"]["model"]["signature"]
    assert signature["inputs"][0]["dtype"] == "uint8"
    assert {o["dtype"] for o in signature["outputs"]} == {"float32"}
    scores = OnnxRuntime(result.bundle_path / "model.onnx", "cpu").run(x.numpy())["scores"]
    assert scores.dtype == np.float32
    assert check_bundle(result.bundle_path, torchscript=True).passed


def test_the_gate_measures_what_half_precision_costs(tmp_path):
    """Against the fp32 model, an fp16 graph drifts orders of magnitude more than the fp32 graph
    of the same model (and at fp32's tolerance would not pass: ``PRECISION_TOLERANCES``)."""
    model, x = trained_like(TinyCNN(4)), pixels(8, seed=2)
    drift = {}
    for precision in ("fp32", "fp16"):
        result = export_bundle(model, image_manifest() | {"precision": precision}, tmp_path,
                               precision, validation_inputs=x, pt2=False)
        drift[precision] = [r.max_abs for r in result.parity.rows
                            if r.runtime == "onnxruntime-cpu"]
    assert min(drift["fp16"]) > 10 * max(drift["fp32"])
    assert max(drift["fp16"]) <= PRECISION_TOLERANCES["fp16"].atol


def test_precision_is_refused_where_it_has_no_graph(tmp_path):
    with pytest.raises(ManifestError, match="bf16"):
        export_bundle(TinyCNN(4), image_manifest() | {"precision": "bf16"}, tmp_path, "m")
    collab = TinyCollab()
    with pytest.raises(ManifestError, match="recommender"):
        export_bundle(collab, collab_manifest(collab) | FP16, tmp_path, "c")


@pytest.mark.skipif(not onnx_cuda_available(),
                    reason="needs a CUDA GPU and ONNX Runtime's CUDA provider")
def test_an_fp16_bundle_passes_on_the_cuda_provider(tmp_path):
    result = export_bundle(trained_like(TinyCNN(4)), image_manifest() | FP16, tmp_path, "half",
                           validation_inputs=pixels(8, seed=3), pt2=False)
    cuda = [r for r in result.parity.rows if r.runtime == "onnxruntime-cuda"]
    assert cuda and all(r.passed for r in cuda), result.parity.failures()
