"""Conversions: the exported graphs take uint8 NHWC (or user indices) and match eager PyTorch."""

from __future__ import annotations

import stat
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_model
from tiny_export_models import (
    PREPROCESSING,
    TinyCNN,
    TinyCollab,
    collab_manifest,
    image_manifest,
    trained_like,
)

from export.bundle import load_bundle
from export.convert import export_bundle
from export.errors import BundleIntegrityError, ConversionError, ExportError

MEAN = torch.tensor(PREPROCESSING["mean"]).view(1, 3, 1, 1)
STD = torch.tensor(PREPROCESSING["std"]).view(1, 3, 1, 1)


def onnx_run(path, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def ts_run(path, x: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path))
    with torch.inference_mode():
        return module(x)


def eager_from_pixels(model, images: torch.Tensor) -> torch.Tensor:
    """What a user would do by hand: NHWC uint8 → NCHW float, /255, normalise, run the model."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
        return model((x - MEAN) / STD)


@pytest.fixture(scope="module")
def image_bundle(tmp_path_factory):
    torch.manual_seed(0)
    model = trained_like(TinyCNN(n_out=4)).train()
    result = export_bundle(model, image_manifest("single_label"),
                           tmp_path_factory.mktemp("reg"), "pets")
    # Export works on a CPU copy in eval mode: the caller's model keeps its mode.
    assert model.training
    return model.eval(), load_bundle(result.bundle_path)


@pytest.fixture(scope="module")
def collab_bundle(tmp_path_factory):
    torch.manual_seed(1)
    model = TinyCollab().eval()
    result = export_bundle(model, collab_manifest(model), tmp_path_factory.mktemp("reg"), "movies")
    return model, load_bundle(result.bundle_path)


@pytest.mark.slow
def test_image_manifest_records_layout_and_signature(image_bundle):
    _, bundle = image_bundle
    m = bundle.manifest
    assert m["preprocessing"] | {} == PREPROCESSING | {"input_layout": "NHWC",
                                                       "input_dtype": "uint8"}
    graph = m["graphs"]["model"]
    assert (graph["input"], graph["outputs"]) == ("images", ["scores", "logits"])
    assert graph["signature"]["inputs"] == [
        {"name": "images", "dtype": "uint8", "shape": ["batch", 32, 32, 3]}]
    assert graph["signature"]["outputs"][0] == {"name": "scores", "dtype": "float32",
                                                "shape": ["batch", 4]}
    proto = onnx.load(str(bundle.file("model.onnx")))
    assert proto.opset_import[0].version >= 18
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


@pytest.mark.slow
@pytest.mark.parametrize("batch", [3, 65])
def test_image_graphs_normalise_inside_and_give_probabilities(image_bundle, batch):
    model, bundle = image_bundle
    images = torch.randint(0, 256, (batch, 32, 32, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(batch))
    logits = eager_from_pixels(model, images)
    expected = torch.softmax(logits, dim=1).numpy()
    scores, raw = onnx_run(bundle.file("model.onnx"), images.numpy())
    ts_scores, ts_raw = ts_run(bundle.file("model.ts"), images)
    program = torch.export.load(bundle.file("model.pt2")).module()
    pt2_scores, _ = program(images)
    for got in (scores, ts_scores.numpy(), pt2_scores.detach().numpy()):
        assert got.shape == (batch, 4)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(raw, logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(ts_raw.numpy(), logits.numpy(), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["multi_label", "regression"])
def test_multi_label_is_sigmoid_and_regression_is_identity(tmp_path, task):
    model = trained_like(TinyCNN(n_out=3, y_range=(0.0, 1.0) if task == "regression" else None))
    result = export_bundle(model, image_manifest(task, n_out=3), tmp_path, task, pt2=False)
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    scores, logits = onnx_run(result.bundle_path / "model.onnx", images.numpy())
    expected_logits = eager_from_pixels(model, images)
    expected = (torch.sigmoid(expected_logits) if task == "multi_label" else expected_logits)
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(logits, expected_logits.numpy(), atol=1e-4)
    assert load_bundle(result.bundle_path).manifest["graphs"]["model"]["files"]["pt2"] is None


@pytest.mark.slow
@pytest.mark.parametrize("batch", [3, 65])
def test_collab_graphs_score_every_item_and_pairs(collab_bundle, batch):
    model, bundle = collab_bundle
    gen = torch.Generator().manual_seed(batch)
    users = torch.randint(0, model.n_users, (batch,), generator=gen)
    pairs = torch.stack([users, torch.randint(0, model.n_items, (batch,), generator=gen)], 1)
    with torch.inference_mode():
        expected_scores, expected_ratings = model.score_users(users), model(pairs)
    (scores,) = onnx_run(bundle.file("model.onnx"), users.numpy())
    (ratings,) = onnx_run(bundle.file("pairs.onnx"), pairs.numpy())
    assert scores.shape == (batch, model.n_items) and ratings.shape == (batch,)
    np.testing.assert_allclose(scores, expected_scores.numpy(), atol=1e-5)
    np.testing.assert_allclose(ratings, expected_ratings.numpy(), atol=1e-5)
    np.testing.assert_allclose(ts_run(bundle.file("model.ts"), users).numpy(),
                               expected_scores.numpy(), atol=1e-5)
    np.testing.assert_allclose(ts_run(bundle.file("pairs.ts"), pairs).numpy(),
                               expected_ratings.numpy(), atol=1e-5)
    # The two graphs agree with each other: a pair's rating is its user's score of that item.
    np.testing.assert_allclose(ratings, scores[np.arange(batch), pairs[:, 1].numpy()], atol=1e-5)
    assert 0.5 <= scores.min() and scores.max() <= 5.5


@pytest.mark.slow
def test_collab_manifest_signature(collab_bundle):
    model, bundle = collab_bundle
    graphs = bundle.manifest["graphs"]
    assert graphs["model"]["signature"]["inputs"][0] == {"name": "users", "dtype": "int64",
                                                         "shape": ["batch"]}
    assert graphs["model"]["signature"]["outputs"][0]["shape"] == ["batch", model.n_items]
    assert graphs["pairs"]["signature"]["outputs"] == [{"name": "ratings", "dtype": "float32",
                                                        "shape": ["batch"]}]
    assert bundle.manifest["titles"][0] == "Item 0"


@pytest.mark.slow
def test_weights_rebuild_the_eager_model(image_bundle):
    model, bundle = image_bundle
    fresh = TinyCNN(n_out=4).eval()
    load_model(fresh, str(bundle.file("weights.safetensors")))
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(fresh(x), model(x))


@pytest.mark.slow
def test_every_exported_file_is_hash_checked(image_bundle):
    _, bundle = image_bundle
    for rel in bundle.manifest["files"]:
        target = bundle.path / rel
        original = target.read_bytes()
        target.chmod(stat.S_IRUSR | stat.S_IWUSR)
        target.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(BundleIntegrityError, match=f"{rel} sha256 mismatch"):
            load_bundle(bundle.path)
        target.write_bytes(original)
    load_bundle(bundle.path)


def test_manifest_mistakes_are_named(tmp_path):
    model = TinyCNN(n_out=4).eval()
    with pytest.raises(ConversionError, match="'classes': 3 names but the model outputs 4"):
        export_bundle(model, image_manifest() | {"classes": ["a", "b", "c"]}, tmp_path, "m")
    with pytest.raises(ConversionError, match="'preprocessing'"):
        export_bundle(model, image_manifest() | {"preprocessing": {"input_size": 32}}, tmp_path,
                      "m")
    with pytest.raises(ConversionError, match="'task'"):
        export_bundle(model, image_manifest() | {"task": "detection"}, tmp_path, "m")
    with pytest.raises(ConversionError, match="score_users"):
        export_bundle(model, {"task": "collab", "users": ["a"]}, tmp_path, "m")
    with pytest.raises(ExportError, match="validation_inputs"):
        export_bundle(model, image_manifest(), tmp_path, "m",
                      validation_inputs=torch.zeros(2, 3, 64, 64))
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())
