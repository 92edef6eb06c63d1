"""Classification metrics on logits and on decided labels; confusion matrix and its plot."""

import math

import pytest
import torch

from training.errors import TrainingError
from training.evaluation.metrics import (
    accuracy,
    confusion_matrix,
    error_rate,
    get_metric,
    most_confused,
    per_class_accuracy,
)
from training.evaluation.plots import plot_confusion_matrix

# Six samples, three classes; the argmax of each logit row is [0, 1, 1, 2, 0, 2].
LOGITS = torch.tensor([
    [2.0, 0.1, 0.3],
    [0.1, 1.5, 0.2],
    [0.9, 1.0, -1.0],
    [0.0, 0.0, 0.5],
    [3.0, 1.0, 2.0],
    [-1.0, 0.0, 4.0],
])
TARGETS = torch.tensor([0, 1, 0, 2, 1, 2])


def test_accuracy_and_error_rate_from_logits_and_labels():
    assert accuracy(LOGITS, TARGETS) == pytest.approx(4 / 6)
    assert error_rate(LOGITS, TARGETS) == pytest.approx(2 / 6)
    decided = torch.tensor([0, 1, 1, 2, 0, 2])
    assert accuracy(decided, TARGETS) == accuracy(LOGITS, TARGETS)
    assert accuracy(LOGITS.softmax(dim=1), TARGETS) == accuracy(LOGITS, TARGETS)
    assert get_metric("error_rate") is error_rate


def test_confusion_matrix_rows_are_actual_columns_predicted():
    cm = confusion_matrix(LOGITS, TARGETS)
    expected = torch.zeros(3, 3, dtype=torch.long)
    for actual, predicted in zip(TARGETS.tolist(), [0, 1, 1, 2, 0, 2], strict=True):
        expected[actual, predicted] += 1
    assert torch.equal(cm, expected)
    assert int(cm.sum()) == 6 and int(cm.trace()) == 4
    assert confusion_matrix(LOGITS, TARGETS, num_classes=4).shape == (4, 4)


def test_per_class_accuracy_is_recall_and_nan_for_absent_classes():
    per_class = per_class_accuracy(LOGITS, TARGETS, num_classes=4)
    assert per_class[:3] == pytest.approx([1 / 2, 1 / 2, 1.0])
    assert math.isnan(per_class[3])


def test_most_confused_lists_off_diagonal_pairs_by_count():
    cm = torch.tensor([[5, 3, 0], [1, 7, 2], [0, 3, 4]])
    pairs = most_confused(cm, ["ant", "bee", "wasp"])
    assert pairs[:2] in ([("ant", "bee", 3), ("wasp", "bee", 3)],
                         [("wasp", "bee", 3), ("ant", "bee", 3)])
    assert pairs[2:] == [("bee", "wasp", 2), ("bee", "ant", 1)]
    assert most_confused(cm, ["ant", "bee", "wasp"], min_count=3) == pairs[:2]
    with pytest.raises(TrainingError, match="2 class names"):
        most_confused(cm, ["ant", "bee"])


def test_mismatched_lengths_are_a_training_error():
    with pytest.raises(TrainingError, match="6 predictions for 5 targets"):
        accuracy(LOGITS, TARGETS[:5])
    with pytest.raises(TrainingError, match="unknown metric"):
        get_metric("f1")


def test_confusion_matrix_plot_writes_a_png_without_touching_pyplot(tmp_path):
    import matplotlib.pyplot as plt

    open_before = plt.get_fignums()
    path = plot_confusion_matrix(confusion_matrix(LOGITS, TARGETS), ["a", "b", "c"],
                                 tmp_path / "plots" / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plt.get_fignums() == open_before
