"""Training the head on cached body features equals training it through the frozen body."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from training.errors import TrainingError
from training.evaluation.metrics import accuracy
from training.fit.learner import Learner
from training.fit.precompute import fit_head_precomputed, precomputed_body

torch.set_num_threads(1)


class TinyCNN(nn.Module):
    """A conv body with BatchNorm and a dropout head: ImageModel's shape, in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(0.25), nn.Linear(8, 2))

    def layer_groups(self) -> list[nn.Module]:
        return [self.body[:3], self.body[3:], self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def images() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, 12, 12, generator=g)
    y = (x[:, 0].mean(dim=(1, 2)) > x[:, 1].mean(dim=(1, 2))).long()
    return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])


def make_learner(model_cls=TinyCNN) -> Learner:
    train, valid = images()
    torch.manual_seed(0)
    return Learner(model_cls(), DataLoader(train, batch_size=16, shuffle=True),
                   DataLoader(valid, batch_size=16), nn.CrossEntropyLoss(),
                   {"accuracy": accuracy}, device="cpu", seed=1)


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_head_on_cache_matches_head_through_the_frozen_body():
    through = make_learner()
    body_before = state(through.model.body)
    through.freeze(train_bn=False)
    reference = through.fit_one_cycle(3, 1e-2)

    cached = make_learner()
    records = fit_head_precomputed(cached, 3, 1e-2, train_loader=cached.train_loader)

    for name, value in state(through.model.head).items():
        assert torch.allclose(value, cached.model.head.state_dict()[name], atol=1e-5), name
    assert not torch.equal(through.model.head[1].weight, make_learner().model.head[1].weight)
    for a, b in zip(reference, records, strict=True):
        assert a.valid_loss == pytest.approx(b.valid_loss, abs=1e-5)
        assert a.train_loss == pytest.approx(b.train_loss, abs=1e-5)
        assert a.lrs == pytest.approx(b.lrs)  # reported per layer group in both
    for learner in (through, cached):  # the body is untouched: weights and BN statistics
        for name, value in state(learner.model.body).items():
            assert torch.equal(value, body_before[name]), name


def count_body_calls(learner: Learner) -> list[int]:
    calls = [0]
    learner.model.body.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_the_body_runs_once_per_batch_whatever_the_number_of_epochs():
    counts = []
    for epochs in (1, 4):
        learner = make_learner()
        calls = count_body_calls(learner)
        fit_head_precomputed(learner, epochs, 1e-2)
        counts.append(calls[0])
    assert counts[0] == counts[1]
    assert counts[0] <= len(make_learner().train_loader) + len(make_learner().valid_loader) + 2


def test_features_the_caller_has_spare_the_training_pass_but_not_a_partial_set():
    from training.fit.precompute import compute_features

    learner = make_learner()
    plain = DataLoader(learner.train_loader.dataset, batch_size=16)
    features = compute_features(learner, plain)
    calls = count_body_calls(learner)
    counts = {}
    for name, given in (("none", None), ("all", features),
                        ("partial", (features[0][:5], features[1][:5]))):
        calls[0] = 0
        with precomputed_body(learner, plain, given) as inside:
            assert len(inside.train_loader.dataset) == len(plain.dataset)
        counts[name] = calls[0]
    assert counts["none"] - counts["all"] >= len(plain)  # the training pass is spared
    assert counts["partial"] == counts["none"]  # a subset is no cache: every sample anew


def test_context_puts_the_model_and_loaders_back_and_the_head_keeps_its_training():
    learner = make_learner()
    train, valid = learner.train_loader, learner.valid_loader
    head_before = learner.model.head[1].weight.detach().clone()
    with precomputed_body(learner):
        assert learner.train_module is not learner.model
        learner.fit_one_cycle(1, 1e-2)
        preds, targets = learner.predict()  # the full model on images, not on features
        assert preds.shape == (32, 2) and targets.shape == (32,)
    assert learner.train_module is learner.model
    assert learner.train_loader is train and learner.valid_loader is valid
    assert not torch.equal(learner.model.head[1].weight, head_before)
    learner.unfreeze()
    learner.fit_one_cycle(1, 1e-3)  # the full model trains afterwards
    assert [r.epoch for r in learner.history] == [0, 1]


def test_caching_does_not_shift_the_random_stream():
    learner = make_learner()
    rng = torch.get_rng_state()
    with precomputed_body(learner):
        assert torch.equal(torch.get_rng_state(), rng)


class NoBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 2))

    def forward(self, x):
        return self.net(x)


class NotComposed(TinyCNN):
    def forward(self, x):
        return self.head(self.body(x)) * 2


@pytest.mark.parametrize("model_cls, message", [
    (NoBody, "needs a model with .body and .head"),
    (NotComposed, r"model\(x\) == model.head\(model.body\(x\)\)"),
])
def test_models_precompute_cannot_serve_are_refused(model_cls, message):
    learner = make_learner(model_cls)
    with pytest.raises(TrainingError, match=message):
        fit_head_precomputed(learner, 1, 1e-2)
