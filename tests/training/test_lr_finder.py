"""LR finder: leaves everything as it was, finds a working LR, and suggests like fastai."""

import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from training.errors import TrainingError
from training.evaluation.plots import plot_lr_find
from training.fit import head_sweep
from training.fit.head_sweep import lr_find_head, sweep_length
from training.fit.learner import Learner
from training.fit.lr_finder import (
    LRFinderResult,
    lr_find,
    suggest_minimum,
    suggest_slide,
    suggest_steep,
    suggest_valley,
)
from training.fit.precompute import precomputed_body

torch.set_num_threads(1)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(16, 3)

    def layer_groups(self) -> list[nn.Module]:
        return [self.body, self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def make_learner(n_train: int = 96, bs: int = 16, **kwargs) -> Learner:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + 48, 6, generator=g)
    y = (x @ torch.randn(6, 3, generator=g)).argmax(dim=1)
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=bs, shuffle=True)
    valid = DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=48)
    torch.manual_seed(0)
    return Learner(TinyNet(), train, valid, nn.CrossEntropyLoss(), device="cpu", **kwargs)


def everything(learner: Learner) -> dict:
    model = learner.model
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in
                  model.named_parameters()},
        "modes": [m.training for m in model.modules()],
        "opt": learner.opt.state_dict(),
        "sched": learner.scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "np_rng": np.random.get_state()[1].copy(),
        "py_rng": random.getstate(),
    }


