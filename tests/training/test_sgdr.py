"""SGDR: the LR at every step is the closed form, restarts land on cycle ends, early stopping
judges only cycle ends and still restores the best epoch, and the run records its cycles."""

import json

import pytest
import torch
from test_schedule import batch_events, make_learner

from training.errors import TrainingError
from training.fit.early_stopping import EarlyStopping
from training.fit.fine_tune import fine_tune
from training.fit.schedule import Sgdr, sgdr_epochs, sgdr_lr
from training.recipes.options import ImageTrainOptions, RecommenderOptions

torch.set_num_threads(1)
BATCHES = 4


@pytest.mark.parametrize(("cycle_len", "cycle_mult", "epochs", "restarts"),
                         [(1, 1, 3, [4, 8]), (1, 2, 7, [4, 12]), (2, 2, 6, [8])])
def test_every_steps_lr_is_the_closed_form_and_restarts_land_on_cycle_ends(
        cycle_len, cycle_mult, epochs, restarts):
    events: list[dict] = []
    learner = make_learner(n_batches=BATCHES, progress=events.append)
    top = [1e-4, 1e-3, 1e-2]
    records = learner.fit_sgdr(epochs, top, Sgdr(cycle_len, cycle_mult))
    seen = [e["lrs"] for e in batch_events(events)]
    assert len(seen) == epochs * BATCHES
    for step, lrs in enumerate(seen):
        # Discriminative LRs: every layer group follows the same curve from its own top.
        expected = [sgdr_lr(t, step, cycle_len * BATCHES, cycle_mult) for t in top]
        assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-15), step
    jumps = [s for s in range(1, len(seen)) if seen[s][-1] > seen[s - 1][-1]]
    assert jumps == restarts
    assert all(seen[s][-1] == pytest.approx(top[-1]) for s in [0, *restarts])
    starts = [r.epoch for r, prev in zip(records[1:], records, strict=False)
              if r.cycle != prev.cycle]
    assert [s * BATCHES for s in starts] == restarts
    assert len(records) == sgdr_epochs(len(restarts) + 1, cycle_len, cycle_mult)


def scripted_losses(learner, losses):
    """Make validation report ``losses`` in turn, so the stopper's decisions are known."""
    it = iter(losses)
    learner.validate = lambda: (next(it), {})


def test_patience_is_judged_at_cycle_ends_so_a_restart_jump_does_not_stop_the_run():
    # Cycles of 1, 2 and 4 epochs; the loss jumps after each restart, as SGDR's does.
    losses = [1.0, 1.5, 0.9, 1.4, 1.2, 1.0, 0.85]
    learner = make_learner(n_batches=2)
    scripted_losses(learner, losses)
    stopper = EarlyStopping(patience=1)
    records = learner.fit_sgdr(7, 1e-3, Sgdr(1, 2), early_stopping=stopper)
    assert len(records) == 7 and not stopper.stopped_early
    assert stopper.best_epoch == 6
    # Judged at every epoch, the same losses stop the run on the first restart's jump.
    per_epoch = EarlyStopping(patience=1)
    stopped = [r.epoch for r in records if per_epoch.update(r, learner.model)]
    assert stopped[0] == 1


def test_a_cycle_that_never_beats_the_best_counts_one_and_the_best_epoch_is_restored():
    losses = [1.0, 0.5, 0.8, 0.9, 0.7, 0.9, 0.6, 0.8, 0.7]
    learner = make_learner(n_batches=2)
    scripted_losses(learner, losses)
    snapshots = {}
    stopper = EarlyStopping(patience=2)
    update = stopper.update

    def spy(record, model, **kw):
        snapshots[record.epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        return update(record, model, **kw)

    stopper.update = spy
    records = learner.fit_sgdr(9, 1e-3, Sgdr(1, 1), early_stopping=stopper)
    # Epoch 1 is best; cycles (epochs) 2 and 3 fail to beat it → patience 2 fires at epoch 3.
    assert [r.epoch for r in records] == [0, 1, 2, 3]
    assert stopper.stopped_epoch == 3 and stopper.best_epoch == 1
    for key, value in learner.model.state_dict().items():
        assert torch.equal(value, snapshots[1][key]), key


def test_fine_tune_under_sgdr_records_cycles_and_plots_the_restarts(tmp_path):
    learner = make_learner(n_batches=2)
    result = fine_tune(learner, 3, base_lr=1e-3, freeze_epochs=1, plots_dir=tmp_path,
                       schedule=Sgdr(1, 2))
    history = json.loads(json.dumps(result.to_dict()))
    assert history["schedule"] == {"schedule": "sgdr", "cycle_len": 1, "cycle_mult": 2}
    assert [(c["stage"], c["cycle"], c["first_epoch"], c["last_epoch"])
            for c in history["cycles"]] == [("frozen", 0, 0, 0), ("unfrozen", 0, 1, 1),
                                            ("unfrozen", 1, 2, 3)]
    assert [r["cycle"] for r in history["history"]] == [0, 0, 1, 1]
    assert (tmp_path / "lr_schedule.png").stat().st_size > 0
    # Discriminative LRs as under one-cycle: the unfrozen stage starts at slice(lr/100, lr/2).
    assert result.stage_lrs["unfrozen"][0] == pytest.approx(5e-4 / 100)


def test_a_stage_must_end_a_cycle_and_cycles_must_match_epochs():
    with pytest.raises(TrainingError, match="5 epochs end mid-cycle.*1, 3, 7 epochs do"):
        fine_tune(make_learner(), 5, base_lr=1e-3, freeze_epochs=0, schedule=Sgdr(1, 2))
    with pytest.raises(ValueError, match="set epochs to 7"):
        ImageTrainOptions(schedule="sgdr", cycles=3, cycle_mult=2, epochs=3)
    with pytest.raises(ValueError, match="2 epochs end mid-cycle"):
        ImageTrainOptions(schedule="sgdr", freeze_epochs=2, epochs=7, cycle_mult=2)
    assert ImageTrainOptions(schedule="sgdr", cycles=3, cycle_mult=2, epochs=7).sgdr() \
        == Sgdr(1, 2)
    assert RecommenderOptions(schedule="sgdr", epochs=4, cycle_len=2).sgdr() == Sgdr(2, 1)
    assert ImageTrainOptions().sgdr() is None
