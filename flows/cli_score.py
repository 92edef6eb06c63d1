"""``lensflow score images|recommendations``: a bundle over a folder or a user table, to Parquet."""

from __future__ import annotations

from datetime import date
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from flows.cli_output import PLAIN, console, out

score_app = typer.Typer(**PLAIN, help="Score a batch to Parquet.")


class Runtime(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@score_app.command("images")
def score_images(
    folder: Path,
    model: Annotated[str, typer.Option(help="REG/NAME[/VERSION] or a bundle dir")],
    out_root: Annotated[Path, typer.Option("--out", help="output root for Parquet tables")],
    run_date: Annotated[str | None, typer.Option(help="YYYY-MM-DD (default: today, UTC)")] = None,
    batch_size: int = 64,
    workers: int | None = None,
    runtime: Runtime = Runtime.onnx,
    device: Device = Device.auto,
    top_k: int = 5,
    incremental: bool = False,
    dask_address: Annotated[str | None, typer.Option(
        envvar="LENSFLOW_DASK_ADDRESS",
        help="run the shards on this Dask scheduler, tcp://HOST:PORT (as a Prefect flow run)",
    )] = None,
    shards: Annotated[int | None, typer.Option(
        min=1, help="pieces to split the run into (default 1 here, 16 on a Dask cluster)")] = None,
) -> None:
    """Score every image under FOLDER into <out>/image_predictions/run_date=.../."""
    from scoring.image_scoring import ScoreSummary, score_image_folder

    if dask_address or shards:
        _allow_slow_ephemeral_server()
        from flows.score_flows import score_image_folder_flow

        result = _run_flow(score_image_folder_flow, str(folder), model, str(out_root),
                           run_date=_date(run_date), batch_size=batch_size, workers=workers,
                           runtime=runtime.value, device=device.value, top_k=top_k,
                           incremental=incremental, shards=shards, dask_address=dask_address)
        out.print(ScoreSummary(**result).summary_line())
        return
    summary = score_image_folder(
        folder, model, out_root, run_date=_date(run_date), batch_size=batch_size, workers=workers,
        runtime=runtime.value, device=device.value, top_k=top_k, incremental=incremental,
        progress=_score_progress())
    out.print(summary.summary_line())


@score_app.command("recommendations")
def score_recommendations_cmd(
    model: Annotated[str, typer.Option(help="REG/NAME[/VERSION] or a bundle dir")],
    out_root: Annotated[Path, typer.Option("--out", help="output root for Parquet tables")],
    top_k: int = 10,
    full_table: Annotated[bool, typer.Option(help="also write every user × item score")] = False,
    users: Annotated[Path | None, typer.Option(help="file of raw user ids, one per line")] = None,
    strict: Annotated[bool, typer.Option(help="unknown user ids are an error")] = False,
    run_date: Annotated[str | None, typer.Option(help="YYYY-MM-DD (default: today, UTC)")] = None,
    runtime: Runtime = Runtime.onnx,
    device: Device = Device.auto,
    dask_address: Annotated[str | None, typer.Option(
        envvar="LENSFLOW_DASK_ADDRESS",
        help="run the shards on this Dask scheduler, tcp://HOST:PORT (as a Prefect flow run)",
    )] = None,
    shards: Annotated[int | None, typer.Option(
        min=1, help="pieces to split the run into (default 1 here, 16 on a Dask cluster)")] = None,
) -> None:
    """Top-k per user (seen items excluded) and optionally the full user × item table."""
    from scoring.recommendations import RecScoreSummary, score_recommendations

    if dask_address or shards:
        _allow_slow_ephemeral_server()
        from flows.score_flows import score_recommendations_flow

        result = _run_flow(score_recommendations_flow, model, str(out_root), top_k=top_k,
                           full_table=full_table, users=str(users) if users else None,
                           strict=strict, run_date=_date(run_date), runtime=runtime.value,
                           device=device.value, shards=shards, dask_address=dask_address)
        out.print(RecScoreSummary(**result).summary_line())
        return
    summary = score_recommendations(
        model, out_root, top_k=top_k, full_table=full_table, users=users, strict=strict,
        run_date=_date(run_date), runtime=runtime.value, device=device.value)
    out.print(summary.summary_line())


def _allow_slow_ephemeral_server() -> None:
    """Without PREFECT_API_URL the flow starts a temporary server; Prefect's 20 s start-up
    limit is too short on a busy 2-core machine. Must run before Prefect is imported."""
    import os

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def _run_flow(flow, *args, **kwargs) -> dict:
    """Run a scoring flow (sharded, maybe on Dask); a failed run is one error line."""
    from scoring.errors import ScoringError

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
        if event.get("event") == "start":
            state["bar"] = Progress(console=console, transient=True)
            state["bar"].start()
            state["task"] = state["bar"].add_task("scoring", total=event.get("total"))
        elif event.get("event") == "advance" and "bar" in state:
            state["bar"].advance(state["task"], event.get("n", 1))
        elif event.get("event") == "end" and "bar" in state:
            state["bar"].stop()
    return show


