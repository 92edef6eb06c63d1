"""The linear probe a single-label head starts from: logistic regression on body features whose
L2 strength toward the pretrained classifier's start is chosen by cross-validation."""

import pytest
import torch

from training.models import head_init
from training.models.head_init import HeadInit, SourceClassifier, probe_init
from training.models.probe import L2_GRID, fit_linear_probe


def blobs(n_per_class: int, classes: int = 3, dims: int = 8, spread: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dims, generator=g) * 3
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[y] + spread * torch.randn(len(y), dims, generator=g), y, centres


def accuracy(fit, x, y) -> float:
    return float((fit.predict(x).argmax(1) == y).float().mean())


def test_the_probe_separates_classes_and_generalises():
    x, y, _ = blobs(30)
    test_x, test_y, _ = blobs(30, seed=0)  # same centres, fresh noise below
    test_x = test_x + 0.1 * torch.randn(test_x.shape, generator=torch.Generator().manual_seed(1))
    fit = fit_linear_probe(x, y, 3)
    assert accuracy(fit, test_x, test_y) >= 0.95
    assert set(fit.cv_loss) == set(L2_GRID) and fit.l2 == min(fit.cv_loss, key=fit.cv_loss.get)


def test_noisy_labels_choose_a_stronger_penalty_than_clean_ones():
    x, y, _ = blobs(20, spread=0.3)
    clean = fit_linear_probe(x, y, 3)
    noisy_y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(3))]
    noisy = fit_linear_probe(x, noisy_y, 3)
    assert noisy.l2 > clean.l2


def test_a_right_prior_is_kept_and_a_wrong_one_is_overruled():
    x, y, centres = blobs(6, dims=16, spread=2.0)  # few, noisy samples
    truth = (centres, -0.5 * centres.pow(2).sum(1))  # the Bayes classifier of the blobs
    kept = fit_linear_probe(x, y, 3, prior=truth)
    assert kept.l2 == max(L2_GRID)  # the data cannot improve on the truth: keep it
    assert torch.allclose(kept.weight, truth[0], atol=0.05)
    wrong = (truth[0][[1, 2, 0]], truth[1][[1, 2, 0]])  # every class mapped to another's
    overruled = fit_linear_probe(x, y, 3, prior=wrong)
    assert overruled.l2 < max(L2_GRID)
    assert accuracy(overruled, x, y) >= 0.9


def test_a_class_with_one_sample_fits_without_cross_validation():
    x, y, _ = blobs(5)
    x, y = x[4:], y[4:]  # class 0 keeps a single sample
    fit = fit_linear_probe(x, y, 3)
    assert fit.l2 == min(L2_GRID) and all(v != v for v in fit.cv_loss.values())  # NaN


def test_the_probe_start_goes_toward_the_classifier_only_where_that_cross_validates_better(
        monkeypatch):
    x, y, centres = blobs(6, dims=16, spread=2.0)  # few, noisy samples
    right = SourceClassifier(torch.cat([centres, -centres]), torch.cat([
        -0.5 * centres.pow(2).sum(1), torch.full((3,), -50.0)]))  # classes 0-2 are the truth
    start = probe_init(right, x, y, ["a", "b", "c"])
    assert start.toward_prior and start.cv_loss["classifier"] < start.cv_loss["zero"]
    record = start.to_dict()
    assert record["kind"] == "probe" and record["prior"]["source_classes"] == 6
    assert "toward the pretrained classifier's start" in record["why"]
    head = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(16, 3))
    start.apply(head)
    assert torch.equal(head[1].weight, start.fit.weight)

    # A start that maps every class to another's blob (as a classifier whose classes resemble
    # the wrong images would): the probe toward zero cross-validates better and is chosen.
    wrong = start.prior
    wrong = HeadInit(wrong.weight[[1, 2, 0]] * 3, wrong.bias[[1, 2, 0]] * 3, 1.0, 9.0, 1.1, {},
                     6, 18)
    monkeypatch.setattr(head_init, "classifier_init", lambda *args: wrong)
    other = probe_init(right, x, y, ["a", "b", "c"])
    assert not other.toward_prior and other.cv_loss["zero"] < other.cv_loss["classifier"]
    assert "toward zero" in other.to_dict()["why"]
    alone = probe_init(None, x, y, ["a", "b", "c"]).to_dict()
    assert "prior" not in alone and set(alone["cv_loss_by_prior"]) == {"zero"}
    with pytest.raises(Exception, match="last layer"):
        start.apply(torch.nn.Linear(16, 2))


