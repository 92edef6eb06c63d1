"""The Learner's loop: freezing, early stopping, NaN handling, reproducibility, AMP step skips."""

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from training.errors import TrainingError
from training.evaluation.metrics import accuracy
from training.fit.early_stopping import EarlyStopping
from training.fit.learner import Learner

torch.set_num_threads(1)


class TinyNet(nn.Module):
    """``.body`` / ``.head`` and three layer groups, like ImageModel; dropout draws random."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(),
            nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(16, 3))

    def layer_groups(self) -> list[nn.Module]:
        return [self.body[:3], self.body[3:], self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def blobs(n: int = 144) -> TensorDataset:
    """Three linearly separable classes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    w = torch.randn(6, 3, generator=g)
    return TensorDataset(x, (x @ w).argmax(dim=1))


def make_learner(model=None, *, bs=16, loss_fn=None, **kwargs) -> Learner:
    x, y = blobs().tensors
    train = DataLoader(TensorDataset(x[:96], y[:96]), batch_size=bs, shuffle=True)
    valid = DataLoader(TensorDataset(x[96:], y[96:]), batch_size=24)
    if model is None:
        torch.manual_seed(0)
        model = TinyNet()
    kwargs.setdefault("device", "cpu")
    return Learner(model, train, valid, loss_fn or nn.CrossEntropyLoss(),
                   {"accuracy": accuracy}, **kwargs)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fit_learns_and_history_counts_epochs_across_stages():
    learner = make_learner()
    first = learner.fit_one_cycle(5, 3e-2, stage="a")
    second = learner.fit_one_cycle(2, 1e-3, stage="b")
    assert [r.epoch for r in learner.history] == [0, 1, 2, 3, 4, 5, 6]
    assert [r.stage for r in learner.history] == ["a"] * 5 + ["b"] * 2
    assert learner.history == first + second
    assert second[-1].valid_loss < first[0].valid_loss
    assert second[-1].metrics["accuracy"] > 0.75
    record = json.loads(json.dumps(second[-1].to_dict()))
    assert record["lrs"] == list(second[-1].lrs) and len(record["lrs"]) == 3


def test_freeze_keeps_body_weights_but_trains_batchnorm_affine():
    learner = make_learner()
    learner.freeze()
    before = state(learner.model)
    learner.fit_one_cycle(2, 1e-2)
    after = state(learner.model)
    for name in ["body.0.weight", "body.0.bias", "body.3.weight", "body.3.bias"]:
        assert torch.equal(before[name], after[name]), name
    for name in ["body.1.weight", "body.1.bias", "body.4.weight", "head.1.weight"]:
        assert not torch.equal(before[name], after[name]), name
    assert not torch.equal(before["body.1.running_mean"], after["body.1.running_mean"])


class LooseParameters(nn.Module):
    def __init__(self, params) -> None:
        super().__init__()
        self.loose = nn.ParameterList(params)


def test_freeze_finds_batchnorm_through_layer_groups_that_are_views():
    model = TinyNet()
    model.layer_groups = lambda: [LooseParameters(model.body.parameters()), model.head]
    learner = make_learner(model)
    learner.freeze()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"body.1.weight", "body.1.bias", "body.4.weight", "body.4.bias",
                         "head.1.weight", "head.1.bias"}


def test_freeze_without_train_bn_keeps_the_body_bit_identical():
    learner = make_learner()
    learner.freeze(train_bn=False)
    before = state(learner.model)
    learner.fit_one_cycle(2, 1e-2)
    after = state(learner.model)
    body = {k: v for k, v in before.items() if k.startswith("body.")}
    assert_same(body, {k: after[k] for k in body})  # affines and running stats alike
    assert not torch.equal(before["head.1.weight"], after["head.1.weight"])


def test_unfreeze_trains_every_group():
    learner = make_learner()
    learner.freeze()
    learner.unfreeze()
    before = state(learner.model)
    learner.fit_one_cycle(1, 1e-2)
    after = state(learner.model)
    assert all(not torch.equal(p, after[n]) for n, p in before.items() if n.endswith("weight"))


def test_keeping_bn_statistics_trains_their_affines_but_not_their_running_stats():
    kept, updated = make_learner(), make_learner()
    kept.keep_bn_stats = True
    before = state(kept.model)
    for learner in (kept, updated):
        learner.fit_one_cycle(1, 1e-2)
    after, moved = state(kept.model), state(updated.model)
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert all(not torch.equal(before[k], moved[k]) for k in stats)  # batch stats move them
    assert not torch.equal(before["body.1.weight"], after["body.1.weight"])  # BN's affine
    kept.set_train_mode(True)
    assert kept.model.training and kept.model.head.training and not kept.model.body[1].training


