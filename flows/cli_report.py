"""``lensflow report OUT --table T --date D``: a scoring run's health in the terminal.

Reads the ``run_health`` table (``scoring.run_health.table``) and prints what the Prefect
artifact shows: the breaker's decision, the figures, and today-vs-baseline bars per distribution.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated

import typer

from flows.cli_output import out


def report_cmd(
    out_root: Annotated[str, typer.Argument(help="output root of the scoring runs (a path or "
                                                 "a URL such as s3://bucket/scores)")],
    table: Annotated[str, typer.Option(help="image_predictions, recommendations_topk, ...")],
    run_date: Annotated[str, typer.Option("--date", help="YYYY-MM-DD")],
    every_run: Annotated[bool, typer.Option("--all", help="every run of that date, not only "
                                                          "the latest")] = False,
) -> None:
    """Print the run health of TABLE's run(s) on DATE: decision, figures, bars vs baseline."""
    from scoring.errors import ScoringError
    from scoring.run_health.render import health_text, reports_from_rows
    from scoring.run_health.table import read_health

    try:
        day = date.fromisoformat(run_date)
    except ValueError:
        raise typer.BadParameter(f"--date must be YYYY-MM-DD, got {run_date!r}") from None
    rows = read_health(out_root, day)
    reports = [r for r in reports_from_rows(rows) if r["table"] == table]
    if not reports:
        tables = sorted({r["table"] for r in reports_from_rows(rows)})
        known = f" (it has {', '.join(tables)})" if tables else ""
        raise ScoringError(f"{out_root}: no run health for table {table} on {day}{known}")
    for report in reports if every_run else reports[-1:]:
        out.print(health_text(report), markup=False, highlight=False, soft_wrap=True)