def test_validation_accuracy_then_loss_chooses_between_the_probes_else_cross_validation():
    x, y, centres = blobs(6, dims=16, spread=2.0)
    right = SourceClassifier(torch.cat([centres, -centres]), torch.cat([
        -0.5 * centres.pow(2).sum(1), torch.full((3,), -50.0)]))
    by_cv = probe_init(right, x, y, ["a", "b", "c"])
    assert by_cv.toward_prior and by_cv.valid_loss == {}  # no validation samples: CV decides
    # The same two fits probe_init makes, and fresh samples of the same blobs.
    fits = {"zero": fit_linear_probe(x, y, 3),
            "classifier": fit_linear_probe(x, y, 3, prior=(by_cv.prior.weight,
                                                           by_cv.prior.bias))}
    val_y = torch.arange(3).repeat_interleave(40)
    # Twice the training noise, so the two fits disagree on some samples.
    val_x = centres[val_y] + 4.0 * torch.randn(120, 16,
                                               generator=torch.Generator().manual_seed(5))
    right_by = {name: fit.predict(val_x).argmax(1) == val_y for name, fit in fits.items()}
    loss_by = {name: torch.nn.functional.cross_entropy(fit.predict(val_x), val_y,
                                                       reduction="none")
               for name, fit in fits.items()}
    only_classifier = right_by["classifier"] & ~right_by["zero"]
    both = right_by["zero"] & right_by["classifier"]
    assert only_classifier.any() and both.sum() > 1
    # The zero probe's nearest miss that the classifier's gets right, among answers both get
    # right where the zero probe is the more confident: more right answers beat a lower loss.
    zero_surer = both & (loss_by["zero"] < loss_by["classifier"])
    near_miss = torch.where(only_classifier, loss_by["zero"], torch.inf).argmin()
    mixed = zero_surer.clone()
    mixed[near_miss] = True
    chosen = probe_init(right, x, y, ["a", "b", "c"], valid=(val_x[mixed], val_y[mixed]))
    assert chosen.valid_accuracy["classifier"] > chosen.valid_accuracy["zero"]
    assert chosen.valid_loss["zero"] < chosen.valid_loss["classifier"]
    assert chosen.toward_prior and torch.equal(chosen.fit.weight, fits["classifier"].weight)
    record = chosen.to_dict()
    assert "toward the pretrained classifier's start: the better validation accuracy of the 2 " \
        "probes, then loss" in record["why"]
    assert set(record["valid_loss_by_prior"]) == set(record["valid_accuracy_by_prior"]) == \
        {"zero", "classifier"}
    # Equally accurate: the lower validation loss wins.
    tied = probe_init(right, x, y, ["a", "b", "c"], valid=(val_x[both], val_y[both]))
    lower = min(tied.valid_loss, key=tied.valid_loss.get)
    assert tied.valid_accuracy == {"zero": 1.0, "classifier": 1.0}
    assert tied.toward_prior == (lower == "classifier")
    assert torch.allclose(tied.predict(val_x), fits[lower].predict(val_x))
    # Without a pretrained classifier there is one probe: nothing for validation to choose.
    alone = probe_init(None, x, y, ["a", "b", "c"], valid=(val_x, val_y))
    assert alone.valid_loss == {} and not alone.toward_prior
