"""Each task's own defaults (regression/points train longer and hotter than classification)
reach its recipe from ``lensflow train`` and from the Prefect flow parameters alike."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

import flows.cli as cli
import flows.train_csv_flows as csv_flows
from flows.train_csv_flows import train_multilabel_model_flow, train_regression_model_flow
from training.recipes.options import ImageTrainOptions, MultiLabelOptions, RegressionOptions

TASK_DEFAULTS = ("epochs", "lr_rule", "lr_rule_mult", "unfrozen_lr_factor", "patience", "head")


def defaults(model) -> dict:
    return {name: model.model_fields[name].get_default() for name in TASK_DEFAULTS}


def test_points_and_regression_train_longer_and_hotter_than_classification():
    image, regression = ImageTrainOptions(), RegressionOptions()
    assert regression.epochs > image.epochs
    assert regression.lr_rule_mult * regression.unfrozen_lr_factor > \
        image.lr_rule_mult * image.unfrozen_lr_factor


def test_multilabel_trains_hotter_than_single_label():
    multi, image = MultiLabelOptions(), ImageTrainOptions()
    assert multi.lr_rule_mult > image.lr_rule_mult
    assert multi.head == image.head == "linear"
    assert MultiLabelOptions(lr_rule_mult=1).lr_rule_mult == image.lr_rule_mult


@pytest.mark.parametrize("command, model", [("regression", RegressionOptions),
                                            ("multilabel", MultiLabelOptions)])
def test_the_cli_hands_the_recipe_its_tasks_defaults(command, model, monkeypatch, tmp_path):
    seen = {}

    def train_and_publish(recipe, prepared, out_dir, options, registry, name, export):
        seen["options"] = options

    monkeypatch.setattr(cli, "_train_and_publish", train_and_publish)
    stub = SimpleNamespace(summary=lambda: "")
    monkeypatch.setattr("training.data.regression.from_regression_csv", lambda *a, **k: stub)
    monkeypatch.setattr("training.data.multilabel.from_multilabel_csv", lambda *a, **k: stub)
    argv = ["lensflow", "train", command, str(tmp_path / "t.csv"), "--images", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code in (0, None)
    assert type(seen["options"]) is model
    assert {k: getattr(seen["options"], k) for k in TASK_DEFAULTS} == defaults(model)


@pytest.mark.parametrize("flow, model", [(train_regression_model_flow, RegressionOptions),
                                         (train_multilabel_model_flow, MultiLabelOptions)])
def test_the_flow_hands_the_recipe_its_tasks_defaults(flow, model, monkeypatch):
    seen = {}

    def fine_tune_and_publish(kind, prepared, registry, name, train_dir, options, export):
        seen["options"] = options
        return {}

    monkeypatch.setattr(csv_flows, "check_training_inputs", lambda data, *a: data)
    monkeypatch.setattr(csv_flows, "prepare_regression_task", lambda *a, **k: None)
    monkeypatch.setattr(csv_flows, "prepare_multilabel_task", lambda *a, **k: None)
    monkeypatch.setattr(csv_flows, "fine_tune_and_publish", fine_tune_and_publish)
    flow.fn(data="d", csv="c.csv", registry="r", name="m")
    assert type(seen["options"]) is model
    assert {k: getattr(seen["options"], k) for k in TASK_DEFAULTS} == defaults(model)
