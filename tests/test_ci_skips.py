"""Under ``CI=true`` a real-data or object-storage test fails instead of skipping.

Each case runs pytest in a subprocess on one real test of the suite, with the environment CI
would have minus one thing, and checks the run fails saying why.
"""

from __future__ import annotations

import os
import subprocess
import sys

from paths import REPO

REAL_DATA_TEST = "tests/export/test_parity.py::test_real_photos_as_the_validation_batch"


def run_pytest(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True,
        timeout=300)


def test_a_missing_shared_data_folder_is_an_error_in_ci(tmp_path):
    missing = tmp_path / "no-such-data"
    run = run_pytest(REAL_DATA_TEST, CI="true", LENSFLOW_SHARED_DATA=str(missing))
    assert run.returncode == 4, run.stdout + run.stderr  # pytest's usage error
    assert f"CI=true but the shared data folder {missing} is missing" in run.stderr
    outside_ci = run_pytest(REAL_DATA_TEST, CI="", LENSFLOW_SHARED_DATA=str(missing))
    assert outside_ci.returncode == 0 and "1 skipped" in outside_ci.stdout, outside_ci.stdout


def test_a_real_data_test_that_skips_in_ci_is_reported_failed(tmp_path):
    run = run_pytest(REAL_DATA_TEST, CI="true", LENSFLOW_SHARED_DATA=str(tmp_path))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 failed" in run.stdout and "CI=true: a real-data test may not skip" in run.stdout


def test_the_s3_server_fixture_fails_without_s3fs_never_skips(tmp_path):
    # s3fs as if it were not installed: a module ahead of the real one that is not found.
    (tmp_path / "s3fs.py").write_text(
        "raise ModuleNotFoundError('s3fs hidden by the test', name='s3fs')\n")
    run = run_pytest("tests/export/test_bundle_s3.py::test_an_upload_without_its_manifest_is_"
                     "not_a_version", PYTHONPATH=str(tmp_path))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 error" in run.stdout and "s3fs hidden by the test" in run.stdout
