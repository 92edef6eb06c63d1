"""Test-time augmentation in the exported graph: the same uint8 batch in, the scores of the centre
crop and its mirror averaged, point outputs mirrored back first; parity gates it like any graph."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_export_models import PREPROCESSING, TinyCNN, image_manifest, trained_like
from torch import nn

from export.convert import export_bundle
from export.errors import ConversionError, ManifestError
from export.manifest import POINT_FRAME, TTA_VIEWS
from export.parity import check_bundle
from export.runtime import OnnxRuntime
from export.wrappers import FlipAverage, ImageExportWrapper, unmirror_points

torch.set_num_threads(1)
SIZE = PREPROCESSING["input_size"]
TTA = {"views": list(TTA_VIEWS)}


class MirrorInvariant(nn.Module):
    """Any model run on ``x + mirror(x)``: exactly the same output for an image and its mirror."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x + x.flip(-1))


class Centroid(nn.Module):
    """The intensity centroid of channel 0 as one (x, y) point in the crop's [-1, 1] frame:
    a model that tracks where the point is, so a mirrored image moves its x to -x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x[:, 0].exp()
        n = x.shape[-1]
        centres = (torch.arange(n, dtype=x.dtype) + 0.5) / n * 2 - 1
        total = w.sum((1, 2))
        cx = (w.sum(1) * centres).sum(-1) / total
        cy = (w.sum(2) * centres).sum(-1) / total
        return torch.stack([cx, cy], dim=-1)


class Constant(nn.Module):
    def __init__(self, point: list[float]) -> None:
        super().__init__()
        self.register_buffer("point", torch.tensor(point))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point.expand(x.shape[0], -1) + 0 * x.mean()


def pixels(n: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, SIZE, SIZE, 3), generator=g, dtype=torch.uint8)


def wrap(model, task, **kw) -> ImageExportWrapper:
    return ImageExportWrapper(model, task, PREPROCESSING["mean"], PREPROCESSING["std"], **kw)


@pytest.mark.parametrize("task", ["single_label", "multi_label", "regression"])
def test_the_tta_graph_of_a_mirror_invariant_model_equals_the_plain_graph(task):
    model = MirrorInvariant(trained_like(TinyCNN(3, (0.0, 1.0) if task == "regression"
                                                 else None))).eval()
    x = pixels()
    with torch.no_grad():
        plain = wrap(model, task)(x)
        tta = wrap(model, task, tta=True)(x)
    assert torch.equal(tta[0], plain[0]) and torch.equal(tta[1], plain[1])


def test_mirrored_points_come_back_exactly():
    points = torch.tensor([[0.5, -0.25, -0.75, 0.125]])
    assert torch.equal(unmirror_points(points), torch.tensor([[-0.5, -0.25, 0.75, 0.125]]))
    assert torch.equal(unmirror_points(unmirror_points(points)), points)
    # A model blind to the image says (0.5, 0.3) for both views: in the original image's
    # frame the mirror view said (-0.5, 0.3), so the average is x = 0.
    views = FlipAverage(Constant([0.5, 0.3]), "regression", points=True)
    scores, _ = views(torch.zeros(2, 3, 4, 4))
    assert torch.equal(scores, torch.tensor([[0.0, 0.3], [0.0, 0.3]]))


def test_a_model_that_tracks_a_point_gives_the_same_point_with_tta():
    # One bright pixel at column 5, row 9 of a 32 px crop: its centre in the [-1, 1] frame.
    x = torch.full((1, 3, SIZE, SIZE), -20.0)
    x[0, :, 9, 5] = 4.0
    model = Centroid()
    plain = model(x)
    tta, _ = FlipAverage(model, "regression", points=True)(x)
    torch.testing.assert_close(tta, plain, rtol=0, atol=1e-6)
    mirrored = model(x.flip(-1))
    torch.testing.assert_close(unmirror_points(mirrored), plain, rtol=0, atol=1e-6)
    # The pixel's centre, as export.pixels.to_model_frame places it: left of centre, so the
    # mirror view really did see it on the right.
    torch.testing.assert_close(plain, torch.tensor([[5.5 / 16 - 1, 9.5 / 16 - 1]]), rtol=0,
                               atol=1e-4)


def points_manifest() -> dict:
    return image_manifest("regression", 2) | {
        "y_range": [-1.0, 1.0],
        "targets": {"kind": "points", "names": ["x", "y"], "points": [["x", "y"]],
                    "frame": POINT_FRAME, "range": [-1.0, 1.0]}}


def test_a_tta_points_bundle_passes_parity_in_every_format_and_records_its_views(tmp_path):
    # (The CLI test exports a single_label TTA bundle.)
    model, manifest = trained_like(TinyCNN(2, (-1.0, 1.0))), points_manifest()
    x = pixels(8, seed=1)
    result = export_bundle(model, manifest | {"tta": TTA}, tmp_path, "tta",
                           validation_inputs=x)
    bundle = result.bundle_path
    assert result.parity.passed
    assert {r.runtime for r in result.parity.rows} >= {"torchscript", "onnxruntime-cpu"}
    written = json.loads((bundle / "manifest.json").read_text())
    assert written["tta"]["views"] == list(TTA_VIEWS)
    assert written["graphs"]["model"]["files"]["pt2"] == "model.pt2"
    assert check_bundle(bundle, torchscript=True).passed
    # What any scorer runs: the bundle's ONNX graph gives the eager TTA scores.
    onnx_scores = OnnxRuntime(bundle / "model.onnx", "cpu").run(x.numpy())["scores"]
    with torch.no_grad():
        eager = wrap(model.eval(), "regression", tta=True, points=True)(x)[0].numpy()
    np.testing.assert_allclose(onnx_scores, eager, rtol=1e-4, atol=1e-5)
    program = torch.export.load(str(bundle / "model.pt2"))
    with torch.no_grad():
        pt2_scores = program.module()(x)[0].numpy()
    np.testing.assert_allclose(pt2_scores, eager, rtol=1e-4, atol=1e-5)


def test_tta_is_refused_where_it_has_no_meaning(tmp_path):
    with pytest.raises(ManifestError, match="tta.views"):
        export_bundle(TinyCNN(4), image_manifest() | {"tta": {"views": ["five_crop"]}},
                      tmp_path, "m")
    with pytest.raises(ConversionError, match="only regression outputs points"):
        FlipAverage(TinyCNN(4), "single_label", points=True)
