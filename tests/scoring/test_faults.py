"""The fault suite: real scoring processes SIGKILLed at every commit step (in order, and in a
seeded random order), two runs of one date at once, and readers (pyarrow datasets, DuckDB globs)
polling all along.

Every read must see, for every date, the old partition or the new one whole: never a part of
one, both at once, rows twice, or a staging file. A read that races a replacement may instead
fail with "file not found" (the listed old part is gone); that is counted as a retry. The runs are
forked by ``tests/support/scoring_forker.py``, which imports the scorers once.

Each kill is at a named step (``scoring/fault_hook.py``), not at a random time: the run is held
alive at its step until it has said it got there and both readers have read the tables while it
stands there (and seen exactly the state that step must leave), then it is released to its
SIGKILL. So every step a test names was hit, and read during.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from collections import Counter
from datetime import date
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fault_holds import FaultHold
from flow_test_data import make_images
from forked_runs import Forker
from partition_readers import Readers, exact, read_duckdb, read_pyarrow, violations
from tiny_image_bundle import make_image_bundle

from export.convert import export_bundle
from scoring.fault_hook import FAULT_STEPS
from scoring.image_scoring import score_image_folder
from scoring.recommendations import FULL_TABLE, TOPK_TABLE, score_recommendations
from scoring.shards import RUNS_DIR, current_run
from scoring.staging import STAGING_DIR
from training.models.collab import DotProductBias

IMAGES = "image_predictions"
X, Y, Z = date(2026, 11, 20), date(2026, 11, 21), date(2026, 11, 22)
KILLED = -signal.SIGKILL
RUN_OPTIONS = {"shards": 2, "workers": 0, "batch_size": 4}


# --- runs forked from one process that imported the scorers (tests/support/forked_runs.py) ----

@pytest.fixture(scope="module")
def forker(tmp_path_factory):
    f = Forker(tmp_path_factory.mktemp("runs"))
    yield f
    f.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A bundle and two folders whose rows tell them apart (``a/...`` and ``b/...``)."""
    root = tmp_path_factory.mktemp("images")
    make_images(root / "A" / "a", 6, size=32)
    make_images(root / "B" / "b", 8, size=32, seed=1)
    model = make_image_bundle(root / "registry")
    state = {f: Counter(f"{f.lower()}/img_{i:03d}.png" for i in range(n))
             for f, n in (("A", 6), ("B", 8))}
    return {"root": root, "model": model, "A": root / "A", "B": root / "B", "state": state}


def _image_args(images, folder: str, out: Path, day: date) -> dict:
    return {"folder": images[folder], "model": images["model"], "out": out, "run_date": day,
            **RUN_OPTIONS}


def _staged_files(out: Path) -> list[Path]:
    return sorted(p for p in (out / STAGING_DIR).rglob("*") if not p.is_dir())


def _records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / RUNS_DIR).glob("*.json")}


def _success_run_id(out: Path, table: str, day: date) -> str:
    return json.loads((out / table / f"run_date={day}" / "_SUCCESS").read_text())["run_id"]


# --- the checker itself -------------------------------------------------------------------------

def test_the_read_check_catches_staging_in_the_table_duplicates_and_partial_partitions(
        images, tmp_path):
    score_image_folder(images["A"], images["model"], tmp_path, run_date=X, **RUN_OPTIONS)
    allowed = {"2026-11-20": [images["state"]["A"]]}
    for read in (read_pyarrow, read_duckdb):
        assert violations(read(tmp_path, IMAGES, "path"), allowed) == []
    partition = tmp_path / IMAGES / "run_date=2026-11-20"
    parts = sorted(partition.glob("part-*.parquet"))
    assert len(parts) == 2

    stray = tmp_path / IMAGES / ".run_date=2026-11-20-old.tmp"  # the layout before _staging
    shutil.copytree(partition, stray)
    with pytest.raises(duckdb.Error, match="(?i)hive partition"):
        read_duckdb(tmp_path, IMAGES, "path")
    con = duckdb.connect()
    rows = con.sql(f"SELECT count(*) FROM read_parquet('{tmp_path}/{IMAGES}/*/*.parquet')")
    assert rows.fetchall() == [(12,)]  # without hive_partitioning: twice the rows
    shutil.rmtree(stray)

    shutil.copy(parts[0], partition / "part-00000-0099.parquet")
    for read in (read_pyarrow, read_duckdb):
        assert violations(read(tmp_path, IMAGES, "path"), allowed)
    (partition / "part-00000-0099.parquet").unlink()
    parts[0].unlink()
    for read in (read_pyarrow, read_duckdb):
        assert violations(read(tmp_path, IMAGES, "path"), allowed)
    assert violations({}, allowed) == ["2026-11-20: 0 rows (0 keys), not one of the allowed states"]


