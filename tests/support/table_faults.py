"""The fault suite of the table layouts other than the local rename (the commit records on object
storage, ``delta`` on disk and on S3): real scoring runs forked and SIGKILLed at every step, or two
runs of one date raced, while a thread polls the table with each reader of the layout.

Each layout's test module gives its readers (``{name: read}``, a read being ``{run_date: Counter
of paths}``); the runs, the steps and what each step must leave visible are the same for all.
"""

from __future__ import annotations

import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import fsspec
import pytest
from fault_holds import FaultHold
from flow_test_data import make_images
from forked_runs import Forker, Run
from s3_server import new_bucket
from tiny_image_bundle import make_image_bundle

from export.bundle_remote import CACHE_ENV
from scoring.fault_hook import FAULT_STEPS
from scoring.shards import current_run

IMAGES = "image_predictions"
X, Y, Z = date(2026, 11, 20), date(2026, 11, 21), date(2026, 11, 22)
KILLED = -signal.SIGKILL

Read = Callable[[], dict[str, Counter]]


def by_date(days, paths) -> dict[str, Counter]:
    """{run_date: Counter of paths} of a read's two columns."""
    found: dict[str, Counter] = {}
    for day, path in zip(days, paths, strict=True):
        found.setdefault(str(day), Counter())[path] += 1
    return found


class FaultStore:
    """Folders A (6 images) and B (8) whose rows tell them apart, a promoted bundle ``tiny``
    under ``base`` and the forker that runs scoring on them into ``out``."""

    def __init__(self, base: str, forker: Forker, run_options: dict):
        self.base, self.forker, self.run_options = base, forker, run_options
        self.out = f"{base}/out"
        self.A = Counter(f"a/img_{i:03d}.png" for i in range(6))
        self.B = Counter(f"b/img_{i:03d}.png" for i in range(8))

    def start(self, folder: str, day: date, fault: str | None = None, **kw) -> Run:
        """A scoring run of ``folder`` for ``day`` (``fault``: killed at that step)."""
        return self.forker.start("images", fault, folder=f"{self.base}/{folder}",
                                 model=f"{self.base}/registry/tiny", out=self.out, run_date=day,
                                 **self.run_options, **kw)


