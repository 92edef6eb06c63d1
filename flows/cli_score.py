"""``lensflow score images|recommendations``: a bundle over a folder or a user table, to Parquet.

The option flags come from ``scoring.options``. Without ``--dask-address`` the run is the
scorer's own plan → shards → commit in this process (no Prefect); with one it is the Prefect flow,
its shards on that Dask cluster.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated

import typer

from flows.cli_output import PLAIN, console, out
from flows.option_surfaces import declared_options
from scoring.options import ImageScoreOptions, RecScoreOptions

score_app = typer.Typer(**PLAIN, help="Score a batch to Parquet.")

Model = Annotated[str, typer.Option(help="REG/NAME[/VERSION] or a bundle dir (a path or a URL "
                                         "such as s3://bucket/registry/NAME)")]
OutRoot = Annotated[str, typer.Option("--out", help="output root for Parquet tables (a path or a "
                                                    "URL such as s3://bucket/scores)")]
Folder = Annotated[str, typer.Argument(help="folder of images (a path or a URL such as "
                                            "s3://bucket/photos)")]
RunDate = Annotated[str | None, typer.Option(help="YYYY-MM-DD (default: today, UTC)")]
DaskAddress = Annotated[str | None, typer.Option(
    envvar="LENSFLOW_DASK_ADDRESS",
    help="run the shards on this Dask scheduler, tcp://HOST:PORT (as a Prefect flow run)")]


@score_app.command("images")
@declared_options(cli=True, options=ImageScoreOptions)
def score_images(folder: Folder, model: Model, out_root: OutRoot, run_date: RunDate = None,
                 dask_address: DaskAddress = None, *, options: ImageScoreOptions) -> None:
    """Score every image under FOLDER into <out>/image_predictions/run_date=.../."""
    from scoring.image_scoring import ScoreSummary, score_image_folder

    day = _date(run_date)
    if dask_address:
        result = _run_flow("score_image_folder_flow", folder, model, out_root,
                           run_date=day, dask_address=dask_address, **options.model_dump())
        _print_summary(ScoreSummary(**result))
        return
    _print_summary(score_image_folder(folder, model, out_root, options, run_date=day,
                                      progress=_score_progress()))


@score_app.command("recommendations")
@declared_options(cli=True, options=RecScoreOptions)
def score_recommendations_cmd(model: Model, out_root: OutRoot, run_date: RunDate = None,
                              dask_address: DaskAddress = None, *,
                              options: RecScoreOptions) -> None:
    """Top-k per user (seen items excluded) and optionally the full user × item table."""
    from scoring.recommendations import RecScoreSummary, score_recommendations

    day = _date(run_date)
    if dask_address:
        result = _run_flow("score_recommendations_flow", model, out_root, run_date=day,
                           dask_address=dask_address, **options.model_dump())
        _print_summary(RecScoreSummary(**result))
        return
    _print_summary(score_recommendations(model, out_root, options, run_date=day,
                                         progress=_score_progress()))


def _print_summary(summary) -> None:
    """The run's summary line, then its health line (a warned run says so here)."""
    out.print(summary.summary_line())
    if summary.health_line():
        out.print(summary.health_line())


def _run_flow(name: str, *args, **kwargs) -> dict:
    """Run the scoring flow ``name`` (its shards on Dask); a failed run is one error line.

    Without PREFECT_API_URL the flow starts a temporary server; Prefect's 20 s start-up limit is
    too short on a busy 2-core machine, hence the longer one, set before Prefect is imported.
    """
    import os

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from flows import score_flows
    from scoring.errors import ScoringError

    flow = getattr(score_flows, name)
    state = flow(*args, **kwargs, return_state=True)
    if not state.is_completed():
        raise ScoringError(state.message or f"{flow.name} ended {state.name}")
    return state.result()


def _date(value: str | None) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"--run-date must be YYYY-MM-DD, got {value!r}") from None


def _score_progress():
    from rich.progress import Progress

    state: dict = {}

    def show(event: dict) -> None:
        if not console.is_terminal:  # a log file or a pipe gets the summary line only
            return
        if event.get("event") == "start":
            state["bar"] = Progress(console=console, transient=True)
            state["bar"].start()
            state["task"] = state["bar"].add_task("scoring", total=event.get("total"))
        elif event.get("event") == "advance" and "bar" in state:
            state["bar"].advance(state["task"], event.get("n", 1))
        elif event.get("event") == "end" and "bar" in state:
            state["bar"].stop()
    return show
