"""Multi-label and regression end to end on tiny images: train, export, verify, promote, score.

Each test trains a 32-pixel resnet18 from random weights for one frozen and one unfrozen epoch;
what is checked is the plumbing a user relies on (thresholds chosen in training reach the
manifest, the parity gate and the scored rows; point outputs come back in original pixels),
not model quality.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from flow_test_data import make_tinted_images
from PIL import Image
from typer.testing import CliRunner

from export.bundle import load_bundle, resolve_bundle
from export.parity import check_bundle
from export.pixels import Preprocessing, from_model_frame
from flows.cli import app
from scoring.image_scoring import score_image_folder
from training.data.regression import from_regression_csv
from training.models.checkpoint import load_image_model
from training.recipes.image import export_image_model, valid_sample
from training.recipes.regression import train_regression_model

pytestmark = pytest.mark.slow
FAST = ["--arch", "resnet18", "--weights", "none", "--size", "32", "--bs", "8",
        "--freeze-epochs", "1", "--epochs", "1", "--lr", "1e-3", "--patience", "0"]
DAY = date(2026, 11, 23)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """20 images (48x40): red and/or blue tints as labels and their redness as a float target
    (``tints.csv``), a white dot as the point (``points.csv``)."""
    root = make_tinted_images(tmp_path_factory.mktemp("tiny"), n=20)
    rng = np.random.default_rng(0)
    rows = ["fname,x,y,is_valid"]
    for i in range(20):
        path = root / "img" / f"{i:02d}.png"
        pixels = np.asarray(Image.open(path)).copy()
        x, y = int(rng.integers(10, 38)), int(rng.integers(8, 32))
        pixels[y - 2:y + 3, x - 2:x + 3] = 255
        Image.fromarray(pixels).save(path)
        rows.append(f"{path.name},{x},{y},{int(i >= 14)}")
    (root / "points.csv").write_text("\n".join(rows) + "\n")
    return root


def _invoke(args: list[str]):
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _scored(out: Path) -> list[dict]:
    part = out / "image_predictions" / f"run_date={DAY.isoformat()}"
    return pq.read_table(sorted(part.glob("part-*.parquet"))).to_pylist()


def test_multilabel_cli_trains_promotes_and_the_bundle_scores_with_its_threshold(tiny, tmp_path):
    _invoke(["train", "multilabel", str(tiny / "tints.csv"), "--images", str(tiny / "img"),
             "--threshold-metric", "f1_micro", "--out", str(tmp_path / "train"),
             "--registry", str(tmp_path / "reg"), "--name", "tints", *FAST])
    metrics = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert (tmp_path / "train" / "plots" / "threshold_sweep.png").is_file()
    bundle = load_bundle(resolve_bundle(str(tmp_path / "reg" / "tints")))  # the promoted one
    assert bundle.task == "multi_label" and bundle.manifest["classes"] == ["blue", "red"]
    assert bundle.manifest["thresholds"] == metrics["threshold"]
    assert 0.05 <= metrics["threshold"] <= 0.95
    # The mean is over the labels' own average precisions (each real, both labels present).
    per_label_ap = metrics["per_label_average_precision"]
    assert set(per_label_ap) == {"blue", "red"} and all(0 < ap <= 1 for ap in per_label_ap.values())
    assert metrics["mean_average_precision"] == pytest.approx(np.mean(list(per_label_ap.values())))
    assert set(metrics["per_label_f1"]) == {"blue", "red"}
    assert check_bundle(bundle.path).passed

    score_image_folder(tiny / "img", str(tmp_path / "reg" / "tints"), tmp_path / "out",
                       run_date=DAY, workers=0)
    rows = _scored(tmp_path / "out")
    assert len(rows) == 20
    for row in rows:
        assert len(row["probabilities"]) == 2 and row["pred_label"] is None
        expected = [c for c, p in zip(["blue", "red"], row["probabilities"], strict=True)
                    if p > metrics["threshold"]]
        assert row["labels"] == expected


def test_point_regression_exports_verifies_and_scores_in_original_pixels(tiny, tmp_path):
    data = from_regression_csv(tiny / "points.csv", tiny / "img", points="x,y")
    result = train_regression_model(
        data, tmp_path / "train", arch="resnet18", weights="none", size=32, bs=8,
        freeze_epochs=1, epochs=1, lr=1e-3, patience=0)
    m = result.metrics
    assert {"valid_mse", "mae", "baseline_mse", "mean_pixel_distance",
            "mean_pixel_distance_original"} <= m.keys()
    # valid_mse is over every coordinate: the mean of the per-target squared RMSEs, and no
    # smaller than the squared MAE (Jensen); an untrained model is never exact.
    rmse = np.array(list(m["rmse_per_target"].values()))
    assert len(rmse) == 2 and m["valid_mse"] == pytest.approx(float(np.mean(rmse ** 2)))
    assert 0 < m["mae"] ** 2 <= m["valid_mse"] * (1 + 1e-6) and m["baseline_mse"] > 0
    assert (tmp_path / "train" / "plots" / "points.png").is_file()

    exported = export_image_model(tmp_path / "train", tmp_path / "reg", "dots")
    manifest = load_bundle(exported.bundle_path).manifest
    assert manifest["y_range"] == [-1.0, 1.0]
    assert manifest["targets"]["kind"] == "points" and manifest["classes"] == ["x", "y"]
    assert exported.parity.passed and check_bundle(exported.bundle_path).passed

    score_image_folder(tiny / "img", exported.bundle_path, tmp_path / "out", run_date=DAY,
                       workers=0)
    rows = {row["path"]: row["outputs"] for row in _scored(tmp_path / "out")}
    # The eager model on the same validation crops, mapped back with training's geometry.
    model, spec = load_image_model(tmp_path / "train")
    prep: Preprocessing = spec.preprocessing
    images = valid_sample(data, prep)
    x = images.permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(prep.mean).view(1, 3, 1, 1)) / torch.tensor(prep.std).view(1, 3, 1, 1)
    with torch.no_grad():
        coords = model(x)
    for item, c in zip(data.valid, coords, strict=True):
        expected = from_model_frame(c.tolist(), item.size, prep)
        assert rows[item.path.name] == pytest.approx(expected, abs=1.0)
        assert 0 <= rows[item.path.name][0] <= 48 and 0 <= rows[item.path.name][1] <= 40


def test_value_regression_cli_reports_baseline_and_keeps_outputs_in_target_units(tiny,
                                                                                  tmp_path):
    _invoke(["train", "regression", str(tiny / "tints.csv"), "--images", str(tiny / "img"),
             "--targets", "tint", "--out", str(tmp_path / "train"),
             "--registry", str(tmp_path / "reg"), "--name", "tint", *FAST])
    metrics = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert metrics["baseline_mse"] > 0 and "mean_pixel_distance" not in metrics
    bundle = load_bundle(resolve_bundle(str(tmp_path / "reg" / "tint")))
    low, high = bundle.manifest["y_range"]
    assert low < 40 / 255 and high > 200 / 255  # the training range, widened
    assert bundle.manifest["targets"] == {"kind": "values", "names": ["tint"]}
    score_image_folder(tiny / "img", str(tmp_path / "reg" / "tint"), tmp_path / "out",
                       run_date=DAY, workers=0)
    outputs = [row["outputs"] for row in _scored(tmp_path / "out")]
    assert all(len(o) == 1 and low <= o[0] <= high for o in outputs)


def test_regression_cli_refuses_targets_and_points_together(tiny, tmp_path):
    result = CliRunner().invoke(app, ["train", "regression", str(tiny / "points.csv"),
                                      "--images", str(tiny / "img"), "--targets", "x",
                                      "--points", "x,y", *FAST])
    assert result.exit_code != 0
    assert "exactly one of targets" in str(result.exception)