# --- kills at every commit step ------------------------------------------------------------

def kill_held(forker, readers: Readers, tmp: Path, step: str, allowed: dict,
              held: dict[str, Counter], at_step=None, **args):
    """Start a run that dies at ``step``; while it stands there, alive, check that both readers
    see exactly ``held`` (and run ``at_step()``), then let it die. ``allowed``: the states a
    read may see before and after. Returns the killed run."""
    hold = FaultHold(tmp / f"hold-{forker.n + 1}")
    phase = f"{step} held #{forker.n + 1}"
    readers.allow(step, **allowed)
    run = forker.start("images", step, hold=hold.folder, **args)
    try:
        assert hold.wait_reached(run) == step, run.events()
        readers.allow(phase, **{day: [state] for day, state in held.items()})
        exact(readers.out, IMAGES, "path", {day.replace("_", "-"): s for day, s in held.items()})
        if at_step is not None:
            at_step()
        readers.wait_reads(phase)
        readers.allow(step, **allowed)
        hold.release()
    finally:
        hold.close(run)
    assert run.wait() == KILLED, run.events()
    return run


def test_a_kill_at_any_commit_step_leaves_the_old_or_the_new_partition_and_no_leftovers(
        images, forker, tmp_path):
    out, A, B = tmp_path / "out", images["state"]["A"], images["state"]["B"]
    x, y = str(X), str(Y)
    for day in (X, Y):
        score_image_folder(images["A"], images["model"], out, run_date=day, **RUN_OPTIONS)
    with Readers(out, IMAGES, "path") as readers:
        # 1. mid-write, with a decoding worker process alive: the lock must die with the run.
        def writing() -> None:
            assert any(p.name.endswith(".inprogress") for p in _staged_files(out))

        kill_held(forker, readers, tmp_path, "mid-write", {x: [A], y: [A]}, {x: A, y: A},
                  writing, **_image_args(images, "B", out, X) | {"workers": 1})
        exact(out, IMAGES, "path", {x: A, y: A})
        killed = _staged_files(out)
        assert any(p.name.endswith(".inprogress") for p in killed), killed

        # 2. parts complete, before the swap; this run (of another date) clears step 1's staging.
        kill_held(forker, readers, tmp_path, "before-swap", {x: [A], y: [A]}, {x: A, y: A},
                  **_image_args(images, "B", out, Y))
        exact(out, IMAGES, "path", {x: A, y: A})
        staged = _staged_files(out)
        assert not set(killed) & set(staged)
        assert {p.name for p in staged} >= {"_SUCCESS", "part-00000-0001.parquet"}, staged

        # 3. right after the swap: the new partition is there, the run has no record.
        kill_held(forker, readers, tmp_path, "after-swap", {x: [A, B], y: [A]}, {x: B, y: A},
                  **_image_args(images, "B", out, X))
        exact(out, IMAGES, "path", {x: B, y: A})
        assert not set(staged) & set(_staged_files(out))
        killed_run = _success_run_id(out, IMAGES, X)
        assert killed_run not in _records(out)
        assert current_run(out, X) is None  # the setup run's partition was replaced

        # 4. every partition committed, the record not yet written.
        kill_held(forker, readers, tmp_path, "before-record", {x: [B], y: [A, B]},
                  {x: B, y: B}, **_image_args(images, "B", out, Y))
        exact(out, IMAGES, "path", {x: B, y: B})
        assert _success_run_id(out, IMAGES, Y) not in _records(out)
        assert current_run(out, Y) is None

        # 5. a clean run: commits, writes its record, and leaves nothing in staging.
        readers.allow("clean", **{x: [B, A], y: [B]})
        run = forker.start("images", **_image_args(images, "A", out, X))
        assert run.wait() == 0, run.events()
        exact(out, IMAGES, "path", {x: A, y: B})
        readers.wait_reads("clean")
    done = run.done()
    record = current_run(out, X, [IMAGES])
    assert record and record["run_id"] == done["run_id"] == _success_run_id(out, IMAGES, X)
    assert record["partitions"] == {IMAGES: {"path": f"{IMAGES}/run_date={X}", "files": 2,
                                             "rows": 6}}
    assert record["bundle_sha256"] and record["committed_at"] >= record["started_at"]
    assert _staged_files(out) == []
    assert readers.problems == [], readers.problems[:5]
    assert {step: readers.held(step) for step in FAULT_STEPS} == dict.fromkeys(FAULT_STEPS, 1)
    print("kill steps:", readers.figures())


