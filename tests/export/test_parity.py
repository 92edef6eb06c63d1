"""The parity gate: it passes faithful exports and names the runtime of an unfaithful one."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from bundle_tampering import edited_manifest, reseal
from onnx import numpy_helper
from paths import SHARED_DATA
from PIL import Image
from tiny_export_models import TinyCNN, TinyCollab, collab_manifest, image_manifest, trained_like

import export.formats
from export import runtime as runtime_module
from export.bundle import BundleWriter, load_bundle, promote
from export.convert import export_bundle
from export.errors import BundleIntegrityError, ExportError, ParityError, PromotionError
from export.manifest import thresholds_for
from export.parity import (
    ParityReport,
    ParityTolerances,
    check_bundle,
    compare,
)
from export.signing import SIGNING_KEY_ENV, write_key_pair


def perturb_largest_initializer(path, delta: float) -> None:
    """Add ``delta`` to one weight of the ONNX model, as a buggy exporter might."""
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    weights = numpy_helper.to_array(init).copy()
    weights.flat[0] += delta
    init.CopyFrom(numpy_helper.from_array(weights, init.name))
    onnx.save(model, str(path))


def resign(bundle_dir, rel: str) -> None:
    """Record a file's new hash in the manifest and the manifest's in the digest record (as
    anyone who can write the registry could), so only the gate — not the hashes — can object."""
    data = (bundle_dir / rel).read_bytes()
    with edited_manifest(bundle_dir) as manifest:
        manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    reseal(bundle_dir)


def copy_bundle(bundle_dir, to_model_dir) -> Path:
    """Copy a bundle with its digest record into another model folder."""
    copy = to_model_dir / bundle_dir.name
    shutil.copytree(bundle_dir, copy)
    record = f"{bundle_dir.name}.digest.json"
    shutil.copy(bundle_dir.parent / record, to_model_dir / record)
    return copy


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory):
    torch.manual_seed(0)
    model = trained_like(TinyCNN(n_out=4))
    validation = torch.randn(6, 3, 32, 32)
    return export_bundle(model, image_manifest(), tmp_path_factory.mktemp("reg"), "pets",
                         validation_inputs=validation, pt2=False)


@pytest.mark.slow
def test_faithful_export_passes_on_every_runtime_and_batch(good_bundle):
    report = good_bundle.parity
    assert report.passed and report.failures() == []
    cases = {(r.runtime, r.input, r.batch) for r in report.rows}
    for runtime in ("torchscript", "onnxruntime-cpu"):
        assert {(runtime, "validation", 6), (runtime, "random-b1", 1), (runtime, "random-b7", 7),
                (runtime, "random-b64", 64)} <= cases
    assert all(r.agreement == 1.0 and r.max_abs < 1e-4 for r in report.rows)
    on_disk = json.loads((good_bundle.bundle_path / "parity.json").read_text())
    assert ParityReport.from_dict(on_disk) == report
    table = (good_bundle.bundle_path / "parity.md").read_text()
    assert "| model | onnxruntime-cpu | random-b64 | 64 |" in table and "❌" not in table
    promote(good_bundle.bundle_path)


@pytest.mark.slow
def test_check_bundle_reruns_the_gate_from_the_bundle_alone(good_bundle):
    report = check_bundle(good_bundle.bundle_path)
    assert report.passed
    assert {r.input for r in report.rows} == {"random-b1", "random-b7", "random-b64"}


@pytest.mark.slow
def test_broken_onnx_fails_the_gate_naming_the_runtime(good_bundle, tmp_path):
    copy = copy_bundle(good_bundle.bundle_path, tmp_path / "pets")
    perturb_largest_initializer(copy / "model.onnx", delta=0.5)
    with pytest.raises(BundleIntegrityError, match="model.onnx sha256 mismatch"):
        check_bundle(copy)
    resign(copy, "model.onnx")
    report = check_bundle(copy)
    assert not report.passed
    failing = {r.runtime for r in report.rows if not r.passed}
    assert failing == {"onnxruntime-cpu"}
    assert all("onnxruntime-cpu on model/random-b" in line for line in report.failures())


@pytest.mark.slow
def test_tolerances_are_configurable(good_bundle, tmp_path):
    copy = copy_bundle(good_bundle.bundle_path, tmp_path / "pets")
    perturb_largest_initializer(copy / "model.onnx", delta=0.05)
    resign(copy, "model.onnx")
    strict = check_bundle(copy)
    worst = max(r.max_abs for r in strict.rows)
    loose = check_bundle(copy, ParityTolerances(atol=2 * worst, rtol=0.0, min_agreement=0.0))
    assert not strict.passed and loose.passed
    assert 1e-4 < worst < 1.0


@pytest.mark.slow
def test_export_with_a_broken_converter_is_written_unsigned_and_never_promoted(tmp_path,
                                                                             monkeypatch):
    """A failed gate keeps the bundle for inspection, but never signs it, key or not."""
    private, _ = write_key_pair(tmp_path / "keys")
    monkeypatch.setenv(SIGNING_KEY_ENV, str(private))
    real_to_onnx = export.formats.to_onnx

    def buggy_to_onnx(spec, path, program=None):
        real_to_onnx(spec, path, program)
        perturb_largest_initializer(path, delta=0.5)

    monkeypatch.setattr(export.formats, "to_onnx", buggy_to_onnx)
    model = trained_like(TinyCNN(n_out=4))
    with pytest.raises(ParityError, match=r"parity failed — onnxruntime-cpu on model/") as err:
        export_bundle(model, image_manifest(), tmp_path, "pets", pt2=False)
    path = err.value.bundle_path
    assert str(path) in str(err.value)
    assert load_bundle(path).manifest["parity"]["passed"] is False
    assert "signature" not in json.loads((path.parent / f"{path.name}.digest.json").read_text())
    assert not (path.parent / f"{path.name}.sig").exists()
    assert err.value.report.failures()
    with pytest.raises(PromotionError, match="failed parity"):
        promote(path)


@pytest.mark.slow
def test_collab_gate_covers_both_graphs(tmp_path):
    torch.manual_seed(3)
    model = TinyCollab(n_users=20, n_items=11).eval()
    pairs = torch.tensor([[0, 0], [19, 10], [5, 3]])
    result = export_bundle(model, collab_manifest(model), tmp_path, "movies",
                           validation_inputs=pairs, pt2=False)
    rows = result.parity.rows
    assert {(r.graph, r.input) for r in rows} >= {("model", "validation"), ("pairs", "validation"),
                                                  ("model", "random-b64"), ("pairs", "random-b7")}
    assert all(r.agreement is None for r in rows)
    assert check_bundle(result.bundle_path).passed
    with pytest.raises(ExportError, match="outside the vocabulary"):
        export_bundle(model, collab_manifest(model), tmp_path, "movies",
                      validation_inputs=torch.tensor([[20, 0]]))


def test_check_bundle_refuses_a_bundle_without_graphs(tmp_path):
    with BundleWriter(tmp_path, "pets") as writer:
        (writer.dir / "parity.json").write_text(json.dumps({"passed": True}))
        path = writer.commit({"task": "single_label"})
    with pytest.raises(BundleIntegrityError, match="lists no graphs"):
        check_bundle(path)


def shared_data() -> Path:
    return SHARED_DATA


@pytest.mark.slow
def test_real_photos_as_the_validation_batch(tmp_path):
    val = shared_data() / "hymenoptera_data" / "val"
    if not val.is_dir():
        pytest.skip(f"shared data absent: {val}")
    files = sorted(val.glob("ants/*.jpg"))[:3] + sorted(val.glob("bees/*.jpg"))[:3]
    photos = np.stack([np.asarray(Image.open(f).convert("RGB").resize((32, 32))) for f in files])
    torch.manual_seed(0)
    model = trained_like(TinyCNN(n_out=2))
    result = export_bundle(model, image_manifest(n_out=2), tmp_path, "ants",
                           validation_inputs=photos, pt2=False)
    rows = [r for r in result.parity.rows if r.input == "validation"]
    assert {r.runtime for r in rows} >= {"torchscript", "onnxruntime-cpu"}
    assert all(r.passed and r.batch == 6 for r in rows)


def test_agreement_ignores_ties_but_counts_real_flips():
    tol = ParityTolerances()
    reference = np.array([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0], [0.1, 0.3, 0.6]], dtype=np.float32)
    tie_broken_other_way = reference.copy()
    tie_broken_other_way[1] = [0.49999, 0.50001, 0.0]
    row = compare("model", "rt", "x", [tie_broken_other_way], [reference], "single_label", tol)
    assert row.agreement == 1.0 and row.passed
    flipped = reference[[0, 1, 0]]  # the last row's decision really changes; the tie does not
    row = compare("model", "rt", "x", [flipped], [reference], "single_label", tol)
    assert row.agreement == pytest.approx(2 / 3) and not row.passed


def test_multi_label_agreement_uses_the_manifest_thresholds():
    reference = np.array([[0.30, 0.80]], dtype=np.float32)
    shifted = reference + 0.02
    loose = ParityTolerances(atol=0.05, rtol=0.0)
    at_half = thresholds_for({"thresholds": 0.5}, 2)
    at_031 = thresholds_for({"thresholds": {"a": 0.31}, "classes": ["a", "b"]}, 2)
    np.testing.assert_allclose(at_031, [0.31, 0.5])
    assert compare("m", "rt", "x", [shifted], [reference], "multi_label", loose,
                   at_half).agreement == 1.0
    # 0.30 → 0.32 crosses 0.31, and |0.30 - 0.31| < atol: an undecidable element, not a flip.
    assert compare("m", "rt", "x", [shifted], [reference], "multi_label", loose,
                   at_031).agreement == 1.0
    strict = ParityTolerances(atol=1e-3, rtol=0.0, min_agreement=1.0)
    row = compare("m", "rt", "x", [shifted], [reference], "multi_label", strict, at_031)
    assert row.agreement == 0.5 and not row.passed
    with pytest.raises(ExportError, match="'thresholds': 3 values for 2 classes"):
        thresholds_for({"thresholds": [0.5, 0.5, 0.5]}, 2)


def test_shape_mismatch_and_nan_fail():
    tol = ParityTolerances()
    reference = np.ones((4, 3), dtype=np.float32)
    assert not compare("m", "rt", "x", [reference[:3]], [reference], "regression", tol).passed
    nan = reference.copy()
    nan[2, 1] = np.nan
    assert not compare("m", "rt", "x", [nan], [reference], "regression", tol).passed
    assert compare("m", "rt", "x", [reference + 5e-5], [reference], "regression", tol).passed


def test_cuda_provider_only_when_a_gpu_and_the_provider_exist(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not runtime_module.onnx_cuda_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert not runtime_module.onnx_cuda_available()
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert runtime_module.onnx_cuda_available()


@pytest.mark.slow
def test_check_bundle_runs_torchscript_only_when_asked(good_bundle, monkeypatch):
    loaded = []
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **kw: loaded.append(a) or real_load(*a, **kw))
    report = check_bundle(good_bundle.bundle_path)
    assert report.passed and loaded == []
    assert {r.runtime for r in report.rows} >= {"onnxruntime-cpu"}
    assert "torchscript" not in {r.runtime for r in report.rows}
    report = check_bundle(good_bundle.bundle_path, torchscript=True)
    assert report.passed and len(loaded) == 1
    assert "torchscript" in {r.runtime for r in report.rows}
