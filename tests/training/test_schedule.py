"""One-cycle LR/momentum shape, discriminative LRs and weight-decay groups, seen through a fit."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from training.errors import TrainingError
from training.fit.learner import Learner
from training.fit.schedule import even_mults, lrs_per_group, make_optimizer, one_cycle

torch.set_num_threads(1)


class TinyNet(nn.Module):
    """Three layer groups (two body groups with BatchNorm, one head), like ImageModel."""

    def __init__(self, n_in: int = 6, n_out: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(n_in, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8)
        )
        self.head = nn.Linear(8, n_out)

    def layer_groups(self) -> list[nn.Module]:
        return [self.body[:3], self.body[3:], self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def make_learner(n_batches: int = 8, bs: int = 4, progress=None, **kwargs) -> Learner:
    torch.manual_seed(0)
    x = torch.randn(n_batches * bs, 6)
    y = torch.randint(0, 3, (n_batches * bs,))
    train = DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True)
    valid = DataLoader(TensorDataset(x[:8], y[:8]), batch_size=8)
    return Learner(TinyNet(), train, valid, nn.CrossEntropyLoss(), device="cpu",
                   progress=progress, **kwargs)


def batch_events(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "batch"]


def test_one_cycle_lr_and_beta1_follow_fastai_shape():
    events: list[dict] = []
    learner = make_learner(n_batches=8, progress=events.append)
    lr_max = 1e-2
    learner.fit_one_cycle(2, lr_max)  # 16 steps, warm-up over the first 4
    batches = batch_events(events)
    lrs = [e["lrs"][-1] for e in batches]
    betas = [e["beta1"] for e in batches]
    assert len(lrs) == 16
    assert lrs[0] == pytest.approx(lr_max / 25)
    peak = lrs.index(max(lrs))
    assert peak == 3 and lrs[peak] == pytest.approx(lr_max)
    assert lrs[-1] == pytest.approx(lr_max / 1e5)
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1 : peak + 1], strict=True))
    assert all(a > b for a, b in zip(lrs[peak:-1], lrs[peak + 1 :], strict=True))
    assert betas[0] == pytest.approx(0.95)
    assert betas[peak] == pytest.approx(0.85)
    assert betas[-1] == pytest.approx(0.95)
    assert min(betas) == pytest.approx(0.85)


def test_slice_spreads_lrs_geometrically_across_layer_groups():
    events: list[dict] = []
    learner = make_learner(progress=events.append)
    learner.fit_one_cycle(1, slice(1e-5, 1e-3))
    for event in batch_events(events):
        early, late, head = event["lrs"]
        assert late / early == pytest.approx(10) and head / late == pytest.approx(10)
    peak = max(batch_events(events), key=lambda e: e["lrs"][-1])
    assert peak["lrs"] == pytest.approx([1e-5, 1e-4, 1e-3])


def test_lr_spec_forms():
    assert even_mults(1e-6, 1e-2, 5) == pytest.approx([1e-6, 1e-5, 1e-4, 1e-3, 1e-2])
    assert lrs_per_group(3e-3, 3) == [3e-3] * 3
    assert lrs_per_group(slice(1e-3), 3) == pytest.approx([1e-4, 1e-4, 1e-3])
    assert lrs_per_group([1e-4, 2e-4, 3e-4], 3) == [1e-4, 2e-4, 3e-4]
    with pytest.raises(TrainingError, match="2 values but the model has 3 layer groups"):
        lrs_per_group([1e-4, 1e-3], 3)
    with pytest.raises(TrainingError, match="positive"):
        lrs_per_group(-1.0, 2)


class LooseParameters(nn.Module):
    """A layer group that is a view: parameters held in a ParameterList under other names."""

    def __init__(self, params) -> None:
        super().__init__()
        self.loose = nn.ParameterList(params)


class ViewGroups(TinyNet):
    def layer_groups(self) -> list[nn.Module]:
        return [LooseParameters(self.body[:3].parameters()),
                LooseParameters(self.body[3:].parameters()), self.head]


@pytest.mark.parametrize("model_cls", [TinyNet, ViewGroups])
def test_no_weight_decay_on_norm_and_bias_parameters(model_cls):
    torch.manual_seed(0)
    model = model_cls()
    opt = make_optimizer(model, [1e-1, 1e-1, 1e-1], wd=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {"body.0.weight", "body.3.weight", "head.weight"}
    # Behaviour: with zero gradients only AdamW's decoupled decay moves a parameter.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        assert moved == (name in decayed), name


def test_only_trainable_parameters_enter_the_optimizer_and_frozen_groups_keep_their_lr():
    model = TinyNet()
    for p in model.body.parameters():
        p.requires_grad_(False)
    opt = make_optimizer(model, [1e-4, 1e-3, 1e-2], wd=0.01)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.head.parameters()}
    assert [g["layer_group"] for g in opt.param_groups] == [0, 0, 1, 1, 2, 2]


def test_momentum_cycle_must_return_to_its_start():
    opt = make_optimizer(TinyNet(), [1e-3] * 3, wd=0.0)
    with pytest.raises(TrainingError, match="moms"):
        one_cycle(opt, 10, moms=(0.95, 0.85, 0.9))


def test_one_step_warm_up_does_not_divide_by_zero():
    # OneCycleLR itself raises ZeroDivisionError when pct_start * total_steps == 1.
    opt = make_optimizer(TinyNet(), [1e-2] * 3, wd=0.0)
    sched = one_cycle(opt, 4, pct_start=0.25)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[-1]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-2 / 25)
    assert lrs[1] == pytest.approx(1e-2)
    assert lrs[-1] == pytest.approx(1e-2 / 1e5)
    assert all(math.isfinite(lr) for lr in lrs)