class ScriptedScore:
    """A metric that returns a fixed sequence of values, one per validation pass."""

    def __init__(self, values):
        self.values = list(values)

    def __call__(self, preds, targets) -> float:
        return self.values.pop(0)


def test_early_stopping_restores_the_best_epochs_exact_weights_and_names_it():
    snapshots = {}
    learner = make_learner(progress=None)
    learner.metrics["score"] = ScriptedScore([0.5, 0.9, 0.7, 0.6, 0.4, 0.3])
    learner.progress = lambda e: e["event"] == "epoch_end" and snapshots.update(
        {e["epoch"]: state(learner.model)})
    stopper = EarlyStopping(monitor="score", patience=2)
    assert stopper.mode == "max"
    records = learner.fit_one_cycle(6, 1e-2, early_stopping=stopper)
    assert [r.epoch for r in records] == [0, 1, 2, 3]  # two epochs without improvement
    assert stopper.best_epoch == 1 and stopper.stopped_early and stopper.stopped_epoch == 3
    assert_same(state(learner.model), snapshots[1])  # weights and BatchNorm buffers


def test_early_stopping_patience_spans_fit_calls():
    learner = make_learner()
    learner.metrics["score"] = ScriptedScore([0.3, 0.8, 0.7, 0.6, 0.9])
    stopper = EarlyStopping(monitor="score", patience=2)
    learner.fit_one_cycle(2, 1e-2, early_stopping=stopper, stage="frozen")
    assert not stopper.stopped_early
    records = learner.fit_one_cycle(3, 1e-3, early_stopping=stopper, stage="unfrozen")
    assert [r.epoch for r in records] == [2, 3]
    assert stopper.best_epoch == 1 and stopper.stopped_early


def test_early_stopping_mode_and_monitor_validation():
    assert EarlyStopping("valid_loss").mode == "min"
    assert EarlyStopping("error_rate").mode == "min"
    assert EarlyStopping("accuracy").mode == "max"
    learner = make_learner()
    with pytest.raises(TrainingError, match="monitor 'f1' is not one of"):
        learner.fit_one_cycle(1, 1e-3, early_stopping=EarlyStopping("f1"))


class NaNAt:
    """Cross-entropy that turns NaN on the ``batch``-th training batch of ``epoch``."""

    def __init__(self, epoch: int, batch: int, batches_per_epoch: int):
        self.trigger = epoch * batches_per_epoch + batch
        self.calls = 0

    def __call__(self, out, y):
        loss = nn.functional.cross_entropy(out, y)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.trigger + 1:
                return loss * float("nan")
        return loss


def test_nan_loss_stops_with_a_clear_message_after_restoring_the_best_weights():
    snapshots = {}
    learner = make_learner(loss_fn=NaNAt(epoch=1, batch=2, batches_per_epoch=6))
    learner.progress = lambda e: e["event"] == "epoch_end" and snapshots.update(
        {e["epoch"]: state(learner.model)})
    stopper = EarlyStopping(patience=5)
    with pytest.raises(TrainingError, match=r"training loss became nan at epoch 1, batch 2; "
                                            r"lower the learning rate .*restored .* epoch 0"):
        learner.fit_one_cycle(3, 1e-2, early_stopping=stopper)
    assert_same(state(learner.model), snapshots[0])


def test_nan_loss_without_early_stopping_still_raises():
    learner = make_learner(loss_fn=NaNAt(epoch=0, batch=0, batches_per_epoch=6))
    with pytest.raises(TrainingError, match="epoch 0, batch 0"):
        learner.fit_one_cycle(1, 1e-2)


def seeded_fit(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)  # identical initial weights; the learner's seed governs the rest
    learner = make_learner(TinyNet(dropout=0.3), seed=seed)
    learner.fit_one_cycle(2, 1e-2)
    return state(learner.model)


def test_same_seed_gives_bit_identical_weights():
    first, second, other = seeded_fit(7), seeded_fit(7), seeded_fit(8)
    assert_same(first, second)
    assert not torch.equal(first["head.1.weight"], other["head.1.weight"])


def test_a_step_the_grad_scaler_skips_does_not_advance_the_schedule():
    events: list[dict] = []
    learner = make_learner(progress=events.append)
    # A real loss-scaling GradScaler on CPU; a gradient hook forces inf on the 5th step.
    learner.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * math.inf if calls["n"] == 5 else grad

    head = learner.model.head[1].weight
    head.register_hook(poison)
    weights = {}
    learner.progress = lambda e: (events.append(e), e["event"] == "batch" and weights.update(
        {e["batch"] + 6 * e["epoch"]: head.detach().clone()}))
    learner.fit_one_cycle(2, 1e-2)  # 12 batches
    batches = [e for e in events if e["event"] == "batch"]
    skipped = [i for i, e in enumerate(batches) if e["skipped"]]
    assert skipped == [4] and learner.skipped_steps == 1
    lrs = [e["lrs"][-1] for e in batches]
    assert lrs[5] == lrs[4]  # the skipped step left the LR where it was
    assert lrs[4] != lrs[3] and lrs[6] != lrs[5]
    assert torch.equal(weights[4], weights[3])  # and the weights too
    assert learner.scheduler.last_epoch == 11  # 12 batches, one step skipped
    assert learner.scaler.get_scale() < 2.0**10


