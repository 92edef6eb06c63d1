"""The ``run_health`` table: one row per run and measure, through the scoring tables' writer.

``<out>/run_health/run_date=D/`` holds every run of that date, of every table (column
``table``), refused runs included: a run that writes health rows opens the date's partition
(its lock makes it the only writer), copies the rows already committed there, appends its own
and commits the partition whole, like any scoring table (:mod:`scoring.partition`).

Row kinds: ``distribution`` (PSI, JS, p against the baseline, flagged, and the shares of the
bins a report draws), ``figure`` (one number and its baseline value) and one ``run`` row (the
decision; ``value`` = distributions flagged).
"""

from __future__ import annotations

import time
from datetime import date, datetime, timezone
from pathlib import Path

import pyarrow as pa

from scoring.errors import PartitionError
from scoring.options import RuntimeOptions
from scoring.partition import (
    PendingPartition,
    abort_partition,
    commit_partition,
    committed_part_files,
    open_partition,
    read_partition,
)

HEALTH_TABLE = "run_health"
#: Seconds a run waits for another table's run of the same date to finish its run_health rows.
LOCK_WAIT_S = 10.0
#: How scoring.staging ends the message of a partition another live run holds.
_HELD = "not starting a second writer"
_PARQUET = RuntimeOptions(table_format="parquet")
_SHARES = pa.list_(pa.float64())
RUN_HEALTH_SCHEMA = pa.schema([
    pa.field("table", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("decision", pa.string(), nullable=False),
    pa.field("on_drift", pa.string(), nullable=False),
    pa.field("baseline_runs", pa.int32(), nullable=False),
    pa.field("measure", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("n", pa.int64()),
    pa.field("baseline_n", pa.int64()),
    pa.field("psi", pa.float64()),
    pa.field("js", pa.float64()),
    pa.field("p_value", pa.float64()),
    pa.field("flagged", pa.bool_()),
    pa.field("value", pa.float64()),
    pa.field("baseline_value", pa.float64()),
    pa.field("bins", pa.list_(pa.string())),
    pa.field("today", _SHARES),
    pa.field("baseline", _SHARES),
    pa.field("recorded_at", pa.timestamp("us", tz="UTC"), nullable=False),
])


def health_rows(health) -> pa.Table:
    """The rows of one run's :class:`scoring.run_health.gate.RunHealth`."""
    common = {"table": health.table, "run_id": health.run_id, "model": health.model,
              "decision": health.decision, "on_drift": health.on_drift,
              "baseline_runs": len(health.baseline_runs),
              "recorded_at": datetime.now(timezone.utc)}
    rows = [common | {"measure": "decision", "kind": "run",
                      "value": float(len(health.flagged))}]
    drift = {d.measure: d for d in health.drift}
    for dist in health.profile.distributions:
        d = drift.get(dist.name)
        rows.append(common | {"measure": dist.name, "kind": "distribution", "n": dist.total}
                    | (_drift_columns(d) if d is not None else _today_only(dist)))
    for name, value, baseline in health.figures:
        rows.append(common | {"measure": name, "kind": "figure", "value": value,
                              "baseline_value": baseline})
    columns = {f.name: [row.get(f.name) for row in rows] for f in RUN_HEALTH_SCHEMA}
    return pa.Table.from_pydict(columns, schema=RUN_HEALTH_SCHEMA)


def _drift_columns(d) -> dict:
    return {"baseline_n": d.baseline_n, "psi": d.psi, "js": d.js, "p_value": d.p_value,
            "flagged": d.flagged, "bins": list(d.bins), "today": list(d.today),
            "baseline": list(d.baseline)}


def _today_only(dist) -> dict:
    from scoring.run_health.drift import SHOWN_BINS

    order = sorted(range(len(dist.counts)), key=lambda i: -dist.counts[i])[:SHOWN_BINS]
    shown = sorted(i for i in order if dist.counts[i])
    return {"bins": [dist.labels[i] for i in shown],
            "today": [dist.counts[i] / dist.total for i in shown] if dist.total else []}


def write_health(health, like: PendingPartition) -> None:
    """Commit the run's rows into ``run_health`` of its date, beside the rows already there.

    like: a pending partition of the run (its output root, date, run id and model metadata).
    """
    meta = {k.decode().removeprefix("lensflow."): v.decode()
            for k, v in (like.schema.metadata or {}).items()
            if k.decode() in ("lensflow.model_name", "lensflow.model_version",
                              "lensflow.bundle_sha256")}
    pending = _open_when_free(like, meta)
    try:
        earlier = read_health(like.out, like.run_date)
        with pending.part_writer(0) as writer:
            if earlier.num_rows:
                writer.write(earlier)
            writer.write(health_rows(health))
        commit_partition(pending, expected_shards=[0])
    except BaseException:
        abort_partition(pending)
        raise


def _open_when_free(like: PendingPartition, meta: dict[str, str]) -> PendingPartition:
    """The date's ``run_health`` partition, opened once no other table's run of the date is
    writing its rows (each holds it for a few tens of ms); at most LOCK_WAIT_S."""
    deadline = time.monotonic() + LOCK_WAIT_S
    wait = 0.02
    while True:
        try:
            # Plain Parquet whatever the run's format: a small table read whole, every table's.
            return open_partition(like.out, HEALTH_TABLE, like.run_date, RUN_HEALTH_SCHEMA, meta,
                                  run_id=like.run_id, options=_PARQUET)
        except PartitionError as err:
            if not str(err).endswith(_HELD) or time.monotonic() + wait > deadline:
                raise
        time.sleep(wait)
        wait = min(wait * 2, 1.0)


def read_health(out: str | Path, run_date: date) -> pa.Table:
    """Every ``run_health`` row of ``run_date`` (none yet: an empty table)."""
    name = f"run_date={run_date.isoformat()}"
    if not any(day == name for day, _ in committed_part_files(out, HEALTH_TABLE)):
        return RUN_HEALTH_SCHEMA.empty_table()
    try:
        return read_partition(out, HEALTH_TABLE, run_date).select(
            RUN_HEALTH_SCHEMA.names).cast(RUN_HEALTH_SCHEMA)
    except (OSError, pa.ArrowInvalid) as err:
        raise PartitionError(f"{out}/{HEALTH_TABLE}/{name}: cannot read ({err})") from None
