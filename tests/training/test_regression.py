"""Image regression data: float targets, pixel points that move with crops and flips, group splits,
and the regression metrics a user reads (valid_mse against baseline_mse, pixel distances)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from multilabel_sample import write_csv
from paths import SHARED_DATA
from PIL import Image
from torchvision import tv_tensors

from export.pixels import Preprocessing, from_model_frame, to_model_frame, upright_size
from training.data.points import (
    PointItem,
    PointItemsDataset,
    plot_points,
)
from training.data.regression import from_regression_csv
from training.data.transforms import train_transform, valid_transform
from training.errors import TrainingError
from training.evaluation import metrics
from training.recipes.regression import model_frame_targets, resolve_y_range

SHARED = SHARED_DATA
PETS = SHARED / "oxford-iiit-pet-sample"
PRE = Preprocessing(input_size=40, resize_size=46, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def dot_image(path: Path, size: tuple[int, int], at: tuple[int, int], fmt: str = "PNG") -> Path:
    """Dark image of ``size`` (w, h) with a bright 5x5 square centred on pixel ``at``."""
    pixels = np.full((size[1], size[0], 3), 20, np.uint8)
    x, y = at
    pixels[max(y - 2, 0):y + 3, max(x - 2, 0):x + 3] = 255
    Image.fromarray(pixels).save(path, format=fmt, quality=95)
    return path


@pytest.fixture
def dots(tmp_path) -> Path:
    """12 images 90x60 with a dot; CSV with pixel x,y, a float target and a group column."""
    folder = tmp_path / "img"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        x, y = int(rng.integers(5, 85)), int(rng.integers(5, 55))
        dot_image(folder / f"{i}.png", (90, 60), (x, y))
        rows.append([f"{i}.png", x, y, i / 10, f"g{i % 4}"])
    write_csv(tmp_path / "t.csv", ["fname", "px", "py", "age", "person"], rows)
    return tmp_path


def test_float_targets_and_points_are_read_in_column_order(dots):
    values = from_regression_csv(dots / "t.csv", dots / "img", targets="age")
    assert values.kind == "values" and values.classes == ("age",)
    assert sorted(i.label[0] for i in values.train + values.valid) == \
        pytest.approx([i / 10 for i in range(12)])
    points = from_regression_csv(dots / "t.csv", dots / "img", points="px,py")
    assert points.kind == "points" and points.points == (("px", "py"),)
    item = points.train[0]
    assert isinstance(item, PointItem) and item.size == (90, 60) and len(item.label) == 2
    assert "points (px,py)" in points.summary()


def test_split_by_keeps_each_group_on_one_side(dots):
    data = from_regression_csv(dots / "t.csv", dots / "img", targets="age", split_by="person",
                               valid_pct=0.25, seed=5)
    groups = {}
    for split in ("train", "valid"):
        for item in getattr(data, split):
            groups.setdefault(int(item.path.stem) % 4, set()).add(split)
    assert all(len(sides) == 1 for sides in groups.values())
    assert len(data.valid) == 3 and data.split == "by group person"


@pytest.mark.parametrize("kwargs,rows,message", [
    ({"targets": "age"}, [["0.png", "old"]], "line 2: age must be a number, got 'old'"),
    ({"targets": "age"}, [["0.png", "nan"]], "line 2: age must be finite"),
    ({"points": "x"}, [["0.png", "1"]], "x,y column pairs"),
    ({}, [["0.png", "1"]], "exactly one of targets"),
    ({"targets": "age", "split_by": "age"}, [["0.png", "1"], ["0.png", "1"]],
     "only 1 group"),
])
def test_bad_tables_are_refused_with_the_line(dots, kwargs, rows, message):
    header = ["fname", "x"] if "points" in kwargs else ["fname", "age"]
    path = write_csv(dots / "bad.csv", header, rows)
    with pytest.raises(TrainingError, match=message):
        from_regression_csv(path, dots / "img", **kwargs)


@pytest.mark.parametrize("size", [(200, 100), (100, 200), (123, 77), (40, 40)])
def test_model_frame_is_torchvisions_validation_geometry(size):
    pixels = [3.0, 5.0, size[0] / 2, size[1] / 2, size[0] - 7.0, size[1] - 1.0]
    keypoints = tv_tensors.KeyPoints(torch.tensor(pixels).reshape(-1, 2),
                                     canvas_size=(size[1], size[0]))
    image = Image.new("RGB", size)
    _, moved = valid_transform(PRE)(image, keypoints)
    expected = (moved.as_subclass(torch.Tensor).reshape(-1) / PRE.input_size * 2 - 1).tolist()
    assert to_model_frame(pixels, size, PRE) == pytest.approx(expected, abs=1e-5)
    assert from_model_frame(expected, size, PRE) == pytest.approx(pixels, abs=1e-4)


@pytest.mark.parametrize("fmt,size", [("PNG", (90, 60)), ("JPEG", (400, 300))])
def test_point_targets_follow_the_dot_through_random_crops_and_flips(tmp_path, fmt, size):
    # The JPEG is decoded at reduced scale (min_side), so the points must be rescaled too.
    at = (int(size[0] * 0.7), int(size[1] * 0.4))
    path = dot_image(tmp_path / f"dot.{fmt.lower()}", size, at, fmt)
    item = PointItem(path, (float(at[0]), float(at[1])), upright_size(path))
    dataset = PointItemsDataset([item], train_transform(PRE, scale=(0.6, 1.0)), min_side=60)
    torch.manual_seed(0)
    hits = 0
    for _ in range(12):
        x, target = dataset[0]
        if target.abs().max() > 0.9:
            continue  # the crop cut the dot away or left it on the edge
        brightness = x.mean(0)
        row, col = divmod(int(brightness.argmax()), brightness.shape[1])
        u, v = (target + 1) / 2 * PRE.input_size
        assert abs(float(u) - col) <= 2.5 and abs(float(v) - row) <= 2.5
        hits += 1
    assert hits >= 6


def test_resolve_y_range_defaults(dots):
    points = from_regression_csv(dots / "t.csv", dots / "img", points="px,py")
    values = from_regression_csv(dots / "t.csv", dots / "img", targets="age")
    assert resolve_y_range(points, "auto") == (-1.0, 1.0)
    low, high = resolve_y_range(values, "auto")
    assert low < 0.0 and high > 1.1 and high - low == pytest.approx(1.1 * 1.2)
    assert resolve_y_range(values, None) is None
    assert resolve_y_range(values, (0, 5)) == (0.0, 5.0)
    with pytest.raises(TrainingError, match="y_range"):
        resolve_y_range(values, (5, 0))


def test_baseline_mse_is_the_error_of_the_training_mean():
    train = torch.tensor([[0.0, 2.0], [2.0, 4.0]])  # mean (1, 3)
    valid = torch.tensor([[1.0, 3.0], [3.0, 3.0]])
    assert metrics.baseline_mse(train, valid) == pytest.approx((0 + 0 + 4 + 0) / 4)
    assert metrics.mse(valid, valid) == 0.0
    assert metrics.mae(torch.zeros(2, 2), valid) == pytest.approx(10 / 4)
    # points (0,0)→(3,4) and (1,1)→(1,1): distances 5 and 0
    assert metrics.mean_point_distance(torch.tensor([[0.0, 0.0, 1.0, 1.0]]),
                                       torch.tensor([[3.0, 4.0, 1.0, 1.0]]), scale=2) == 5.0


def test_model_frame_targets_and_points_plot(dots, tmp_path):
    data = from_regression_csv(dots / "t.csv", dots / "img", points="px,py")
    targets = model_frame_targets(data, "valid", PRE)
    assert targets.shape == (len(data.valid), 2) and targets.abs().max() <= 1.5
    images = torch.zeros((len(data.valid), 40, 40, 3), dtype=torch.uint8)
    png = plot_points(images, targets, targets * 0.5, tmp_path / "points.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(not PETS.is_dir(), reason="shared/data/oxford-iiit-pet-sample not present")
def test_pet_head_centres_read_as_points():
    data = from_regression_csv(PETS / "derived" / "head_center.csv", PETS,
                               points="center_x,center_y")
    assert len(data.train) + len(data.valid) == 295
    for item in data.train[:20]:
        assert 0 <= item.label[0] <= item.size[0] and 0 <= item.label[1] <= item.size[1]
