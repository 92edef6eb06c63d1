"""The fault suite on object storage (the loopback S3 server): real scoring runs SIGKILLed at
every commit step, and two runs of one date at once, while a reader polls the table through its
commit records (pyarrow) all along.

Every read must see, for every date, the old partition or the new one whole: never a part of one,
both at once or rows twice. A read that lists a replaced run's parts just before they are deleted
fails with "not found"; that is counted as a retry, as on local disk. Each killed run is held
alive at its named step (``scoring/fault_hook.py``) until it has said it got there and the reader
has read the table while it stands there, seeing exactly the state that step must leave.
"""

from __future__ import annotations

import signal
import threading
from collections import Counter
from datetime import date

import fsspec
import pytest
from fault_holds import FaultHold
from flow_test_data import make_images
from forked_runs import Forker
from s3_server import new_bucket
from tiny_image_bundle import make_image_bundle

from export.bundle_remote import CACHE_ENV
from scoring.fault_hook import FAULT_STEPS
from scoring.object_commit import (
    clear_dead_runs,
    open_table,
    read_commit,
    record_url,
    table_parts,
)
from scoring.shards import current_run

IMAGES = "image_predictions"
X, Y, Z = date(2026, 11, 20), date(2026, 11, 21), date(2026, 11, 22)
KILLED = -signal.SIGKILL
#: The commit-record layout (``delta`` is the default on a URL: tests/scoring/test_delta_faults.py).
RUN_OPTIONS = {"shards": 2, "workers": 0, "batch_size": 4, "table_format": "parquet"}
pytestmark = pytest.mark.slow  # a dozen scoring processes: minutes on a busy 2-core machine


@pytest.fixture(scope="module")
def store(s3_endpoint, tmp_path_factory):
    """A bucket with two folders whose rows tell them apart and a promoted bundle; a forker
    whose runs fetch that bundle into one cache."""
    root = tmp_path_factory.mktemp("store")
    bucket = new_bucket()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(root / "cache"))
        make_images(root / "A" / "a", 6, size=32)
        make_images(root / "B" / "b", 8, size=32, seed=1)
        fs = fsspec.filesystem("s3")
        for name in "AB":
            fs.put(str(root / name), f"{bucket}/{name}", recursive=True)
        make_image_bundle(f"{bucket}/registry")
        forker = Forker(tmp_path_factory.mktemp("runs"))
        state = {f: Counter(f"{f.lower()}/img_{i:03d}.png" for i in range(n))
                 for f, n in (("A", 6), ("B", 8))}
        yield {"bucket": bucket, "forker": forker, "state": state, "out": f"{bucket}/out"}
        forker.close()


def _args(store, folder: str, day: date) -> dict:
    return {"folder": f"{store['bucket']}/{folder}", "model": f"{store['bucket']}/registry/tiny",
            "out": store["out"], "run_date": day, **RUN_OPTIONS}


def read_table(out: str) -> dict[str, Counter]:
    """{run_date: Counter of paths} of the committed rows, read through the commit records."""
    if not table_parts(out, IMAGES):
        return {}
    t = open_table(out, IMAGES).to_table(columns=["path", "run_date"])
    found: dict[str, Counter] = {}
    for day, path in zip(t["run_date"].to_pylist(), t["path"].to_pylist(), strict=True):
        found.setdefault(str(day), Counter())[path] += 1
    return found


class Poller:
    """A thread reading the table until stopped; each read must be one of the allowed states."""

    def __init__(self, out: str):
        self.out, self.allowed, self.phase = out, {}, "setup"
        self.counts: Counter = Counter()
        self.problems: list[str] = []
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
        while not self._stop.wait(0.05):  # leave the 2 cores to the runs
            with self._guard:
                phase, allowed = self.phase, dict(self.allowed)
            try:
                seen = read_table(self.out)
            except Exception as err:  # noqa: BLE001 - every failure is classified
                if isinstance(err, FileNotFoundError) or "not found" in str(err).lower():
                    self.counts[(phase, "retry")] += 1
                else:
                    self.problems.append(f"{phase}: {type(err).__name__}: {err}")
                continue
            with self._guard:
                if phase != self.phase:
                    continue
            for day, states in allowed.items():
                if seen.get(day) not in states:
                    self.problems.append(f"{phase}: {day} has {sum(seen.get(day, {}).values())} "
                                         "rows, not one of the allowed states")
            with self._read:
                self.counts[(phase, "read")] += 1
                self._read.notify_all()

    def wait_read(self, phase: str, timeout: float = 120) -> None:
        """Until the reader has read the table once in ``phase``."""
        with self._read:
            done = self._read.wait_for(lambda: self.counts[(phase, "read")] >= 1, timeout)
        assert done, f"no read in {phase!r}: {dict(self.counts)}"


def test_a_kill_at_any_commit_step_leaves_the_old_or_the_new_run_whole(store, tmp_path):
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
                assert read_table(out) == after, fault
                poller.wait_read(f"{fault} held")
                poller.allow(fault, allowed)
                hold.release()
            finally:
                hold.close(run)
            assert run.wait() == KILLED, run.events()
            assert read_table(out) == after, fault
            if fault in ("after-swap", "before-record"):  # visible, but the run has no record
                assert current_run(out, day) is None
        poller.allow("clean", {X: [B, A], Y: [B]})
        run = forker.start("images", **_args(store, "A", X))
        assert run.wait() == 0, run.events()
        assert read_table(out) == {str(X): A, str(Y): B}
        poller.wait_read("clean")
    assert poller.problems == [], poller.problems[:5]
    assert [step for step, *_ in steps] == list(FAULT_STEPS)
    assert all(poller.counts[(f"{step} held", "read")] >= 1 for step in FAULT_STEPS)
    done = run.done()
    assert current_run(out, X, [IMAGES])["run_id"] == done["run_id"]
    # The killed runs' parts were never visible; once old enough a later run deletes them.
    orphans = clear_dead_runs(out, IMAGES, grace_s=0)
    assert len(orphans) == 2 and all(done["run_id"] not in o for o in orphans)
    assert read_table(out) == {str(X): A, str(Y): B}
    print("object-store kill steps:", dict(poller.counts))


def test_two_runs_of_one_date_at_once_leave_one_of_them_whole(store, tmp_path):
    forker, out, A, B = store["forker"], store["out"], store["state"]["A"], store["state"]["B"]
    gate = tmp_path / "gate"
    with Poller(out) as poller:
        poller.allow("concurrent", {Z: [None, A, B]})
        first = forker.start("images", gate=gate, **_args(store, "A", Z))
        second = forker.start("images", gate=gate, **_args(store, "B", Z))
        first.wait_for("start")
        second.wait_for("start")  # both planned, parts under their own prefixes; now race
        gate.touch()
        assert first.wait() == 0 and second.wait() == 0, (first.events(), second.events())
        winner = read_commit(record_url(out, IMAGES, Z))["run_id"]
        assert winner in (first.done()["run_id"], second.done()["run_id"])
        assert read_table(out)[str(Z)] in (A, B)
        poller.allow("after", {Z: [read_table(out)[str(Z)], A]})
        rerun = forker.start("images", **_args(store, "A", Z))
        assert rerun.wait() == 0, rerun.events()
        assert read_table(out)[str(Z)] == A
    assert poller.problems == [], poller.problems[:5]
    assert current_run(out, Z)["run_id"] == rerun.done()["run_id"]
