"""Real scoring runs forked from one process that imported the scorers once
(``scoring_forker.py``), which a test can gate, wait for and SIGKILL (the fault suites)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from paths import REPO

from scoring.fault_hook import FAULT_ENV, HOLD_ENV

FORKER = REPO / "tests" / "support" / "scoring_forker.py"


class Forker:
    def __init__(self, tmp: Path):
        env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), str(FORKER.parent)])}
        self.proc = subprocess.Popen([sys.executable, str(FORKER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.tmp, self.n = tmp, 0

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, kind: str, fault: str | None = None, gate: Path | None = None,
              hold: Path | None = None, **args) -> Run:
        """hold: a folder with a ``release`` FIFO: the run waits, alive, at its fault step
        (``scoring/fault_hook.py``)."""
        self.n += 1
        log = self.tmp / f"run-{self.n}.log"
        args = {k: str(v) if isinstance(v, (Path, date)) else v for k, v in args.items()}
        env = ({FAULT_ENV: fault} if fault else {}) | ({HOLD_ENV: str(hold)} if hold else {})
        pid = self._ask({"op": "run", "kind": kind, "args": args, "log": str(log),
                         "env": env,
                         "gate": str(gate) if gate else None})["pid"]
        return Run(self, pid, log, time.monotonic())

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Run:
    def __init__(self, forker: Forker, pid: int, log: Path, started: float):
        self.forker, self.pid, self.log, self.started = forker, pid, log, started
        self.seconds = 0.0

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] \
            if self.log.exists() else []

    def wait_for(self, event: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("event") == event for e in self.events()):
            assert time.monotonic() < deadline, f"no {event!r} from run {self.pid}: {self.events()}"
            assert self._alive(), f"run {self.pid} ended before {event!r}: {self.events()}"
            time.sleep(0.02)

    def wait(self, timeout: float = 180) -> int:
        deadline = time.monotonic() + timeout
        while self._alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._alive():
            os.kill(self.pid, signal.SIGKILL)
        rc = self.forker._ask({"op": "wait", "pid": self.pid})["returncode"]
        self.seconds = time.monotonic() - self.started
        assert time.monotonic() < deadline, f"run {self.pid} hung: {self.events()}"
        return rc

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def done(self) -> dict:
        found = [e["done"] for e in self.events() if "done" in e]
        assert found, f"run {self.pid} did not finish: {self.events()}"
        return found[0]

    def alive(self) -> bool:
        return self._alive()

    def _alive(self) -> bool:
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
