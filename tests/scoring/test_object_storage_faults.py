"""The fault suite on object storage (the loopback S3 server): real scoring runs SIGKILLed at
every commit step, and two runs of one date at once, while a reader poller the table through its
commit records (pyarrow) all along.

Every read must see, for every date, the old partition or the new one whole: never a part of one,
both at once or rows twice. A read that lists a replaced run's parts just before they are deleted
fails with "not found"; that is counted as a retry, as on local disk. Each killed run is held
alive at its named step (``scoring/fault_hook.py``) until it has said it got there and the reader
has read the table while it stands there, seeing exactly the state that step must leave.
"""

from __future__ import annotations

from collections import Counter

import pytest
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

from scoring.object_commit import (
    clear_dead_runs,
    open_table,
    read_commit,
    record_url,
    table_parts,
)
from scoring.shards import current_run

#: The commit-record layout (``delta`` is the default on a URL: tests/scoring/test_delta_faults.py).
RUN_OPTIONS = {"shards": 2, "workers": 0, "batch_size": 4, "table_format": "parquet"}
pytestmark = pytest.mark.slow  # a dozen scoring processes: minutes on a busy 2-core machine


@pytest.fixture(scope="module")
def store(s3_endpoint, tmp_path_factory):
    """The fault suite's folders and bundle (tests/support/table_faults.py) in a bucket."""
    with fault_store(tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("runs"), True,
                     RUN_OPTIONS) as store:
        yield store


def read_table(out: str) -> dict[str, Counter]:
    """{run_date: Counter of paths} of the committed rows, read through the commit records."""
    if not table_parts(out, IMAGES):
        return {}
    t = open_table(out, IMAGES).to_table(columns=["path", "run_date"])
    return by_date(t["run_date"].to_pylist(), t["path"].to_pylist())


def _vanished(err: Exception) -> bool:
    """A read that listed a replaced run's part just before it was deleted: a retry."""
    return isinstance(err, FileNotFoundError) or "not found" in str(err).lower()


def readers(out: str) -> dict:
    """The table's one reader: pyarrow through the commit records."""
    return {"commit records": lambda: read_table(out)}


def test_a_kill_at_any_commit_step_leaves_the_old_or_the_new_run_whole(store, tmp_path):
    out, A, B = store.out, store.A, store.B
    poller = Poller(readers(out), retry=_vanished)
    done = kill_at_each_step(store, poller, tmp_path, readers(out)).done()
    # The killed runs' parts were never visible; once old enough a later run deletes them.
    orphans = clear_dead_runs(out, IMAGES, grace_s=0)
    assert len(orphans) == 2 and all(done["run_id"] not in o for o in orphans)
    assert read_table(out) == {str(X): A, str(Y): B}
    print("object-store kill steps:", dict(poller.counts))


def test_two_runs_of_one_date_at_once_leave_one_of_them_whole(store, tmp_path):
    out, A, B = store.out, store.A, store.B
    with Poller(readers(out), retry=_vanished) as poller:
        poller.allow("concurrent", {Z: [None, A, B]})
        first, second = race(store, tmp_path / "gate")
        assert first.wait() == 0 and second.wait() == 0, (first.events(), second.events())
        winner = read_commit(record_url(out, IMAGES, Z))["run_id"]
        assert winner in (first.done()["run_id"], second.done()["run_id"])
        assert read_table(out)[str(Z)] in (A, B)
        rerun = rerun_replaces(store, poller, readers(out), read_table(out)[str(Z)])
    assert poller.problems == [], poller.problems[:5]
    assert current_run(out, Z)["run_id"] == rerun.done()["run_id"]
