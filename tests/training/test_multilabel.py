"""Multi-label data, metrics and threshold choice: CSV in, multi-hot targets, a tuned threshold."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from multilabel_sample import write_csv
from paths import SHARED_DATA
from PIL import Image

from training.data.multilabel import from_multilabel_csv, parse_labels
from training.errors import TrainingError
from training.evaluation import metrics
from training.evaluation.thresholds import CANDIDATES, choose_threshold, plot_threshold_sweep

SHARED = SHARED_DATA


def write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), np.uint8)).save(folder / name)


@pytest.fixture
def images(tmp_path) -> Path:
    write_images(tmp_path / "img", [f"{i}.png" for i in range(8)])
    return tmp_path / "img"


def test_labels_become_multi_hot_over_the_training_vocabulary(images, tmp_path):
    outside = tmp_path / "elsewhere"
    write_images(outside, ["abs.png"])
    rows = [["0.png", "cat dog", "0"], ["1.png", "dog", "0"], ["2.png", "", "0"],
            [str(outside / "abs.png"), "bird  cat", "0"],
            ["3.png", "cat", "1"], ["4.png", "cat fish", "1"], ["5.png", "fish", "1"]]
    data = from_multilabel_csv(write_csv(tmp_path / "l.csv", ["fname", "labels", "is_valid"],
                                         rows), images)
    assert data.classes == ("bird", "cat", "dog")
    by_name = {item.path.name: item.label for item in data.train + data.valid}
    assert by_name["0.png"] == (0.0, 1.0, 1.0)
    assert by_name["2.png"] == (0.0, 0.0, 0.0)  # no labels is a valid row
    assert by_name["abs.png"] == (1.0, 1.0, 0.0)  # absolute path used as it is
    assert by_name["4.png"] == (0.0, 1.0, 0.0)  # fish is not in the vocabulary
    assert data.valid_only == {"fish": 2}
    assert "fish (2)" in data.summary() and "no label 1" in data.summary()
    assert data.label_counts("train") == {"bird": 1, "cat": 2, "dog": 2}


def test_label_delimiter_and_random_split_are_seeded(images, tmp_path):
    rows = [[f"{i}.png", "a;b" if i % 2 else "b"] for i in range(8)]
    path = write_csv(tmp_path / "l.csv", ["fname", "tags"], rows)
    first = from_multilabel_csv(path, images, labels_col="tags", label_delim=";", seed=1)
    again = from_multilabel_csv(path, images, labels_col="tags", label_delim=";", seed=1)
    assert first.classes == ("a", "b")
    assert [i.path for i in first.valid] == [i.path for i in again.valid]
    assert len(first.valid) == 2 and len(first.train) == 6  # round(8 * 0.2)
    assert parse_labels("x  y x", " ") == ("x", "y")


@pytest.mark.parametrize("header,rows,message", [
    (["fname", "label"], [["0.png", "a"]], "line 1: no column 'labels'"),
    (["fname", "labels"], [["missing.png", "a"]], "line 2: file 'missing.png' not found"),
    (["fname", "labels", "is_valid"], [["0.png", "a", "maybe"]], "line 2: is_valid must be"),
    (["fname", "labels", "is_valid"], [["0.png", "", "0"], ["1.png", "a", "1"]],
     "no labels in the training rows"),
])
def test_csv_errors_name_the_file_and_line(images, tmp_path, header, rows, message):
    path = write_csv(tmp_path / "bad.csv", header, rows)
    with pytest.raises(TrainingError, match=message):
        from_multilabel_csv(path, images)


def test_accuracy_multi_and_f1_count_decisions_per_label():
    logits = torch.tensor([[2.0, -2.0], [2.0, 2.0], [-2.0, -2.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    # decisions: [1,0] [1,1] [0,0] → right: 2, 1, 1 of 2 each
    assert metrics.accuracy_multi(logits, targets) == pytest.approx(4 / 6)
    # label 0: tp 1, fp 1, fn 0 → 2/3; label 1: tp 1, fp 0, fn 1 → 2/3
    assert metrics.f1_per_label(logits, targets) == pytest.approx([2 / 3, 2 / 3])
    assert metrics.f1_micro(logits, targets) == pytest.approx(2 * 2 / (2 * 2 + 2))
    # a stricter threshold on probabilities turns the second row's label 0 off
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.8], [0.1, 0.2]])
    assert metrics.accuracy_multi(probs, targets, thresh=[0.7, 0.5], sigmoid=False) == \
        pytest.approx(5 / 6)


def _ap_by_definition(scores: list[float], truth: list[int]) -> float:
    """Mean over positives of the precision among items scored at least as high."""
    positives = [s for s, t in zip(scores, truth, strict=True) if t]
    precisions = []
    for p in positives:
        above = [t for s, t in zip(scores, truth, strict=True) if s >= p]
        precisions.append(sum(above) / len(above))
    return sum(precisions) / len(precisions)


def test_average_precision_matches_its_definition_with_ties():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, (30, 3)).astype(np.float32)  # many ties
    truth = rng.integers(0, 2, (30, 3))
    truth[0] = 1
    ap = metrics.average_precision(torch.tensor(scores), torch.tensor(truth, dtype=torch.float32))
    for j in range(3):
        assert ap[j] == pytest.approx(_ap_by_definition(scores[:, j].tolist(),
                                                        truth[:, j].tolist()))
    no_positive = metrics.average_precision(torch.ones(4, 1), torch.zeros(4, 1))
    assert np.isnan(no_positive[0])
    perfect = torch.tensor([[3.0], [2.0], [1.0], [0.0]]), torch.tensor([[1.0], [1.0], [0.], [0.]])
    assert metrics.mean_average_precision(*perfect) == pytest.approx(1.0)


def test_threshold_sweep_finds_the_gap_between_classes(tmp_path):
    # Label 0's positives score 0.33-0.40 and negatives 0.05-0.20; label 1 separates at 0.7.
    gen = torch.Generator().manual_seed(0)
    truth = (torch.rand(200, 2, generator=gen) > 0.5).float()
    low = torch.where(truth[:, 0] > 0, 0.33 + 0.07 * torch.rand(200, generator=gen),
                      0.05 + 0.14 * torch.rand(200, generator=gen))
    high = torch.where(truth[:, 1] > 0, 0.75 + 0.2 * torch.rand(200, generator=gen),
                       0.5 + 0.15 * torch.rand(200, generator=gen))
    probs = torch.stack([low, high], dim=1)
    one = choose_threshold(probs, truth, ["a", "b"])
    assert one.best in CANDIDATES and len(one.values) == len(CANDIDATES)
    assert one.best_value == max(v for v in one.values)
    assert one.best_value < 1.0  # no single threshold separates both labels
    per = choose_threshold(probs, truth, ["a", "b"], metric="f1_macro", per_label=True)
    assert 0.2 <= per.per_label["a"] <= 0.3 and 0.65 <= per.per_label["b"] <= 0.7
    assert per.per_label_value == pytest.approx(1.0)
    assert per.manifest_value() == [per.per_label["a"], per.per_label["b"]]
    assert one.manifest_value() == one.best
    png = plot_threshold_sweep(per, tmp_path / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_threshold_ties_go_to_the_one_nearest_one_half():
    probs = torch.tensor([[0.99], [0.01]])
    choice = choose_threshold(probs, torch.tensor([[1.0], [0.0]]), ["x"])
    assert choice.best == 0.5  # every candidate is perfect


def test_unknown_threshold_metric_is_refused():
    with pytest.raises(TrainingError, match="threshold metric"):
        choose_threshold(torch.zeros(2, 1), torch.zeros(2, 1), ["x"], metric="auc")


@pytest.mark.skipif(not (SHARED / "oxford-iiit-pet-sample").is_dir()
                    or not (SHARED / "hymenoptera_data").is_dir(),
                    reason="shared/data sample sets not present")
def test_shared_multilabel_set_nests_breeds_in_species(tmp_path):
    from multilabel_sample import write_multilabel_csv

    path = write_multilabel_csv(SHARED, tmp_path / "labels.csv")
    data = from_multilabel_csv(path, SHARED)
    assert set(data.classes) == {"insect", "ant", "bee", "cat", "abyssinian", "bengal", "dog",
                                 "american_bulldog"}
    counts = data.label_counts("train")
    assert counts["insect"] == counts["ant"] + counts["bee"]
    assert counts["cat"] == counts["abyssinian"] + counts["bengal"]
    assert counts["dog"] == counts["american_bulldog"]
    assert all(sum(item.label) == 2 for item in itertools.chain(data.train, data.valid))
    assert not data.valid_only and len(data.valid) > 150
