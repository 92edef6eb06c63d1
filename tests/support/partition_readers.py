"""The fault suite's readers: pyarrow's Hive discovery and DuckDB's glob over a local table,
polled from a thread while runs are killed, each read checked against the states allowed then.

A read that races a replacement may fail with "file not found" (a listed old part is gone); that
is counted as a retry, not a violation.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import duckdb
import pyarrow.dataset as ds

READERS = ("pyarrow", "duckdb")


def read_pyarrow(out: Path, table: str, key: str) -> dict[str, Counter]:
    """{run_date: Counter of ``key`` values} through pyarrow's Hive dataset discovery."""
    t = ds.dataset(out / table, format="parquet", partitioning="hive").to_table(
        columns=[key, "run_date"])
    return _by_date(map(str, t["run_date"].to_pylist()), t[key].to_pylist())


def read_duckdb(out: Path, table: str, key: str, con=None) -> dict[str, Counter]:
    """The same through DuckDB's glob over every partition directory."""
    sql = (f"SELECT CAST(run_date AS VARCHAR), {key} FROM "
           f"read_parquet('{out}/{table}/*/*.parquet', hive_partitioning = true)")
    try:
        rows = (con or duckdb).sql(sql).fetchall()
    except duckdb.IOException as err:
        if "No files found" in str(err):
            return {}
        raise
    return _by_date((r[0] for r in rows), (r[1] for r in rows))


def _by_date(dates, keys) -> dict[str, Counter]:
    found: dict[str, Counter] = {}
    for day, key in zip(dates, keys, strict=True):
        found.setdefault(day, Counter())[key] += 1
    return found


def _vanished(err: Exception) -> bool:
    """A read that listed a part the commit had just swapped out: retry it."""
    text = str(err)
    return isinstance(err, FileNotFoundError) or "No such file or directory" in text


def violations(seen: dict[str, Counter], allowed: dict[str, list[Counter | None]]) -> list[str]:
    """What in one read is not one of the allowed states of its date (None: no partition)."""
    problems = [f"unexpected date {day}" for day in seen if day not in allowed]
    for day, states in allowed.items():
        if seen.get(day) not in states:
            got = seen.get(day)
            problems.append(f"{day}: {sum(got.values()) if got else 0} rows "
                            f"({len(got or ())} keys), not one of the allowed states")
    return problems


class Readers:
    """A thread reading ``table`` with pyarrow and DuckDB in turn until stopped, checking each read
    against the allowed states; counts reads and retries per phase."""

    def __init__(self, out: Path, table: str, key: str):
        self.out, self.table, self.key = out, table, key
        self.allowed: dict[str, list[Counter | None]] = {}
        self.phase = "setup"
        self.counts: Counter = Counter()
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._guard = threading.Lock()
        self._read = threading.Condition()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> Readers:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def allow(self, phase: str, **states: list[Counter | None]) -> None:
        with self._guard:
            self.phase = phase
            self.allowed = {day.replace("_", "-"): list(s) for day, s in states.items()}

    def _poll(self) -> None:
        con = duckdb.connect()
        while not self._stop.is_set():
            for name, read in (("pyarrow", read_pyarrow),
                               ("duckdb", lambda o, t, k: read_duckdb(o, t, k, con))):
                with self._guard:
                    phase, allowed = self.phase, dict(self.allowed)
                try:
                    seen = read(self.out, self.table, self.key)
                except Exception as err:  # noqa: BLE001 - every failure is classified
                    kind = "retry" if _vanished(err) else "error"
                    self.counts[(phase, name, kind)] += 1
                    if kind == "error":
                        self.problems.append(f"{phase} {name}: {type(err).__name__}: {err}")
                    continue
                with self._guard:
                    if phase != self.phase:
                        continue  # the allowed states changed during the read
                self.problems += [f"{phase} {name}: {p}" for p in violations(seen, allowed)]
                with self._read:
                    self.counts[(phase, name, "read")] += 1
                    self._read.notify_all()
            time.sleep(0.05)  # leave the 2 cores to the runs

    def reads(self, phase: str, name: str) -> int:
        return self.counts[(phase, name, "read")]

    def held(self, step: str) -> int:
        """How many holds at ``step`` (phases ``<step> held #n``) both readers read during."""
        phases = {p for (p, _, kind) in self.counts if p.startswith(f"{step} held #")}
        return sum(all(self.reads(p, name) >= 1 for name in READERS) for p in phases)

    def wait_reads(self, phase: str, timeout: float = 120) -> None:
        """Until each reader has read the tables once in ``phase``."""
        with self._read:
            done = self._read.wait_for(
                lambda: all(self.reads(phase, name) >= 1 for name in READERS), timeout)
        assert done, f"no read by each reader in {phase!r}: {dict(self.counts)}"

    def figures(self) -> dict:
        return {"reads": sum(v for (_, _, k), v in self.counts.items() if k == "read"),
                "retries": sum(v for (_, _, k), v in self.counts.items() if k == "retry")}


def exact(out: Path, table: str, key: str, expected: dict[str, Counter]) -> None:
    """Both readers see exactly ``expected`` now."""
    assert read_pyarrow(out, table, key) == expected
    assert read_duckdb(out, table, key) == expected
