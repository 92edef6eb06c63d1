"""``lensflow demo --offline``: the whole chain on generated data, every output where it says."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pyarrow.dataset as ds
import pytest

pytestmark = pytest.mark.slow


def test_offline_demo_trains_promotes_and_scores_everything(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONWARNINGS": "ignore",
           "LENSFLOW_DATA": ""}
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_SERVER_ANALYTICS_ENABLED", None)  # the demo itself must turn telemetry off
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "demo", "--offline",
                           "--workdir", str(tmp_path / "demo")],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    demo = tmp_path / "demo"
    for name in ("demo-images", "demo-recommender"):
        assert (demo / "registry" / name / "current").is_file()
    tables = {"predictions": ["image_predictions", "recommendations_topk",
                              "recommendations_full"],
              "nightly": ["image_predictions", "recommendations_topk"]}
    for root, names in tables.items():
        for table in names:
            partitions = list((demo / root / table).glob("run_date=*"))
            assert len(partitions) == 1 and (partitions[0] / "_SUCCESS").is_file(), table
            assert ds.dataset(partitions[0], format="parquet").count_rows() > 0
    assert "nightly flow run" in proc.stdout and "Completed" in proc.stdout
    # The first figure a newcomer sees is a model that learned the shapes (3 classes, 24 images
    # to check: chance is 0.33, and the demo used to print 0.625).
    accuracy = float(re.search(r"image model: accuracy ([0-9.]+)", proc.stdout).group(1))
    assert accuracy >= 0.9, proc.stdout
    assert str(demo / "registry") in proc.stdout
    # A clean first run offline: no telemetry attempt, no ERROR line from the temporary server.
    logged = proc.stdout + proc.stderr
    assert "telemetry" not in logged and "| ERROR" not in logged, logged[-3000:]