@contextmanager
def fault_store(root: Path, runs: Path, remote: bool, run_options: dict) -> Iterator[FaultStore]:
    """The folders and bundle on local disk under ``root``, or in a new bucket (``remote``: the
    S3 server must be up); the forker's runs (logs in ``runs``) share one bundle cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(root / "cache"))
        make_images(root / "A" / "a", 6, size=32)
        make_images(root / "B" / "b", 8, size=32, seed=1)
        if remote:
            base = new_bucket()
            fs = fsspec.filesystem("s3")
            for name in "AB":
                fs.put(str(root / name), f"{base}/{name}", recursive=True)
            make_image_bundle(f"{base}/registry")
        else:
            base = str(root)
            make_image_bundle(root / "registry")
        forker = Forker(runs)
        try:
            yield FaultStore(base, forker, run_options)
        finally:
            forker.close()


class Poller:
    """A thread reading the table with each of ``readers`` in turn until stopped; each read must
    be one of the states allowed in the current phase. A failed read is a problem, unless
    ``retry(err)`` says it raced a replacement: then it is counted as ``(phase, name, "retry")``.
    """

    def __init__(self, readers: dict[str, Read],
                 retry: Callable[[Exception], bool] = lambda err: False):
        self.readers, self.retry = readers, retry
        self.allowed: dict[str, list] = {}
        self.phase = "setup"
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
        names, turn = list(self.readers), 0
        while not self._stop.wait(0.05):  # leave the 2 cores to the runs
            name = names[turn % len(names)]
            turn += 1
            with self._guard:
                phase, allowed = self.phase, dict(self.allowed)
            try:
                seen = self.readers[name]()
            except Exception as err:  # noqa: BLE001 — every failure is classified
                if self.retry(err):
                    self.counts[(phase, name, "retry")] += 1
                else:
                    self.problems.append(f"{phase}: {name}: {type(err).__name__}: {err}")
                continue
            with self._guard:
                if phase != self.phase:
                    continue  # the allowed states changed during the read
            for day, states in allowed.items():
                if seen.get(day) not in states:
                    self.problems.append(f"{phase}: {name}: {day} has "
                                         f"{sum(seen.get(day, {}).values())} rows, not one of "
                                         "the allowed states")
            with self._read:
                self.counts[(phase, name)] += 1
                self._read.notify_all()

    def read_by_all(self, phase: str) -> bool:
        """Whether every reader has read the table once in ``phase``."""
        return all(self.counts[(phase, name)] >= 1 for name in self.readers)

    def wait_read(self, phase: str, timeout: float = 120) -> None:
        """Until every reader has read the table once in ``phase``."""
        with self._read:
            done = self._read.wait_for(lambda: self.read_by_all(phase), timeout)
        assert done, f"no read by every reader in {phase!r}: {dict(self.counts)}"


def kill_steps(A: Counter, B: Counter) -> list[tuple[str, date, dict, dict]]:
    """(step, the date of B's run killed there, the states allowed while it runs, what must be
    visible once it stands there) for each step, dates X and Y both scored from A before."""
    return [("mid-write", X, {X: [A], Y: [A]}, {str(X): A, str(Y): A}),
            ("before-swap", Y, {X: [A], Y: [A]}, {str(X): A, str(Y): A}),
            ("after-swap", X, {X: [A, B], Y: [A]}, {str(X): B, str(Y): A}),
            ("before-record", Y, {X: [B], Y: [A, B]}, {str(X): B, str(Y): B})]


def shows(readers: dict[str, Read], expected: dict, when: str) -> None:
    """Each of ``readers`` sees exactly ``expected`` now."""
    seen = {name: read() for name, read in readers.items()}
    assert seen and seen == dict.fromkeys(seen, expected), (when, seen, expected)


def kill_at_each_step(store: FaultStore, poller: Poller, holds: Path,
                      readers: dict[str, Read]) -> Run:
    """Score A for X and Y; then, while ``poller`` reads, a run of B killed at each fault step,
    held there until the step is hit and each of ``readers`` (this thread's own) and of the
    poller's has read the table, each step leaving exactly its state; then A for X again,
    unkilled. Returns that last run; every step was hit and read, no poll broke the rules."""
    A, B, out = store.A, store.B, store.out
    for day in (X, Y):
        assert store.start("A", day).wait() == 0
    steps = kill_steps(A, B)
    assert [step for step, *_ in steps] == list(FAULT_STEPS)
    with poller:
        for fault, day, allowed, after in steps:
            poller.allow(fault, allowed)
            hold = FaultHold(holds / fault)
            run = store.start("B", day, fault, hold=hold.folder)
            try:
                assert hold.wait_reached(run) == fault, run.events()
                poller.allow(f"{fault} held", {d: [after[str(d)]] for d in (X, Y)})
                shows(readers, after, f"{fault} held")
                poller.wait_read(f"{fault} held")
                poller.allow(fault, allowed)
                hold.release()
            finally:
                hold.close(run)
            assert run.wait() == KILLED, run.events()
            shows(readers, after, f"{fault} killed")
            if fault in ("after-swap", "before-record"):  # visible, but the run has no record
                assert current_run(out, day) is None
        poller.allow("clean", {X: [B, A], Y: [B]})
        run = store.start("A", X)
        assert run.wait() == 0, run.events()
        shows(readers, {str(X): A, str(Y): B}, "clean")
        poller.wait_read("clean")
    assert poller.problems == [], poller.problems[:5]
    assert all(poller.read_by_all(f"{step} held") for step in FAULT_STEPS), poller.counts
    record = current_run(out, X, [IMAGES])
    assert record["run_id"] == run.done()["run_id"], (record, run.events())
    return run


def race(store: FaultStore, gate: Path) -> tuple[Run, Run]:
    """Runs of A and of B for date Z, both planned against the same table, then let go at once."""
    first = store.start("A", Z, gate=gate)
    second = store.start("B", Z, gate=gate)
    first.wait_for("start")
    second.wait_for("start")
    gate.touch()
    return first, second


def rerun_replaces(store: FaultStore, poller: Poller, readers: dict[str, Read],
                   state: Counter) -> Run:
    """A run of A for Z after the race left ``state``: it replaces it, seen whole or not at all
    by the poller, then by each of ``readers``."""
    poller.allow("after", {Z: [state, store.A]})
    rerun = store.start("A", Z)
    assert rerun.wait() == 0, rerun.events()
    seen = {name: read().get(str(Z)) for name, read in readers.items()}
    assert seen and seen == dict.fromkeys(seen, store.A), (seen, store.A)
    return rerun