class DotBias(nn.Module):
    """A collaborative-filtering model: one layer group, LongTensor (user, item) input."""

    def __init__(self, n_users=10, n_items=12, k=4):
        super().__init__()
        self.users, self.items = nn.Embedding(n_users, k), nn.Embedding(n_items, k)
        self.user_bias, self.item_bias = nn.Embedding(n_users, 1), nn.Embedding(n_items, 1)

    def layer_groups(self):
        return [self]

    def forward(self, x):
        u, i = x[:, 0], x[:, 1]
        dot = (self.users(u) * self.items(i)).sum(dim=1)
        return dot + self.user_bias(u).squeeze(1) + self.item_bias(i).squeeze(1)


def test_the_loop_is_task_generic_collab_regression():
    torch.manual_seed(0)
    pairs = torch.stack([torch.randint(0, 10, (200,)), torch.randint(0, 12, (200,))], dim=1)
    ratings = (pairs[:, 0] % 5).float() * 0.5 + (pairs[:, 1] % 3).float()
    train = DataLoader(TensorDataset(pairs[:160], ratings[:160]), batch_size=32, shuffle=True)
    valid = DataLoader(TensorDataset(pairs[160:], ratings[160:]), batch_size=40)
    learner = Learner(DotBias(), train, valid, nn.MSELoss(), device="cpu", seed=0)
    before = learner.validate()[0]
    learner.fit_one_cycle(10, 1e-1)
    assert learner.history[-1].valid_loss < before / 4
    preds, targets = learner.predict()
    assert preds.shape == targets.shape == (40,)


def test_progress_events_and_no_printing(capsys):
    events: list[dict] = []
    learner = make_learner(progress=events.append)
    learner.fit_one_cycle(2, 1e-3, stage="s")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "fit_start" and kinds.count("batch") == 12 and kinds.count("epoch_end") == 2
    assert events[-1]["valid_loss"] == learner.history[-1].valid_loss
    assert capsys.readouterr() == ("", "")


def test_layer_groups_must_cover_every_parameter():
    model = TinyNet()
    model.layer_groups = lambda: [model.body, model.body]
    learner = make_learner(model)
    with pytest.raises(TrainingError, match="'head.1.weight' is in no layer group"):
        learner.fit_one_cycle(1, 1e-3)


def test_cuda_request_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(TrainingError, match="no GPU"):
        make_learner(device="cuda")


def test_the_loss_says_when_to_stop_and_the_kept_metric_which_epoch_is_restored():
    from training.fit.learner import EpochRecord

    model = nn.Linear(2, 2)
    stopper = EarlyStopping(monitor="valid_loss", patience=2, keep="accuracy")

    def epoch(i, loss, acc):
        with torch.no_grad():
            model.weight.fill_(float(i))  # each epoch's weights tell it apart
        record = EpochRecord(i, "unfrozen", (1e-3,), 1.0, loss, {"accuracy": acc})
        return stopper.update(record, model)

    assert not epoch(0, 0.50, 0.85)  # the start
    assert not epoch(1, 0.45, 0.80)  # lower loss, fewer right: patience resets, not kept
    assert not epoch(2, 0.40, 0.85)  # as accurate as the start, lower loss: kept
    assert not epoch(3, 0.42, 0.85)  # a tie with a higher loss: not kept
    assert epoch(4, 0.41, 0.95)  # kept, and two epochs without a lower loss: stop
    assert stopper.best_epoch == 4 and stopper.stopped_epoch == 4
    assert torch.all(stopper.best_state["weight"] == 4.0)
    assert stopper.to_dict()["keep"] == "accuracy"

    kept = EarlyStopping(monitor="valid_loss", patience=5, keep="accuracy")
    for i, (loss, acc) in enumerate([(0.5, 0.85), (0.45, 0.8), (0.4, 0.85), (0.42, 0.85)]):
        kept.update(EpochRecord(i, "unfrozen", (1e-3,), 1.0, loss, {"accuracy": acc}),
                    model)
    assert kept.best_epoch == 2 and kept.best_record.valid_loss == 0.40
    plain = EarlyStopping(monitor="valid_loss", patience=5)
    for i, (loss, acc) in enumerate([(0.5, 0.85), (0.45, 0.80)]):
        plain.update(EpochRecord(i, "unfrozen", (1e-3,), 1.0, loss, {"accuracy": acc}),
                     model)
    assert plain.best_epoch == 1  # without keep, the monitor chooses as before
