"""The `lensflow` console entry run in-process, and the one-line error a user must get."""

from __future__ import annotations

import sys


def lensflow(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run the console entry in-process: (exit code, stdout, stderr)."""
    from flows.cli import main

    monkeypatch.setattr(sys, "argv", ["lensflow", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line(err: str, *needles: str) -> None:
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
