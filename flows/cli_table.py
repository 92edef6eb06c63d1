"""``lensflow table``: the history, vacuum and compaction of a ``delta`` scoring table."""

from __future__ import annotations

from datetime import date
from typing import Annotated

import typer

from flows.cli_output import PLAIN, out

table_app = typer.Typer(**PLAIN, help="Delta scoring tables: history (who wrote each date), "
                        "vacuum (delete replaced and dead runs' files), optimize (compact).")

Out = Annotated[str, typer.Argument(help="the output root (--out of the scoring run)")]
Table = Annotated[str, typer.Argument(
    help="image_predictions | recommendations_topk | recommendations_full")]


def _day(value: str | None) -> date | None:
    from scoring.errors import ScoringError

    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ScoringError(f"--run-date {value!r}: not a date (YYYY-MM-DD)") from None


@table_app.command("history")
def history_cmd(out_root: Out, table: Table,
                run_date: Annotated[str | None, typer.Option(
                    help="only the runs that wrote this date (YYYY-MM-DD)")] = None,
                limit: Annotated[int | None, typer.Option(
                    help="newest commits to read")] = None) -> None:
    """The table's commits, newest first: version, time, operation and, for a scoring run, its
    run id, date, model, bundle digest, host, rows and files."""
    from scoring.delta_maintenance import history

    for commit in history(out_root, table, limit, _day(run_date)):
        out.print(commit.line())


@table_app.command("vacuum")
def vacuum_cmd(out_root: Out, table: Table,
               retention_hours: Annotated[float, typer.Option(
                   help="keep files a version younger than this still needs (time travel) "
                   "and parts of runs younger than this")] = 168,
               dry_run: Annotated[bool, typer.Option(help="list, do not delete")] = False,
               no_live_runs: Annotated[bool, typer.Option(
                   help="allow a retention under 6 h: no run is writing and no reader reads "
                   "older versions")] = False) -> None:
    """Delete the files of replaced runs and of runs that died before their commit, once older
    than the retention."""
    from scoring.delta_maintenance import vacuum

    files = vacuum(out_root, table, retention_hours, dry_run=dry_run, allow_short=no_live_runs)
    out.print(f"{'would delete' if dry_run else 'deleted'} {len(files)} files")


@table_app.command("optimize")
def optimize_cmd(out_root: Out, table: Table,
                 run_date: Annotated[str | None, typer.Option(
                     help="compact only this date (YYYY-MM-DD)")] = None) -> None:
    """Compact a date's (or every date's) small part files into few, then write a checkpoint;
    no row changes."""
    from scoring.delta_maintenance import optimize

    metrics = optimize(out_root, table, _day(run_date))
    out.print(f"compacted {metrics.get('numFilesRemoved', 0)} files into "
              f"{metrics.get('numFilesAdded', 0)}")
