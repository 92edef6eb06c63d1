"""The AOTInductor package: compiled at export when asked, gated for parity, run by the one
runtime wrapper only from hash-checked bytes, and a failed compile costs only that file."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from tiny_export_models import TinyCNN, image_manifest, trained_like

from export import formats
from export.bundle import load_bundle
from export.convert import export_bundle
from export.errors import BundleIntegrityError
from export.parity import check_bundle
from export.pins import record_path
from export.runtime import RuntimeUnavailableError, open_bundle_graph

pytestmark = pytest.mark.slow  # a C++ compile, even of a tiny model, takes tens of seconds


@pytest.fixture(scope="module")
def aoti_bundle(tmp_path_factory):
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("AOTInductor needs a C++ compiler")
    torch.manual_seed(0)
    model = trained_like(TinyCNN(n_out=4))
    result = export_bundle(model, image_manifest(), tmp_path_factory.mktemp("reg"), "tiny",
                           pt2=False, aoti=True)
    return load_bundle(result.bundle_path), model


def test_aoti_package_is_in_the_bundle_and_passes_the_gate(aoti_bundle):
    bundle, _ = aoti_bundle
    entry = bundle.manifest["graphs"]["model"]
    assert entry["files"]["aoti"] == "model.aoti.pt2" and "aoti_error" not in entry
    assert bundle.has_file("model.aoti.pt2")
    parity = {r.runtime for r in check_bundle(bundle.path, torchscript=True).rows}
    assert {"aoti", "torchscript", "onnxruntime-cpu"} <= parity


def test_aoti_runs_like_onnx_runtime_at_any_batch(aoti_bundle):
    bundle, _ = aoti_bundle
    aoti, onnx = open_bundle_graph(bundle, "aoti", "cpu"), open_bundle_graph(bundle, "onnx", "cpu")
    assert aoti.describe() == "aoti/cpu" and aoti.output_names == ["scores", "logits"]
    for n in (1, 5):
        images = np.random.default_rng(n).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        a, b = aoti.run(images), onnx.run(images)
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-4, atol=1e-5)


def test_aoti_refuses_cuda_and_swapped_bytes(aoti_bundle, tmp_path):
    bundle, _ = aoti_bundle
    with pytest.raises(RuntimeUnavailableError):
        open_bundle_graph(bundle, "aoti", "cuda")
    copy = tmp_path / bundle.name / bundle.path.name  # REG/NAME/VERSION, as loading requires
    shutil.copytree(bundle.path, copy)
    shutil.copy(record_path(bundle.path), record_path(copy))  # the digest pin travels with it
    tampered = load_bundle(copy)
    with open(copy / "model.aoti.pt2", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleIntegrityError, match="sha256"):
        open_bundle_graph(tampered, "aoti", "cpu")


def test_a_failed_compile_is_recorded_and_the_bundle_goes_on(tmp_path, monkeypatch):
    def no_compiler(program, path):
        raise RuntimeError("no C++ compiler found\nlong log")

    monkeypatch.setattr(formats, "to_aoti_package", no_compiler)
    result = export_bundle(TinyCNN(n_out=4), image_manifest(), tmp_path, "tiny", pt2=False,
                           aoti=True)
    entry = load_bundle(result.bundle_path).manifest["graphs"]["model"]
    assert entry["aoti_error"] == "RuntimeError: no C++ compiler found"
    assert "aoti" not in entry["files"] and result.parity.passed
    with pytest.raises(RuntimeUnavailableError, match="model.aoti.pt2"):
        open_bundle_graph(load_bundle(result.bundle_path), "aoti", "cpu")