@pytest.mark.slow
def test_kills_at_every_step_in_a_seeded_order_leave_the_old_or_the_new_partition(
        images, forker, tmp_path):
    """Each step twice and one clean run, in an order drawn from a printed seed
    (``LENSFLOW_FAULT_SEED`` replays it): a step then meets the leftovers of any other."""
    seed = int(os.environ.get("LENSFLOW_FAULT_SEED") or time.time_ns() % 100_000)
    order: list[str | None] = [*FAULT_STEPS, *FAULT_STEPS, None]
    random.Random(seed).shuffle(order)
    out, state, x, y = tmp_path / "out", images["state"], str(X), str(Y)
    score_image_folder(images["B"], images["model"], out, run_date=X, **RUN_OPTIONS)
    score_image_folder(images["A"], images["model"], out, run_date=Y, **RUN_OPTIONS)
    visible = "A"
    with Readers(out, IMAGES, "path") as readers:
        for step in order:
            new = "B" if visible == "A" else "A"
            allowed = {x: [state["B"]], y: [state[visible], state[new]]}
            args = _image_args(images, new, out, Y)
            if step is None:
                readers.allow("clean", **allowed)
                run = forker.start("images", **args)
                assert run.wait() == 0, (seed, run.events())
                assert current_run(out, Y)["run_id"] == run.done()["run_id"], seed
                visible = new
                continue
            swapped = step in ("after-swap", "before-record")
            after = new if swapped else visible
            kill_held(forker, readers, tmp_path, step, allowed,
                      {x: state["B"], y: state[after]}, **args)
            assert read_duckdb(out, IMAGES, "path")[y] == state[after], (seed, step)
            if swapped:
                assert _success_run_id(out, IMAGES, Y) not in _records(out), (seed, step)
                assert current_run(out, Y) is None, (seed, step)
            visible = after
        readers.allow("after", **{x: [state["B"]], y: [state[visible], state["A"]]})
        last = forker.start("images", **_image_args(images, "A", out, Y))
        assert last.wait() == 0, last.events()
    assert _staged_files(out) == [], f"seed {seed}"
    assert current_run(out, Y)["run_id"] == last.done()["run_id"]
    assert readers.problems == [], (seed, readers.problems[:5])
    assert {step: readers.held(step) for step in FAULT_STEPS} == dict.fromkeys(FAULT_STEPS, 2), \
        seed
    print(f"seeded kills (seed {seed}): {order}", readers.figures())


# --- two runs of one date at once ------------------------------------------------------------

