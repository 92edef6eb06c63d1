"""A process that imports the scorers once and forks a real scoring run per request (fault suite).

Importing torch, torchvision and ONNX Runtime takes 10–25 s on a busy 2-core machine; the fault
suite needs a dozen separate scoring processes it can SIGKILL, so this helper pays the imports once
and forks each run from a still single-threaded process. Each run is an ordinary process running
:func:`scoring.image_scoring.score_image_folder` or
:func:`scoring.recommendations.score_recommendations` with the ``env`` it is given (for instance
``LENSFLOW_FAULT_AT``).

Protocol: one JSON object per line on stdin, one answer per line on stdout.

- ``{"op": "run", "kind": "images"|"recs", "args": {...}, "env": {...}, "log": PATH,
  "gate": PATH|null}`` → ``{"pid": N}``. The run writes JSON lines to ``log``: each progress event,
  then ``{"done": summary}``, or ``{"error": line}`` for a :class:`ScoringError` (exit 3). With a
  ``gate`` the run waits, after its ``start`` event (its partitions open and locked), until that
  file exists.
- ``{"op": "wait", "pid": N}`` → ``{"pid": N, "returncode": rc}`` (``-9`` for SIGKILL).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from datetime import date

import scoring.image_scoring as image_scoring
import scoring.recommendations as recommendations
from scoring.errors import ScoringError


def _run(request: dict) -> int:
    """In the forked child: the scoring run; its exit status."""
    os.environ.update(request.get("env") or {})
    log = open(request["log"], "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    gate = request.get("gate")

    def progress(event: dict) -> None:
        log.write(json.dumps(event) + "\n")
        if gate and event.get("event") == "start":
            while not os.path.exists(gate):
                time.sleep(0.01)

    args = dict(request["args"])
    args["run_date"] = date.fromisoformat(args["run_date"])
    try:
        if request["kind"] == "images":
            summary = image_scoring.score_image_folder(progress=progress, **args)
        else:
            summary = recommendations.score_recommendations(progress=progress, **args)
    except ScoringError as err:
        log.write(json.dumps({"error": str(err)}) + "\n")
        return 3
    except BaseException:
        log.write(json.dumps({"traceback": traceback.format_exc()}) + "\n")
        return 1
    log.write(json.dumps({"done": summary.to_dict()}) + "\n")
    return 0


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "run":
            pid = os.fork()
            if pid == 0:
                devnull = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(devnull, fd)
                os._exit(_run(request))
            answer = {"pid": pid}
        else:
            _, status = os.waitpid(request["pid"], 0)
            answer = {"pid": request["pid"], "returncode": os.waitstatus_to_exitcode(status)}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
