"""Validation with TTA: the averaged outputs come back in the form each task's metrics read."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from training.evaluation.tta import as_outputs, tta_predict, with_and_without_tta
from training.fit.learner import Learner

torch.set_num_threads(1)


class Conv(nn.Module):
    def __init__(self, n_out: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * 6 * 6, n_out))

    def forward(self, x):
        return self.net(x)


def learner_for(model, y) -> Learner:
    x = torch.randn(len(y), 3, 8, 8, generator=torch.Generator().manual_seed(1))
    valid = DataLoader(TensorDataset(x, y), batch_size=4)
    return Learner(model, valid, valid, nn.MSELoss(), device="cpu")


@pytest.mark.parametrize("task", ["single_label", "multi_label", "regression"])
def test_tta_outputs_are_the_mean_of_both_views_in_the_tasks_own_form(task):
    model = Conv(3)
    learner = learner_for(model, torch.zeros(10, 3))
    preds, _ = tta_predict(learner, task)
    x = learner.valid_loader.dataset.tensors[0]
    with torch.no_grad():
        direct, mirrored = model(x), model(x.flip(-1))
    if task == "single_label":
        expected = (direct.softmax(-1) + mirrored.softmax(-1)) / 2
        torch.testing.assert_close(preds.softmax(-1), expected)
    elif task == "multi_label":
        torch.testing.assert_close(preds.sigmoid(), (direct.sigmoid() + mirrored.sigmoid()) / 2)
    else:
        torch.testing.assert_close(preds, (direct + mirrored) / 2)


def test_points_of_the_mirror_view_are_mirrored_back_before_averaging():
    model = Conv(4)
    learner = learner_for(model, torch.zeros(6, 4))
    preds, _ = tta_predict(learner, "regression", points=True)
    x = learner.valid_loader.dataset.tensors[0]
    with torch.no_grad():
        direct, mirrored = model(x), model(x.flip(-1))
    mirrored[:, 0::2] *= -1
    torch.testing.assert_close(preds, (direct + mirrored) / 2)


def test_the_tta_block_keeps_numbers_and_names_the_views():
    block = with_and_without_tta({"accuracy": 0.9}, {"accuracy": 0.95, "n_valid": 10,
                                                     "confusion_matrix": [[1]], "ok": True})
    assert block == {"accuracy": 0.9, "tta": {"views": ["centre_crop", "centre_crop_hflip"],
                                              "accuracy": 0.95}}
    assert as_outputs("single_label", torch.tensor([[1.0, 0.0]]))[0, 1] > -20