def test_a_second_run_of_a_date_fails_in_one_line_and_the_first_completes(
        images, forker, tmp_path):
    out, A, B = tmp_path / "out", images["state"]["A"], images["state"]["B"]
    score_image_folder(images["A"], images["model"], out, run_date=Z, **RUN_OPTIONS)
    gate = tmp_path / "gate"
    with Readers(out, IMAGES, "path") as readers:
        readers.allow("concurrent", **{str(Z): [A, B]})
        first = forker.start("images", gate=gate, **_image_args(images, "B", out, Z))
        first.wait_for("start")  # its partition is open and locked; it waits for the gate
        staged = sorted((out / STAGING_DIR / IMAGES / f"run_date={Z}").iterdir())
        second = forker.start("images", **_image_args(images, "A", out, Z))
        assert second.wait() == 3, second.events()
        error = [e["error"] for e in second.events() if "error" in e][0]
        assert "\n" not in error and "being written by run " in error
        assert f"pid {first.pid} " in error and IMAGES in error
        assert sorted((out / STAGING_DIR / IMAGES / f"run_date={Z}").iterdir()) == staged
        gate.touch()
        assert first.wait() == 0, first.events()
        exact(out, IMAGES, "path", {str(Z): B})
        third = forker.start("images", **_image_args(images, "A", out, Z))  # free again
        assert third.wait() == 0, third.events()
        exact(out, IMAGES, "path", {str(Z): A})
    assert readers.problems == [], readers.problems[:5]
    assert readers.reads("concurrent", "duckdb") >= 1
    assert _staged_files(out) == []
    assert current_run(out, Z)["run_id"] == third.done()["run_id"]


# --- a run of two tables is one commit -------------------------------------------------------

@pytest.fixture(scope="module")
def rec_bundle(tmp_path_factory):
    """A tiny dot-product recommender bundle with 12 users and 7 items."""
    root = tmp_path_factory.mktemp("rec")
    torch.manual_seed(0)
    model = DotProductBias(12, 7, 4, y_range=(0.5, 5.5))
    seen = root / "seen.parquet"
    pq.write_table(pa.table({"user_idx": pa.array([0], pa.int32()),
                             "item_idx": pa.array([0], pa.int32())}), seen)
    manifest = {"task": "collab", "users": list(range(100, 112)), "items": list(range(7)),
                "titles": [f"t{i}" for i in range(7)], "id_type": "int64", "y_range": [0.5, 5.5],
                "model": model.config().to_dict(), "seen": {"file": "seen.parquet"}}
    return export_bundle(model, manifest, root / "registry", "rec", pt2=False,
                         extra_files={"seen.parquet": seen}).bundle_path


@pytest.mark.slow
def test_a_run_killed_between_its_two_tables_leaves_no_record_and_a_rerun_completes(
        rec_bundle, forker, tmp_path):
    out = tmp_path / "out"
    old_users, new_users = list(range(100, 106)), list(range(104, 112))
    options = {"top_k": 2, "full_table": True, "shards": 2}
    first = score_recommendations(rec_bundle, out, run_date=X, users=old_users, **options)
    old = {TOPK_TABLE: Counter({u: 2 for u in old_users}),
           FULL_TABLE: Counter({u: 7 for u in old_users})}
    new = {TOPK_TABLE: Counter({u: 2 for u in new_users}),
           FULL_TABLE: Counter({u: 7 for u in new_users})}
    args = {"model": rec_bundle, "out": out, "run_date": X, "users": new_users, **options}
    with Readers(out, TOPK_TABLE, "user_id") as topk, Readers(out, FULL_TABLE, "user_id") as full:
        for readers in (topk, full):
            readers.allow("killed", **{str(X): [old[readers.table], new[readers.table]]})
        run = forker.start("recs", "after-swap", **args)  # after the first table's swap
        assert run.wait() == KILLED, run.events()
        exact(out, TOPK_TABLE, "user_id", {str(X): new[TOPK_TABLE]})
        exact(out, FULL_TABLE, "user_id", {str(X): old[FULL_TABLE]})
        assert _success_run_id(out, FULL_TABLE, X) == first.run_id
        assert _success_run_id(out, TOPK_TABLE, X) not in _records(out)
        assert current_run(out, X, [TOPK_TABLE, FULL_TABLE]) is None

        run = forker.start("recs", **args)
        assert run.wait() == 0, run.events()
    record = current_run(out, X, [TOPK_TABLE, FULL_TABLE])
    assert record["run_id"] == run.done()["run_id"]
    assert {t: p["rows"] for t, p in record["partitions"].items()} == {
        TOPK_TABLE: 16, FULL_TABLE: 56}
    assert {_success_run_id(out, t, X) for t in (TOPK_TABLE, FULL_TABLE)} == {record["run_id"]}
    assert _staged_files(out) == []
    for readers in (topk, full):
        assert readers.problems == [], readers.problems[:5]
        assert readers.reads("killed", "duckdb") >= 1
    print("two tables:", topk.figures(), full.figures())