def assert_nested_equal(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_nested_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_nested_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    else:
        assert a == b, path


def test_lr_find_leaves_model_optimizer_buffers_and_rngs_bit_identical():
    learner = make_learner()
    learner.fit_one_cycle(1, 1e-2)  # an optimizer with state, BN stats, gradients
    learner.model.eval()  # a non-default mode it must also restore
    before = everything(learner)
    result = lr_find(learner, num_it=30)
    assert len(result.lrs) > 5  # it did train
    assert_nested_equal(before, everything(learner))
    # And training afterwards is exactly what it would have been without the finder.
    after_finder = learner.fit_one_cycle(1, 1e-2)[-1]
    twin = make_learner()
    twin.fit_one_cycle(1, 1e-2)
    twin.model.eval()
    assert twin.fit_one_cycle(1, 1e-2)[-1].train_loss == after_finder.train_loss


def test_lr_find_suggests_an_lr_inside_the_range_that_trains_well():
    result = lr_find(make_learner())
    # The known good range, measured: short fits over a grid of LRs.
    baseline = None
    good = []
    for lr in np.logspace(-5, 1, 13):
        learner = make_learner(seed=0)
        loss = learner.fit_one_cycle(3, float(lr))[-1].valid_loss
        baseline = loss if baseline is None else baseline
        if loss < 0.9 * baseline:
            good.append(float(lr))
    lo, hi = min(good), max(good)
    assert hi / lo >= 10  # the problem has a real range, not a needle
    assert lo / 3 <= result.suggestion <= hi
    for name, lr in result.suggestions.items():
        assert lo / 10 <= lr <= hi, name


def test_sweep_is_exponential_smoothed_and_repeats_a_short_loader():
    learner = make_learner(n_train=48, bs=16)  # 3 batches per pass
    result = lr_find(learner, start_lr=1e-6, end_lr=1e-2, num_it=20, stop_div=False)
    assert len(result.lrs) == 20
    assert result.lrs[0] == pytest.approx(1e-6) and result.lrs[-1] == pytest.approx(1e-2)
    ratios = np.diff(np.log(result.lrs))
    assert np.allclose(ratios, ratios[0])
    assert all(math.isfinite(loss) for loss in result.losses)


def test_stop_div_ends_the_sweep_once_the_loss_explodes():
    learner = make_learner()
    result = lr_find(learner, start_lr=1e-3, end_lr=1e4, num_it=100)
    assert len(result.lrs) < 100
    last, best = result.losses[-1], min(result.losses)
    assert last > 4 * best or not math.isfinite(last)


def test_suggestions_on_known_curves():
    lrs = list(np.logspace(-6, 0, 61))
    x = np.log10(lrs)
    # Flat at 2, falls to 0.5 centred at 1e-3 (tanh), rises steeply after 1e-1.
    losses = list(1.25 - 0.75 * np.tanh(2 * (x + 3)) + np.where(x > -1, 10 * (x + 1) ** 2, 0))
    assert suggest_steep(lrs, losses) == pytest.approx(1e-3, rel=0.3)
    i_min = int(np.argmin(losses))
    assert suggest_minimum(lrs, losses) == pytest.approx(lrs[i_min] / 10)
    valley = suggest_valley(lrs, losses)
    assert 1e-4 < valley < lrs[i_min]  # inside the descent, past its start
    slide = suggest_slide(lrs, losses)
    assert lrs[0] <= slide < 1e-1  # left of the explosion


def test_valley_matches_fastai_on_a_strictly_decreasing_curve():
    # fastai: the valley spans everything; idx = start + int(len/3) + int(len/6) with start = -1.
    lrs = [10.0 ** (i / 10) for i in range(31)]
    losses = [3.0 - 0.05 * i for i in range(31)]
    assert suggest_valley(lrs, losses) == lrs[-1 + 10 + 5]


def test_result_serialises_and_plots(tmp_path):
    result = lr_find(make_learner(), num_it=40, suggestion="minimum")
    assert result.suggestion == result.suggestions["minimum"]
    data = json.loads(json.dumps(result.to_dict()))
    assert set(data["suggestions"]) == {"valley", "steep", "minimum", "slide"}
    assert data["chosen"] == "minimum" and len(data["lrs"]) == len(data["losses"])
    path = plot_lr_find(result, tmp_path / "lr_find.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(AttributeError):
        result.chosen = "valley"  # frozen


def test_bad_arguments_are_training_errors():
    learner = make_learner()
    with pytest.raises(TrainingError, match="suggestion must be one of"):
        lr_find(learner, suggestion="best")
    with pytest.raises(TrainingError, match="start_lr < end_lr"):
        lr_find(learner, start_lr=1.0, end_lr=1e-3)
    assert isinstance(lr_find(learner, num_it=20), LRFinderResult)


# ---- the frozen stage's sweep of the head on cached body features -------------------------


def test_head_sweep_leaves_model_optimizer_buffers_and_rngs_bit_identical():
    learner = make_learner()
    learner.fit_one_cycle(1, 1e-2)
    learner.freeze()
    learner.model.train()  # caching puts the body in eval mode: that must be undone too
    before = everything(learner)
    result = lr_find_head(learner, num_it=50)
    assert len(result.lrs) > 5
    assert_nested_equal(before, everything(learner))
    assert learner.train_module is learner.model
    after_finder = learner.fit_one_cycle(1, 1e-2)[-1]
    twin = make_learner()
    twin.fit_one_cycle(1, 1e-2)
    twin.freeze()
    twin.model.train()
    assert twin.fit_one_cycle(1, 1e-2)[-1].train_loss == after_finder.train_loss


def test_head_sweep_is_the_same_with_or_without_precompute(monkeypatch):
    monkeypatch.setattr(head_sweep, "MAX_CACHED", 40)  # a subset of the 96 samples, both ways
    plain = make_learner()
    plain.freeze()
    without = lr_find_head(plain)
    cached = make_learner()
    with precomputed_body(cached):
        with_cache = lr_find_head(cached)
        assert cached.train_module is not cached.model  # still on precompute's cache
    assert without.losses == with_cache.losses
    assert without.suggestions == with_cache.suggestions


def test_head_sweep_length_scales_with_the_data():
    assert sweep_length(7) == head_sweep.MIN_ITERATIONS  # ants/bees: 245 images, bs 32
    assert sweep_length(100) == 100 * head_sweep.PASSES > sweep_length(30) > sweep_length(7)
    assert sweep_length(10_000) == head_sweep.MAX_ITERATIONS
    small = lr_find_head(make_learner(n_train=96, bs=1), stop_div=False)
    assert len(small.lrs) == small.num_it == sweep_length(96)
    subset = head_sweep.cached_subset(10_000)
    assert len(subset) == head_sweep.MAX_CACHED and subset[0] == 0 and subset[-1] == 9_999
    assert head_sweep.cached_subset(100) is None


def test_head_sweep_needs_a_body_and_a_head():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    learner = Learner(nn.Linear(6, 3), DataLoader(TensorDataset(x, y), batch_size=8), None,
                      nn.CrossEntropyLoss(), device="cpu")
    with pytest.raises(TrainingError, match="needs a model with .body and .head"):
        lr_find_head(learner)
