"""Every declared option is a ``lensflow train`` flag and a Prefect flow parameter, alike.

The option models of ``training.recipes.options`` are the one declaration; the CLI and the flows
derive theirs from it. These tests read what a user meets — the click command's flags and the
deployment's parameter schema — and check that a value the declaration refuses is refused by
both, as one line on the CLI and before any work in the flow.
"""

from __future__ import annotations

import sys

import pytest
import typer
from prefect.exceptions import ParameterTypeError
from prefect.utilities.callables import parameter_schema

from flows.cli import app, main
from flows.train_csv_flows import train_multilabel_model_flow, train_regression_model_flow
from flows.train_flows import train_image_model_flow, train_recommender_flow
from training.recipes.options import (
    ImageTrainOptions,
    MultiLabelOptions,
    RecommenderOptions,
    RegressionOptions,
)

#: (command under ``lensflow train``, Prefect flow, option model, the flow's required inputs)
SURFACES = [
    ("images", "train-image-model", ImageTrainOptions, {}),
    ("multilabel", "train-multilabel-model", MultiLabelOptions, {"csv": "x.csv"}),
    ("regression", "train-regression-model", RegressionOptions, {"csv": "x.csv"}),
    ("ratings", "train-recommender", RecommenderOptions, {}),
]
FLOWS = {f.name: f for f in (train_image_model_flow, train_multilabel_model_flow,
                             train_regression_model_flow, train_recommender_flow)}
IDS = [command for command, *_ in SURFACES]
#: Per command, values the declaration refuses (a check, a choice, a type).
BAD_VALUES = {
    "images": [("epochs", "-1"), ("lr", "fastest"), ("valid_pct", "1.5"), ("device", "tpu")],
    "multilabel": [("threshold_metric", "f2"), ("size", "0"), ("workers", "-2")],
    "regression": [("y_range", "0;1"), ("freeze_epochs", "-1"), ("bs", "0")],
    "ratings": [("factors", "0"), ("split", "sideways"), ("lr", "fast"), ("wd", "-0.1")],
}
CASES = [(surface, option, value) for surface in SURFACES
         for option, value in BAD_VALUES[surface[0]]]


def _click_options(command: str) -> dict:
    group = typer.main.get_command(app).commands["train"]
    return {p.name: p for p in group.commands[command].params}


@pytest.mark.parametrize("command, flow_name, model, _", SURFACES, ids=IDS)
def test_every_option_is_a_flag_and_a_flow_parameter_with_its_default(command, flow_name,
                                                                      model, _):
    flags = _click_options(command)
    schema = parameter_schema(FLOWS[flow_name]).model_dump()["properties"]
    for name, field in model.model_fields.items():
        default = field.get_default()
        assert f"--{name.replace('_', '-')}" in flags[name].opts, name
        assert flags[name].default == default, name
        assert schema[name].get("default") == default, name
        assert schema[name].get("description") == field.description, name
        assert flags[name].help == field.description, name


@pytest.mark.parametrize("surface, option, value", CASES,
                         ids=[f"{s[0]}-{o}" for s, o, _ in CASES])
def test_a_refused_value_is_one_line_on_the_cli(surface, option, value, monkeypatch, capsys,
                                                tmp_path):
    command = surface[0]
    args = ["lensflow", "train", command, str(tmp_path / "missing")]
    if command in ("multilabel", "regression"):
        args += ["--images", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [*args, f"--{option.replace('_', '-')}", value])
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --{option.replace('_', '-')}: ")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("surface, option, value", CASES,
                         ids=[f"{s[0]}-{o}" for s, o, _ in CASES])
def test_a_refused_value_fails_the_flow_before_any_work(surface, option, value):
    _, flow_name, _, required = surface
    inputs = {"data": "x", "registry": "reg", "name": "m", **required}
    with pytest.raises(ParameterTypeError, match=option):
        FLOWS[flow_name].validate_parameters({**inputs, option: value})


@pytest.mark.parametrize("command, flow_name, model, required", SURFACES, ids=IDS)
def test_flat_flow_parameters_arrive_as_one_validated_options_object(command, flow_name, model,
                                                                     required):
    flow = FLOWS[flow_name]
    inputs = {"data": "x", "registry": "reg", "name": "m", **required}
    # As ``prefect deployment run --param epochs=2`` sends them: flat, possibly as text.
    checked = flow.validate_parameters({**inputs, "epochs": "2", "seed": 7})
    assert checked["epochs"] == 2
    options = model(**{k: v for k, v in checked.items() if k in model.model_fields})
    assert options == model(epochs=2, seed=7)
