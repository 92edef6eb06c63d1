"""fine_tune reads as the fast.ai recipe: frozen head fit, halve, unfreeze, discriminative fit."""

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from training.errors import TrainingError
from training.evaluation.metrics import accuracy
from training.fit.early_stopping import EarlyStopping, TimeBudget
from training.fit.fine_tune import AUTO_RULE, StartedHead, fine_tune
from training.fit.head_sweep import sweep_length
from training.fit.learner import Learner
from training.fit.lr_finder import SUGGESTERS
from training.fit.schedule import even_mults

torch.set_num_threads(1)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(),
            nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(),
        )
        self.head = nn.Linear(16, 3)

    def layer_groups(self) -> list[nn.Module]:
        return [self.body[:3], self.body[3:], self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def make_learner(**kwargs) -> Learner:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(144, 6, generator=g)
    y = (x @ torch.randn(6, 3, generator=g)).argmax(dim=1)
    train = DataLoader(TensorDataset(x[:96], y[:96]), batch_size=16, shuffle=True)
    valid = DataLoader(TensorDataset(x[96:], y[96:]), batch_size=24)
    torch.manual_seed(0)
    return Learner(TinyNet(), train, valid, nn.CrossEntropyLoss(), {"accuracy": accuracy},
                   device="cpu", seed=0, **kwargs)


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Recorder:
    """Progress sink that keeps events and the model's state at the end of every epoch."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.states: dict[int, dict] = {}
        self.learner: Learner | None = None

    def __call__(self, event: dict) -> None:
        self.events.append(event)
        if event["event"] == "epoch_end":
            self.states[event["epoch"]] = state(self.learner.model)

    def batch_lrs(self, stage: str) -> list[list[float]]:
        return [e["lrs"] for e in self.events if e["event"] == "batch" and e["stage"] == stage]


def recorded_learner() -> tuple[Learner, Recorder]:
    recorder = Recorder()
    learner = make_learner(progress=recorder)
    recorder.learner = learner
    return learner, recorder


def test_staged_recipe_with_a_given_base_lr():
    learner, rec = recorded_learner()
    start = state(learner.model)
    result = fine_tune(learner, epochs=2, base_lr=1e-2, freeze_epochs=1, lr_mult=100)

    assert [(r.epoch, r.stage) for r in result.history] == [
        (0, "frozen"), (1, "unfrozen"), (2, "unfrozen")]
    assert result.lr_finds == {}
    assert result.lr_choice["frozen"].source == "given"
    assert result.stage_lrs["frozen"] == pytest.approx([1e-3, 1e-3, 1e-2])
    assert result.stage_lrs["unfrozen"] == pytest.approx(even_mults(5e-5, 5e-3, 3))
    # Frozen stage: body weights fixed, BatchNorm affines trained; then everything moves.
    after_frozen, final = rec.states[0], rec.states[2]
    for name in ["body.0.weight", "body.3.weight", "body.3.bias"]:
        assert torch.equal(after_frozen[name], start[name]), name
        assert not torch.equal(final[name], after_frozen[name]), name
    assert not torch.equal(after_frozen["body.1.weight"], start["body.1.weight"])
    # Schedules: the frozen stage warms up over its first quarter and anneals (pct_start 0.25:
    # a frozen epoch on a small set is only a few steps, and fastai's 0.99 would spend them all
    # warming up); the unfrozen one starts at lr / 5 and peaks at
    # slice(base_lr / 2 / lr_mult, base_lr / 2).
    frozen, unfrozen = rec.batch_lrs("frozen"), rec.batch_lrs("unfrozen")
    head = [lrs[-1] for lrs in frozen]
    peak_at = head.index(max(head))
    assert max(head) > 0.9 * 1e-2 and head[0] < max(head) / 10
    assert 0 < peak_at <= max(1, round(0.25 * len(head)))
    assert head[peak_at:] == sorted(head[peak_at:], reverse=True) and head[-1] < 1e-2 / 100
    assert unfrozen[0] == pytest.approx([lr / 5 for lr in even_mults(5e-5, 5e-3, 3)])
    peak = max(unfrozen, key=lambda lrs: lrs[-1])  # 12 steps: the peak falls between two
    assert peak == pytest.approx(even_mults(5e-5, 5e-3, 3), rel=0.01)
    assert result.best_epoch == 2
    assert result.best_metrics["valid_loss"] == learner.history[-1].valid_loss
    assert all(p.requires_grad for p in learner.model.parameters())


def test_auto_sweeps_the_head_on_cached_features_and_halves_after_unfreezing():
    result = fine_tune(make_learner(), epochs=1, base_lr="auto")
    frozen = result.lr_finds["frozen"]
    assert set(result.lr_finds) == {"frozen"}  # no second, full-model sweep
    assert frozen.chosen == AUTO_RULE and len(frozen.lrs) == sweep_length(6)
    assert result.stage_lrs["frozen"][-1] == pytest.approx(frozen.suggestion)
    assert result.stage_lrs["unfrozen"][-1] == pytest.approx(frozen.suggestion / 2)
    assert result.stage_lrs["unfrozen"][0] == pytest.approx(frozen.suggestion / 2 / 100)


def test_auto_suggests_the_same_lr_with_and_without_precompute():
    plain = fine_tune(make_learner(), epochs=1, base_lr="auto")
    cached = fine_tune(make_learner(), epochs=1, base_lr="auto", precompute=True)
    a, b = plain.lr_finds["frozen"], cached.lr_finds["frozen"]
    assert a.suggestions == b.suggestions and a.losses == b.losses
    assert plain.stage_lrs == cached.stage_lrs


def test_auto_can_still_sweep_the_whole_model_after_unfreezing():
    result = fine_tune(make_learner(), epochs=1, base_lr="auto", find_lr_again=True)
    frozen, unfrozen = result.lr_finds["frozen"], result.lr_finds["unfrozen"]
    assert result.stage_lrs["unfrozen"][-1] == pytest.approx(unfrozen.suggestion)
    assert len(unfrozen.lrs) <= 100 < len(frozen.lrs)  # fastai's sweep over the whole model
    assert result.lr_choice["unfrozen"].source == "finder"
    assert not result.lr_choice["unfrozen"].cached_features


def test_each_stage_says_why_it_trained_at_its_lr():
    result = fine_tune(make_learner(), epochs=1, base_lr="auto")
    data = json.loads(json.dumps(result.to_dict()))["lr_choice"]
    frozen, unfrozen = data["frozen"], data["unfrozen"]
    assert frozen["source"] == "finder" and frozen["rule"] == AUTO_RULE
    assert frozen["cached_features"] and frozen["sweep_iterations"] == sweep_length(6)
    assert set(frozen["suggestions"]) == set(SUGGESTERS)
    assert frozen["lr"] == pytest.approx(frozen["suggestions"][AUTO_RULE])
    assert unfrozen["source"] == "frozen" and unfrozen["factor"] == 0.5
    assert unfrozen["lr"] == pytest.approx(frozen["lr"] / 2)
    assert unfrozen["suggestions"] == frozen["suggestions"]

    given = fine_tune(make_learner(), epochs=1, base_lr=1e-2).to_dict()["lr_choice"]
    assert given["frozen"] == {"lr": 1e-2, "source": "given", "rule": None, "suggestions": {},
                               "sweep_iterations": None, "cached_features": False,
                               "factor": 1.0, "rule_mult": 1.0, "why": "given: 0.01"}
    assert given["unfrozen"]["lr"] == pytest.approx(5e-3)
    assert given["unfrozen"]["source"] == "frozen"


def test_auto_takes_each_tasks_rule_multiple_and_unfrozen_factor():
    result = fine_tune(make_learner(), epochs=1, base_lr="auto", auto_rule="steep",
                       auto_mult=3.0, unfrozen_factor=1.0)
    sweep = result.lr_finds["frozen"]
    frozen, unfrozen = result.lr_choice["frozen"], result.lr_choice["unfrozen"]
    assert sweep.chosen == "steep"
    assert frozen.lr == pytest.approx(3 * sweep.suggestions["steep"]) and frozen.rule_mult == 3
    assert result.stage_lrs["frozen"][-1] == pytest.approx(frozen.lr)
    assert unfrozen.lr == pytest.approx(frozen.lr) and unfrozen.factor == 1.0
    assert result.stage_lrs["unfrozen"][-1] == pytest.approx(frozen.lr)
    assert "steep x 3 of a head sweep on cached body features" in frozen.why()
    assert unfrozen.why().startswith("frozen stage's LR x 1")
    # A number is not multiplied: the rule multiple belongs to auto alone.
    typed = fine_tune(make_learner(), epochs=1, base_lr=1e-2, auto_mult=3.0,
                      unfrozen_factor=2.0)
    assert typed.stage_lrs["frozen"][-1] == pytest.approx(1e-2)
    assert typed.stage_lrs["unfrozen"][-1] == pytest.approx(2e-2)


def test_a_named_rule_picks_the_frozen_lr_once_then_acts_as_that_number():
    result = fine_tune(make_learner(), epochs=1, base_lr="slide")
    frozen = result.lr_finds["frozen"]
    assert set(result.lr_finds) == {"frozen"} and frozen.chosen == "slide"
    assert len(frozen.lrs) <= 100 and not result.lr_choice["frozen"].cached_features
    assert frozen.suggestion == pytest.approx(frozen.suggestions["slide"])
    assert result.stage_lrs["frozen"][-1] == pytest.approx(frozen.suggestion)
    assert result.stage_lrs["unfrozen"][-1] == pytest.approx(frozen.suggestion / 2)


def test_the_cli_and_flows_offer_exactly_the_finder_rules_fine_tune_takes():
    from typing import Literal, get_args

    from training.recipes.options import IMAGE_LR_WORDS, ImageLearningRate

    assert set(IMAGE_LR_WORDS) == {"auto", *SUGGESTERS}
    assert Literal[IMAGE_LR_WORDS] in get_args(ImageLearningRate)


def test_a_named_rule_without_a_frozen_stage_runs_the_finder_unfrozen():
    result = fine_tune(make_learner(), epochs=1, freeze_epochs=0, base_lr="minimum")
    assert set(result.lr_finds) == {"unfrozen"}
    assert result.lr_finds["unfrozen"].chosen == "minimum"
    assert result.stage_lrs["unfrozen"][-1] == pytest.approx(
        result.lr_finds["unfrozen"].suggestion)


def test_auto_without_a_frozen_stage_still_sweeps_only_the_head_and_scales_it():
    result = fine_tune(make_learner(), epochs=1, freeze_epochs=0, base_lr="auto")
    sweep = result.lr_finds["unfrozen"]
    assert set(result.lr_finds) == {"unfrozen"} and len(sweep.lrs) == sweep_length(6)
    choice = result.lr_choice["unfrozen"]
    assert choice.cached_features and choice.factor == 0.5
    assert choice.lr == pytest.approx(sweep.suggestion / 2)
    assert result.stage_lrs["unfrozen"][-1] == pytest.approx(choice.lr)
    assert choice.why().endswith(f"(200 iterations) x 0.5 = {choice.lr:.3g}")


class ScriptedScore:
    def __init__(self, values):
        self.values = list(values)

    def __call__(self, preds, targets) -> float:
        return self.values.pop(0)


def test_one_early_stopper_spans_both_stages_and_restores_the_winner():
    learner, rec = recorded_learner()
    learner.metrics["score"] = ScriptedScore([0.5, 0.9, 0.8, 0.7, 0.95, 0.99])
    stopper = EarlyStopping(monitor="score", patience=2)
    result = fine_tune(learner, epochs=4, base_lr=1e-2, freeze_epochs=2, early_stopping=stopper)
    assert [r.stage for r in result.history] == ["frozen", "frozen", "unfrozen", "unfrozen"]
    assert result.stopped_early and result.best_epoch == 1
    assert result.best_metrics["score"] == 0.9
    restored = state(learner.model)
    for name, value in rec.states[1].items():
        assert torch.equal(restored[name], value), name


def test_stopping_in_the_frozen_stage_skips_the_unfrozen_one():
    learner = make_learner()
    learner.metrics["score"] = ScriptedScore([0.9, 0.5, 0.4, 0.3])
    stopper = EarlyStopping(monitor="score", patience=1)
    result = fine_tune(learner, epochs=3, base_lr=1e-2, freeze_epochs=4, early_stopping=stopper)
    assert [r.stage for r in result.history] == ["frozen", "frozen"]
    assert result.stopped_early and result.best_epoch == 0


def test_precompute_trains_the_head_on_cached_features_then_the_whole_model(tmp_path):
    learner, rec = recorded_learner()
    start = state(learner.model)
    result = fine_tune(learner, epochs=1, base_lr="auto", precompute=True,
                       plots_dir=tmp_path)
    body = [k for k in start if k.startswith("body.")]
    assert all(torch.equal(rec.states[0][k], start[k]) for k in body)  # train_bn=False
    assert not all(torch.equal(rec.states[1][k], start[k]) for k in body)
    assert not torch.equal(rec.states[0]["head.weight"], start["head.weight"])
    assert set(result.lr_finds) == {"frozen"}
    assert learner.train_module is learner.model


def test_plots_and_json(tmp_path):
    learner = make_learner()
    result = fine_tune(learner, epochs=1, base_lr="auto", plots_dir=tmp_path / "plots")
    names = {"lr_find_frozen", "learning_curve", "lr_schedule"}
    assert set(result.plots) == names
    for name in names:
        png = tmp_path / "plots" / f"{name}.png"
        assert result.plots[name] == str(png)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(json.dumps(result.to_dict()))
    assert [r["stage"] for r in data["history"]] == ["frozen", "unfrozen"]
    assert data["lr_finds"]["frozen"]["chosen"] == AUTO_RULE
    assert set(data["lr_choice"]) == {"frozen", "unfrozen"}


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 1, "base_lr": "fast"}, "base_lr must be a positive number, 'auto' or one of "
                                       "valley, steep, minimum, slide"),
    ({"epochs": 1, "base_lr": -1.0}, "base_lr must be"),
    ({"epochs": 0, "freeze_epochs": 0}, "nothing to train"),
    ({"epochs": 1, "auto_rule": "fast"}, "auto_rule must be one of"),
    ({"epochs": 1, "unfrozen_factor": 0.0}, "must be positive"),
])
def test_bad_arguments_are_training_errors(kwargs, message):
    with pytest.raises(TrainingError, match=message):
        fine_tune(make_learner(), **kwargs)



@pytest.mark.parametrize("freeze_epochs", [1, 0])
def test_the_head_starts_after_the_sweep_and_before_any_training(monkeypatch, freeze_epochs):
    """The finder rules describe a fresh head, so the start comes once the first stage's LR is
    chosen, before it trains. The head sweep reuses the features it is given."""
    import training.fit.fine_tune as fine_tune_module

    learner = make_learner()
    calls = []
    sweep = fine_tune_module.lr_find_head

    def recording_sweep(*args, features=None, **kwargs):
        calls.append(("sweep", features is given))
        return sweep(*args, features=features, **kwargs)

    whole_model_sweep = fine_tune_module.lr_find

    def recording_whole_model_sweep(*args, **kwargs):
        calls.append(("whole-model sweep", None))
        return whole_model_sweep(*args, **kwargs)

    def start_head():
        calls.append(("start", len(learner.history)))

    monkeypatch.setattr(fine_tune_module, "lr_find_head", recording_sweep)
    monkeypatch.setattr(fine_tune_module, "lr_find", recording_whole_model_sweep)
    x, y = learner.train_loader.dataset.tensors
    with torch.no_grad():
        given = (learner.model.eval().body(x), y)
    fine_tune(learner, epochs=1, freeze_epochs=freeze_epochs, base_lr="auto",
              head_features=given, start_head=start_head)
    assert calls == [("sweep", True), ("start", 0)]  # no whole-model sweep either way
    # The start is validated as an epoch of its own before the first training epoch.
    assert [r.stage for r in learner.history] == ["start", *["frozen"] * freeze_epochs,
                                                  "unfrozen"]
    assert learner.history[0].lrs == () and learner.history[1].epoch == 1


def test_a_start_that_beats_every_epoch_is_what_early_stopping_restores():
    learner = make_learner()
    x, y = learner.train_loader.dataset.tensors
    with torch.no_grad():  # the head fitted on the frozen features: a strong start
        features = learner.model.eval().body(x)
        head = nn.Linear(16, 3)
        opt = torch.optim.LBFGS(head.parameters(), max_iter=200)

        def closure():
            opt.zero_grad()
            with torch.enable_grad():
                loss = nn.functional.cross_entropy(head(features), y)
                loss.backward()
            return loss

    opt.step(closure)
    started = {}

    def start_head():
        learner.model.head.load_state_dict(head.state_dict())
        started.update(state(learner.model))
        return StartedHead(0.1)

    result = fine_tune(learner, epochs=2, freeze_epochs=0, base_lr=10.0, start_head=start_head,
                       early_stopping=EarlyStopping(patience=2))  # an LR that wrecks the body
    start = learner.history[0]
    assert start.stage == "start" and start.train_loss == 0.1
    assert all(r.valid_loss > start.valid_loss for r in learner.history[1:])
    assert result.best_epoch == 0 and result.best_metrics["valid_loss"] == start.valid_loss
    for name, value in state(learner.model).items():
        assert torch.equal(value, started[name]), name


def test_a_start_with_its_validation_outputs_is_recorded_from_them_without_a_pass():
    learner = make_learner()
    x, y = learner.valid_loader.dataset.tensors
    with torch.no_grad():
        outputs = learner.model.eval()(x)
    passed = learner.record_start("start")
    given = learner.record_start("start", 0.3, valid_outputs=(outputs, y))
    assert given.valid_loss == pytest.approx(passed.valid_loss, rel=1e-6)
    assert given.metrics == pytest.approx(passed.metrics) and given.train_loss == 0.3

    # fine_tune records what start_head reports: outputs no validation pass would give.
    constant = torch.zeros(len(y), 3)
    constant[:, 0] = 5.0
    other = make_learner()
    fine_tune(other, epochs=1, freeze_epochs=0, base_lr=1e-3,
              start_head=lambda: StartedHead(None, (constant, y)))
    start = other.history[0]
    assert start.stage == "start" and start.train_loss != start.train_loss  # NaN: not measured
    assert start.valid_loss == pytest.approx(float(nn.functional.cross_entropy(constant, y)))
    assert start.metrics["accuracy"] == pytest.approx(float((y == 0).float().mean()))


def _ticking(seconds_per_epoch: float):
    """A fake clock that a progress sink advances by ``seconds_per_epoch`` over each epoch's
    batches: epoch lengths without sleeping."""
    clock = [0.0]

    def progress(event):
        if event.get("event") == "batch":
            clock[0] += seconds_per_epoch / event["batches"]

    return (lambda: clock[0]), progress


def test_a_time_budget_stops_after_the_epoch_past_which_another_would_not_fit():
    clock, progress = _ticking(10.0)
    learner = make_learner(progress=progress)
    budget = TimeBudget(35, clock=clock)
    result = fine_tune(learner, epochs=5, freeze_epochs=0, base_lr=1e-2, time_budget=budget,
                       early_stopping=EarlyStopping(patience=5))
    trained = [r for r in learner.history if r.lrs]
    assert len(trained) == 3  # ends at 10, 20, 30 s: 5 s left is less than another 10 s epoch
    assert result.time_budget["stopped"] and result.time_budget["stopped_epoch"] == \
        trained[-1].epoch
    assert "time budget of 35 s: stopped after epoch 2 with 5 s left" in \
        result.time_budget["why"]
    assert result.stopped_early and result.to_dict()["time_budget"] == result.time_budget
    best = min(learner.history, key=lambda r: r.valid_loss)
    assert result.best_epoch == best.epoch  # the best epoch is restored as after any stop

    unlimited = make_learner()
    fine_tune(unlimited, epochs=5, freeze_epochs=0, base_lr=1e-2)
    assert len(unlimited.history) == 5


def test_a_stage_starts_only_while_an_epoch_as_long_as_the_last_fits():
    clock, progress = _ticking(10.0)
    learner = make_learner(progress=progress)
    result = fine_tune(learner, epochs=3, freeze_epochs=1, base_lr=1e-2,
                       time_budget=TimeBudget(15, clock=clock))
    assert [r.stage for r in learner.history] == ["frozen"]  # 5 s left after it: no unfrozen
    assert result.time_budget["stopped_epoch"] == 0
    with pytest.raises(TrainingError, match="time budget must be positive"):
        TimeBudget(0)
