"""The one runtime wrapper over a bundle: ONNX Runtime and TorchScript agree, CPU-only machines
stay quiet, and a scorer's runtime problem is a scoring error."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from paths import REPO
from PIL import Image
from tiny_image_bundle import make_image_bundle

from export import runtime as runtime_module
from export.bundle import load_bundle
from export.errors import ExportError
from export.loader_workers import available_cores
from export.runtime import RuntimeUnavailableError
from export.runtime import open_bundle_graph as open_runtime
from scoring import errors as scoring_errors
from scoring.image_scoring import score_image_folder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(make_image_bundle(tmp_path_factory.mktemp("reg")))


def _images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_onnx_and_torchscript_give_the_same_outputs(bundle):
    images = _images(5)
    onnx = open_runtime(bundle, "onnx", "cpu")
    ts = open_runtime(bundle, "torchscript", "cpu")
    assert onnx.input_name == ts.input_name == "images"
    assert onnx.output_names == ts.output_names == ["scores", "logits"]
    a, b = onnx.run(images), ts.run(images)
    assert a["scores"].shape == (5, 6)
    np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a["logits"], b["logits"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a["scores"].sum(axis=1), 1.0, rtol=1e-5)
    # Different images give different scores: the graph really looks at its input.
    assert not np.allclose(a["scores"][0], a["scores"][1])


def test_onnx_batch_axis_is_dynamic(bundle):
    rt = open_runtime(bundle, "onnx", "cpu")
    images = _images(7, seed=3)
    whole = rt.run(images)["logits"]
    parts = np.concatenate([rt.run(images[:3])["logits"], rt.run(images[3:])["logits"]])
    np.testing.assert_allclose(whole, parts, rtol=1e-5, atol=1e-6)


def test_onnx_uses_the_cores_this_process_may_use(bundle):
    rt = open_runtime(bundle, "onnx", "auto")
    assert rt.session.get_session_options().intra_op_num_threads == available_cores()
    if not runtime_module.cuda_present():
        assert rt.providers == ["CPUExecutionProvider"] and rt.device == "cpu"


def test_cuda_without_gpu_is_one_clear_error(bundle, monkeypatch):
    monkeypatch.setattr(runtime_module, "cuda_present", lambda: False)
    for kind in ("onnx", "torchscript"):
        with pytest.raises(RuntimeUnavailableError, match="no CUDA GPU"):
            open_runtime(bundle, kind, "cuda")
    assert open_runtime(bundle, "onnx", "auto").device == "cpu"


def test_a_runtime_error_is_an_export_error_and_a_scoring_error_in_the_scorer(bundle, tmp_path,
                                                                              monkeypatch):
    assert issubclass(RuntimeUnavailableError, ExportError)
    monkeypatch.setattr(runtime_module, "cuda_present", lambda: False)
    (tmp_path / "in").mkdir()
    Image.fromarray(_images(1)[0]).save(tmp_path / "in" / "a.png")
    with pytest.raises(scoring_errors.RuntimeUnavailableError, match="no CUDA GPU"):
        score_image_folder(tmp_path / "in", bundle.path, tmp_path / "out", device="cuda",
                           workers=0)
    assert not list((tmp_path / "out" / "image_predictions").glob("run_date=*"))


def test_bad_kind_device_or_graph_name_the_parameter(bundle):
    with pytest.raises(RuntimeUnavailableError, match="runtime must be one of"):
        open_runtime(bundle, "tensorrt")
    with pytest.raises(RuntimeUnavailableError, match="device must be one of"):
        open_runtime(bundle, "onnx", "tpu")
    with pytest.raises(RuntimeUnavailableError, match="has no head.onnx"):
        open_runtime(bundle, "onnx", graph="head")


@pytest.mark.slow  # a fresh interpreter imports torch and onnxruntime
def test_cpu_only_run_prints_no_provider_noise(bundle):
    code = (
        "import numpy as np\n"
        "from export.bundle import load_bundle\n"
        "from export.runtime import open_bundle_graph, cuda_present\n"
        f"rt = open_bundle_graph(load_bundle({str(bundle.path)!r}), 'onnx', 'auto')\n"
        "rt.run(np.zeros((1, 32, 32, 3), np.uint8))\n"
        "print('gpu' if cuda_present() else 'cpu')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    if done.stdout.strip() == "cpu":
        assert "CUDA" not in done.stderr and "rror" not in done.stderr, done.stderr


@pytest.mark.slow  # the torch.export-based ONNX exporter takes seconds even for a tiny model
def test_bundle_from_the_real_exporter_runs_in_both_runtimes(tmp_path):
    import torch
    from torch import nn

    from export.convert import export_bundle

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    manifest = {"task": "single_label", "classes": ["a", "b", "c"],
                "preprocessing": {"input_size": 32, "resize_size": 36, "mean": [0.5] * 3,
                                  "std": [0.25] * 3, "interpolation": "bilinear"}}
    result = export_bundle(model, manifest, tmp_path, "real", pt2=False)
    bundle = load_bundle(result.bundle_path)
    images = _images(4, seed=5)
    onnx, ts = open_runtime(bundle, "onnx", "cpu"), open_runtime(bundle, "torchscript", "cpu")
    assert onnx.output_names == ts.output_names == ["scores", "logits"]
    a, b = onnx.run(images), ts.run(images)
    np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-4, atol=1e-5)
    eager = torch.softmax(model((torch.from_numpy(images).permute(0, 3, 1, 2) / 255 - 0.5)
                                / 0.25), dim=1).detach().numpy()
    np.testing.assert_allclose(a["scores"], eager, rtol=1e-4, atol=1e-5)


def test_aoti_without_a_package_in_the_bundle_is_one_scoring_error(bundle, tmp_path):
    with pytest.raises(RuntimeUnavailableError, match="has no model.aoti.pt2"):
        open_runtime(bundle, "aoti", "cpu")
    (tmp_path / "in").mkdir()
    Image.fromarray(_images(1)[0]).save(tmp_path / "in" / "a.png")
    with pytest.raises(scoring_errors.RuntimeUnavailableError, match="aoti"):
        score_image_folder(tmp_path / "in", bundle.path, tmp_path / "out", runtime="aoti",
                           workers=0)


def test_runtimes_take_torch_tensors_as_well_as_numpy(bundle):
    import torch

    images = _images(3, seed=7)
    for kind in ("onnx", "torchscript"):
        rt = open_runtime(bundle, kind, "cpu")
        np.testing.assert_array_equal(rt.run(torch.from_numpy(images))["scores"],
                                      rt.run(images)["scores"])
