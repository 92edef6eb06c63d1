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
import signal
import sysconfig
import threading
from collections import Counter
from datetime import date

import duckdb
import fsspec
import pytest
from deltalake import DeltaTable
from fault_holds import FaultHold
from flow_test_data import make_images
from forked_runs import Forker
from s3_server import new_bucket
from tiny_image_bundle import make_image_bundle

from export.bundle_remote import CACHE_ENV
from scoring.delta_maintenance import vacuum
from scoring.delta_table import storage_options
from scoring.fault_hook import FAULT_STEPS
from scoring.shards import current_run

IMAGES = "image_predictions"
X, Y, Z = date(2026, 11, 20), date(2026, 11, 21), date(2026, 11, 22)
KILLED = -signal.SIGKILL
RUN_OPTIONS = {"shards": 2, "workers": 0, "batch_size": 4, "table_format": "delta"}
pytestmark = pytest.mark.slow  # a dozen scoring processes per store: minutes on 2 busy cores


@pytest.fixture(scope="module", params=["local", "s3"])
def store(request, tmp_path_factory):
    """Two folders whose rows tell them apart and a promoted bundle, on local disk or in a
    bucket; a forker whose runs share one bundle cache."""
    root = tmp_path_factory.mktemp(f"delta-faults-{request.param}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(root / "cache"))
        make_images(root / "A" / "a", 6, size=32)
        make_images(root / "B" / "b", 8, size=32, seed=1)
        if request.param == "s3":
            request.getfixturevalue("s3_endpoint")
            base = new_bucket()
            fs = fsspec.filesystem("s3")
            for name in "AB":
                fs.put(str(root / name), f"{base}/{name}", recursive=True)
            make_image_bundle(f"{base}/registry")
        else:
            base = str(root)
            make_image_bundle(root / "registry")
        forker = Forker(tmp_path_factory.mktemp("runs"))
        state = {f: Counter(f"{f.lower()}/img_{i:03d}.png" for i in range(n))
                 for f, n in (("A", 6), ("B", 8))}
        yield {"base": base, "forker": forker, "state": state, "out": f"{base}/out"}
        forker.close()


def _args(store, folder: str, day: date) -> dict:
    return {"folder": f"{store['base']}/{folder}", "model": f"{store['base']}/registry/tiny",
            "out": store["out"], "run_date": day, **RUN_OPTIONS}


def _by_date(days, paths) -> dict[str, Counter]:
    found: dict[str, Counter] = {}
    for day, path in zip(days, paths, strict=True):
        found.setdefault(str(day), Counter())[path] += 1
    return found


def read_deltalake(out: str) -> dict[str, Counter]:
    """{run_date: Counter of paths} of the table's newest version, read by deltalake."""
    uri = f"{out}/{IMAGES}"
    if not DeltaTable.is_deltatable(uri, storage_options(uri)):
        return {}
    t = DeltaTable(uri, storage_options=storage_options(uri)).to_pyarrow_table(
        columns=["path", "run_date"])
    return _by_date(t["run_date"].to_pylist(), t["path"].to_pylist())


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
        return _by_date([r[0] for r in rows], [r[1] for r in rows])


class Poller:
    """A thread reading the table with deltalake and DuckDB in turn until stopped; each read
    must be one of the states allowed in the current phase."""

    def __init__(self, out: str):
        self.out, self.allowed, self.phase = out, {}, "setup"
        self.counts: Counter = Counter()
        self.problems: list[str] = []
        self._readers = {"deltalake": lambda: read_deltalake(out), "duckdb": DuckReader(out).read}
        self._stop, self._guard = threading.Event(), threading.Lock()
        self._read = threading.Condition()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def allow(self, phase: str, states: dict[date, list]) -> None:
        with self._guard:
            self.phase, self.allowed = phase, {str(d): s for d, s in states.items()}

    def _poll(self) -> None:
        turn = 0
        while not self._stop.wait(0.05):  # leave the 2 cores to the runs
            name = ("deltalake", "duckdb")[turn % 2]
            turn += 1
            with self._guard:
                phase, allowed = self.phase, dict(self.allowed)
            try:
                seen = self._readers[name]()
            except Exception as err:  # noqa: BLE001 — no read may fail at all
                self.problems.append(f"{phase}: {name}: {type(err).__name__}: {err}")
                continue
            with self._guard:
                if phase != self.phase:
                    continue
            with self._read:
                self.counts[(phase, name)] += 1
                self._read.notify_all()
            for day, states in allowed.items():
                if seen.get(day) not in states:
                    self.problems.append(f"{phase}: {name}: {day} has "
                                         f"{sum(seen.get(day, {}).values())} rows, not one of "
                                         "the allowed states")

    def wait_read(self, phase: str, timeout: float = 120) -> None:
        """Until both readers have read the table once in ``phase``."""
        with self._read:
            done = self._read.wait_for(lambda: all(self.counts[(phase, r)] >= 1
                                                   for r in ("deltalake", "duckdb")), timeout)
        assert done, f"no read by both readers in {phase!r}: {dict(self.counts)}"


def test_a_kill_at_any_step_leaves_the_old_or_the_new_run_whole(store, tmp_path):
    forker, out, A, B = store["forker"], store["out"], store["state"]["A"], store["state"]["B"]
    for day in (X, Y):
        assert forker.start("images", **_args(store, "A", day)).wait() == 0
    with Poller(out) as poller:
        steps = [("mid-write", X, {X: [A], Y: [A]}, {str(X): A, str(Y): A}),
                 ("before-swap", Y, {X: [A], Y: [A]}, {str(X): A, str(Y): A}),
                 ("after-swap", X, {X: [A, B], Y: [A]}, {str(X): B, str(Y): A}),
                 ("before-record", Y, {X: [B], Y: [A, B]}, {str(X): B, str(Y): B})]
        for fault, day, allowed, after in steps:
            poller.allow(fault, allowed)
            hold = FaultHold(tmp_path / fault)
            run = forker.start("images", fault, hold=hold.folder, **_args(store, "B", day))
            try:
                assert hold.wait_reached(run) == fault, run.events()
                poller.allow(f"{fault} held", {d: [after[str(d)]] for d in (X, Y)})
                assert read_deltalake(out) == after == DuckReader(out).read(), fault
                poller.wait_read(f"{fault} held")
                poller.allow(fault, allowed)
                hold.release()
            finally:
                hold.close()
            assert run.wait() == KILLED, run.events()
            assert read_deltalake(out) == after, fault
            if fault in ("after-swap", "before-record"):  # visible, but the run has no record
                assert current_run(out, day) is None
        poller.allow("clean", {X: [B, A], Y: [B]})
        run = forker.start("images", **_args(store, "A", X))
        assert run.wait() == 0, run.events()
        assert read_deltalake(out) == {str(X): A, str(Y): B}
    assert poller.problems == [], poller.problems[:5]
    assert [step for step, *_ in steps] == list(FAULT_STEPS)
    assert all(poller.counts[(f"{step} held", reader)] >= 1 for step in FAULT_STEPS
               for reader in ("deltalake", "duckdb")), poller.counts
    assert current_run(out, X, [IMAGES])["run_id"] == run.done()["run_id"]
    # The two runs killed before their commit left parts no version names; vacuum (here with
    # no grace: nothing is live) deletes them with the replaced files, and no row changes.
    uri = f"{out}/{IMAGES}"
    committed = {h.get("lensflow.run_id")
                 for h in DeltaTable(uri, storage_options=storage_options(uri)).history()}
    gone = vacuum(out, IMAGES, 0, allow_short=True)
    assert {p.split("/")[1] for p in gone} - committed  # the run killed before its commit
    assert read_deltalake(out) == {str(X): A, str(Y): B}
    print("delta kill steps:", dict(poller.counts))


def test_two_runs_of_one_date_at_once_one_commits_the_other_fails_in_one_line(store, tmp_path):
    forker, out, A, B = store["forker"], store["out"], store["state"]["A"], store["state"]["B"]
    gate = tmp_path / "gate"
    with Poller(out) as poller:
        poller.allow("concurrent", {Z: [None, A, B]})
        first = forker.start("images", gate=gate, **_args(store, "A", Z))
        second = forker.start("images", gate=gate, **_args(store, "B", Z))
        first.wait_for("start")
        second.wait_for("start")  # both planned against the same table version; now race
        gate.touch()
        codes = sorted([first.wait(), second.wait()])
        assert codes == [0, 3], (first.events(), second.events())
        winner, loser = (first, second) if any("done" in e for e in first.events()) \
            else (second, first)
        won = winner.done()["run_id"]
        error = next(e["error"] for e in loser.events() if "error" in e)
        assert f"{IMAGES} run_date={Z} under {out} was committed by run {won}" in error
        assert "not committing (rerun to replace it)" in error and "\n" not in error
        state = read_deltalake(out)[str(Z)]
        assert state == (A if winner is first else B)
        poller.allow("after", {Z: [state, A]})
        rerun = forker.start("images", **_args(store, "A", Z))
        assert rerun.wait() == 0, rerun.events()
        assert read_deltalake(out)[str(Z)] == A
    assert poller.problems == [], poller.problems[:5]
    assert current_run(out, Z)["run_id"] == rerun.done()["run_id"]
