"""The fault suite on ``delta`` tables, on local disk and on the loopback S3 server: real scoring
runs SIGKILLed at every step (parts being written, before the Delta commit, after it before the
run record), and two runs of one date at once — while deltalake and DuckDB's ``delta_scan`` poll
the table all along.

Every read must show, for every date, the rows of one whole committed run (the old one or the
new one): never part of a run, both at once or rows twice. A replaced run's files stay until
vacuum, so unlike the rename and record layouts no read even needs a retry. Each killed run is
held alive at its step (``scoring/fault_hook.py``, ``$LENSFLOW_FAULT_HOLD``) until it says it got
there and both readers have read the table while it stands there; then it dies by SIGKILL.
"""

from __future__ import annotations

import os
import sysconfig
from collections import Counter

import duckdb
import pytest
from deltalake import DeltaTable
from table_faults import (
    IMAGES,
    Poller,
    X,
    Y,
    Z,
    by_date,
    fault_store,
    kill_at_each_step,
    race,
    rerun_replaces,
)

from scoring.delta_maintenance import vacuum
from scoring.delta_table import storage_options
from scoring.shards import current_run

RUN_OPTIONS = {"shards": 2, "workers": 0, "batch_size": 4, "table_format": "delta"}
pytestmark = pytest.mark.slow  # a dozen scoring processes per store: minutes on 2 busy cores


@pytest.fixture(scope="module", params=["local", "s3"])
def store(request, tmp_path_factory):
    """The fault suite's folders and bundle (tests/support/table_faults.py), on local disk or in
    a bucket."""
    if request.param == "s3":
        request.getfixturevalue("s3_endpoint")
    with fault_store(tmp_path_factory.mktemp(f"delta-faults-{request.param}"),
                     tmp_path_factory.mktemp("runs"), request.param == "s3",
                     RUN_OPTIONS) as store:
        yield store


def read_deltalake(out: str) -> dict[str, Counter]:
    """{run_date: Counter of paths} of the table's newest version, read by deltalake."""
    uri = f"{out}/{IMAGES}"
    if not DeltaTable.is_deltatable(uri, storage_options(uri)):
        return {}
    t = DeltaTable(uri, storage_options=storage_options(uri)).to_pyarrow_table(
        columns=["path", "run_date"])
    return by_date(t["run_date"].to_pylist(), t["path"].to_pylist())


class DuckReader:
    """DuckDB's own Delta reader (the extension from its wheel; httpfs and a secret for S3)."""

    def __init__(self, out: str):
        self.uri = f"{out}/{IMAGES}"
        self.con = duckdb.connect()
        self.con.execute("SET extension_directory = ?", [os.path.join(
            sysconfig.get_paths()["purelib"], "duckdb_ext", "extensions")])
        self.con.execute("SET autoinstall_known_extensions = false")
        self.con.execute("LOAD delta")
        if self.uri.startswith("s3://"):
            self.con.execute("LOAD httpfs")
            endpoint = os.environ["AWS_ENDPOINT_URL"].removeprefix("http://")
            self.con.execute(
                f"CREATE SECRET (TYPE s3, KEY_ID '{os.environ['AWS_ACCESS_KEY_ID']}', SECRET "
                f"'{os.environ['AWS_SECRET_ACCESS_KEY']}', REGION 'us-east-1', ENDPOINT "
                f"'{endpoint}', URL_STYLE 'path', USE_SSL false)")

    def read(self) -> dict[str, Counter]:
        if not DeltaTable.is_deltatable(self.uri, storage_options(self.uri)):
            return {}
        rows = self.con.sql(f"SELECT run_date::VARCHAR, path FROM delta_scan('{self.uri}')"
                            ).fetchall()
        return by_date([r[0] for r in rows], [r[1] for r in rows])


def readers(out: str) -> dict:
    """The table's readers, each its own: deltalake and DuckDB's ``delta_scan``."""
    return {"deltalake": lambda: read_deltalake(out), "duckdb": DuckReader(out).read}


def test_a_kill_at_any_step_leaves_the_old_or_the_new_run_whole(store, tmp_path):
    out, A, B = store.out, store.A, store.B
    here, poller = readers(out), Poller(readers(out))
    kill_at_each_step(store, poller, tmp_path, here)
    # The two runs killed before their commit left parts no version names; vacuum (here with
    # no grace: nothing is live) deletes them with the replaced files, and no row changes.
    uri = f"{out}/{IMAGES}"
    committed = {h.get("lensflow.run_id")
                 for h in DeltaTable(uri, storage_options=storage_options(uri)).history()}
    gone = vacuum(out, IMAGES, 0, allow_short=True)
    assert {p.split("/")[1] for p in gone} - committed  # the run killed before its commit
    assert read_deltalake(out) == {str(X): A, str(Y): B} == here["duckdb"]()
    print("delta kill steps:", dict(poller.counts))


def test_two_runs_of_one_date_at_once_one_commits_the_other_fails_in_one_line(store, tmp_path):
    out, A, B = store.out, store.A, store.B
    here = readers(out)
    with Poller(readers(out)) as poller:
        poller.allow("concurrent", {Z: [None, A, B]})
        first, second = race(store, tmp_path / "gate")
        codes = sorted([first.wait(), second.wait()])
        assert codes == [0, 3], (first.events(), second.events())
        winner, loser = (first, second) if any("done" in e for e in first.events()) \
            else (second, first)
        won = winner.done()["run_id"]
        error = next(e["error"] for e in loser.events() if "error" in e)
        assert f"{IMAGES} run_date={Z} under {out} was committed by run {won}" in error
        assert "not committing (rerun to replace it)" in error and "\n" not in error
        state = read_deltalake(out)[str(Z)]
        assert state == (A if winner is first else B) == here["duckdb"]()[str(Z)]
        rerun = rerun_replaces(store, poller, here, state)
    assert poller.problems == [], poller.problems[:5]
    assert current_run(out, Z)["run_id"] == rerun.done()["run_id"]
