"""benchmarks/quality_suite.py's rows: the TTA block read from metrics.json, an SGDR row whose
cycles every task's option model accepts, and the SGDR and TTA ratios it prints."""

import json

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


def test_the_single_label_summary_checks_every_goal_against_both_baselines():
    from suite_baselines import single_label_summary

    Row = suite.Row
    rows = [Row("ants", "lensflow", {"accuracy": 0.97}, 100.0, ""),
            Row("ants", "fastai", {"accuracy": 0.91}, 600.0, ""),
            Row("ants", "probe", {"accuracy": 0.95}, 20.0, ""),
            Row("mnist", "lensflow", {"accuracy": 0.90}, 700.0, ""),
            Row("mnist", "fastai", {"accuracy": 0.95}, 600.0, ""),
            Row("mnist", "probe", {"accuracy": 0.91}, 30.0, "")]
    lines = single_label_summary(rows, ["ants", "mnist"])
    assert lines[2].startswith("| ants | 0.9700 | 0.9100 | 0.9500 | 100 | 600 | yes |")
    assert lines[3].startswith("| mnist | 0.9000 | 0.9500 | 0.9100 | 700 | 600 | no |")
    assert "| **mean** | 0.9350 | 0.9300 | 0.9300 |" in lines[4]
    goals = lines[-1]
    assert "every set: False (1 of 2)" in goals and "+0.5 points" in goals
    assert "mean ≥ fastai's + 3 points: False" in goals
    assert "seconds ≤ fastai's on every set: False (1 of 2)" in goals


def test_earlier_fastai_rows_fill_only_the_tasks_this_run_lacks(tmp_path):
    earlier = tmp_path / "peer.json"
    earlier.write_text(json.dumps([
        {"task": "cifar", "tool": "fastai", "metrics": {"accuracy": 0.8}, "seconds": 900.0,
         "lr": "2e-3", "note": "", "extra": {}, "tta": {}},
        {"task": "ants", "tool": "fastai", "metrics": {"accuracy": 0.9}, "seconds": 600.0,
         "lr": "2e-3", "note": "", "extra": {}, "tta": {}},
        {"task": "cifar", "tool": "lensflow", "metrics": {"accuracy": 0.5}, "seconds": 1.0,
         "lr": "", "note": "", "extra": {}, "tta": {}}]))
    have = [suite.Row("ants", "fastai", {"accuracy": 0.91}, 640.0, "")]
    found = suite.earlier_fastai_rows([earlier], ["ants", "cifar"], have)
    assert [(r.task, r.tool, r.metrics["accuracy"]) for r in found] == [("cifar", "fastai", 0.8)]
    assert found[0].note == "from peer.json"
