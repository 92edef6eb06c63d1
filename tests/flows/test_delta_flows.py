"""``table_format`` reaches every scoring surface from its one declaration: the nightly flow
passes it to its jobs (a deployment's parameter), and a bad value is refused before any work."""

from __future__ import annotations

import inspect
from datetime import date

import pytest
from deltalake import DeltaTable
from flow_test_data import make_images
from prefect.exceptions import ParameterTypeError
from tiny_image_bundle import make_image_bundle

from flows.score_flows import nightly_flow, score_image_folder_flow, score_recommendations_flow

DAY = date(2026, 1, 2)


def test_every_scoring_flow_takes_the_table_format_parameter():
    for flow in (nightly_flow, score_image_folder_flow, score_recommendations_flow):
        params = inspect.signature(flow.fn).parameters
        assert params["table_format"].default is None, flow.name
        assert params["schema_evolution"].default is False, flow.name


def test_the_nightly_flow_writes_its_jobs_as_delta_tables_when_asked(tmp_path, prefect_api):
    make_image_bundle(tmp_path / "registry", name="tiny")
    jobs = [{"folder": str(make_images(tmp_path / "inbox", 3)),
             "model": str(tmp_path / "registry" / "tiny")}]
    state = nightly_flow(str(tmp_path / "out"), image_jobs=jobs, run_date=DAY,
                         table_format="delta", return_state=True)
    assert state.is_completed(), state.message
    table = DeltaTable(str(tmp_path / "out" / "image_predictions"))
    assert table.to_pyarrow_table().num_rows == 3
    entry = table.history(1)[0]
    assert entry["lensflow.run_date"] == str(DAY) and entry["lensflow.model_name"] == "tiny"
    with pytest.raises(ParameterTypeError, match="table_format"):
        nightly_flow(str(tmp_path / "out"), image_jobs=jobs, table_format="iceberg")
