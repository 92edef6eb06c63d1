"""benchmarks/quality_suite.py's rows: the TTA block read from metrics.json, an SGDR row whose
cycles every task's option model accepts, and the SGDR and TTA ratios it prints."""

import pytest
from benchmark_modules import load_benchmark

from training.recipes.options import ImageTrainOptions, RecommenderOptions, RegressionOptions

suite = load_benchmark("quality_suite")


def test_tta_metrics_reads_the_tta_block_with_the_plain_baseline():
    points = suite.IMAGE_TASKS["points"]
    metrics = {"valid_mse": 0.2, "baseline_mse": 0.16, "mean_pixel_distance": 30.0,
               "tta": {"views": ["centre_crop", "centre_crop_hflip"], "valid_mse": 0.12,
                       "mean_pixel_distance": 25.0}}
    assert suite.key_metrics(points, metrics) == pytest.approx(
        {"valid_mse": 0.2, "baseline_mse": 0.16, "mse/baseline": 1.25})
    assert suite.tta_metrics(points, metrics) == pytest.approx(
        {"valid_mse": 0.12, "baseline_mse": 0.16, "mse/baseline": 0.75})
    multi = suite.IMAGE_TASKS["multilabel"]
    tta = {"mean_average_precision": 0.95, "f1_macro": 0.9, "threshold": 0.4, "views": []}
    assert suite.tta_metrics(multi, {"f1_macro": 0.8, "tta": tta}) == \
        {"mean_average_precision": 0.95, "f1_macro": 0.9, "threshold": 0.4}
    assert suite.tta_metrics(multi, {"f1_macro": 0.8}) == {}


@pytest.mark.parametrize(("options_cls", "freeze", "epochs", "mult"), [
    (ImageTrainOptions, 1, 3, 2), (ImageTrainOptions, 1, 1, 2), (ImageTrainOptions, 1, 7, 2),
    (RegressionOptions, 1, 12, 1), (ImageTrainOptions, 2, 3, 1)])
def test_the_sgdr_row_has_cycles_that_end_both_stages(options_cls, freeze, epochs, mult):
    overrides = suite.sgdr_overrides(freeze, epochs)
    assert overrides["cycle_mult"] == mult
    options = options_cls(freeze_epochs=freeze, epochs=epochs, **overrides)
    assert options.sgdr() == suite.Sgdr(1, mult)


def test_the_recommender_sgdr_row_takes_one_epoch_cycles_for_its_five_epochs():
    options = RecommenderOptions(**suite.sgdr_overrides(0, RecommenderOptions().epochs))
    assert options.sgdr() == suite.Sgdr(1, 1)


def test_ratios_compare_sgdr_with_one_cycle_and_tta_with_plain():
    rows = [suite.Row("ants", "lensflow", {"accuracy": 0.8}, 1.0, "", tta={"accuracy": 0.9}),
            suite.Row("ants", "lensflow sgdr", {"accuracy": 0.88}, 1.0, "",
                      tta={"accuracy": 0.99}),
            suite.Row("ants", "fastai", {"accuracy": 0.5}, 1.0, "")]
    [line] = suite.ratios(rows)
    assert line == ("ants accuracy: sgdr/one-cycle 1.100 (with TTA 1.100), "
                    "TTA/plain one-cycle 1.125, TTA/plain sgdr 1.125")
    assert suite.tta_text(rows[2]) == "—"
