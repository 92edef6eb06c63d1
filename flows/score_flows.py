"""Scoring flows: an image folder, a recommender, and the nightly run that calls both.

Wiring only: the scorers (``scoring.image_scoring``, ``scoring.recommendations``) plan a run,
score its shards and commit it; these flows check inputs first, pin the model version for the
whole run, pick the partition date from the schedule, hand the scorer a ``run_shards`` that maps
one Prefect task per shard — on threads here, or on an existing Dask cluster with
``dask_address`` (see ``flows.dask_runner``) — and publish the summary and a live progress bar
as artifacts. A run with any failed shard commits nothing. The option parameters come from
``scoring.options``.
"""

from __future__ import annotations

import contextlib
from datetime import date
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect import runtime as prefect_runtime
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed, State

from export.bundle import load_bundle, resolve_bundle
from export.storage import filesystem, is_file, is_url, ref_text
from flows.artifacts import (
    ProgressArtifact,
    publish_markdown,
    publish_run_health,
    summary_markdown,
)
from flows.dask_runner import resolve_dask_address, shard_count, shard_runner
from flows.failures import user_errors_fail_the_run
from flows.option_surfaces import declared_options
from flows.params import DaskAddress, ImageJob, PathText, RecJob
from flows.run_date import scheduled_run_date
from scoring.errors import ScoringError
from scoring.image_scoring import score_image_folder
from scoring.options import ImageScoreOptions, NightlyOptions, RecScoreOptions
from scoring.recommendations import score_recommendations
from scoring.run_health.gate import DriftRefusedError


@task(name="resolve-model", cache_policy=NO_CACHE)
def resolve_model(model: str, *, want_collab: bool) -> str:
    """Fail fast on a model that is not there or is the wrong kind; pin its version."""
    path = resolve_bundle(model)
    bundle = load_bundle(path)
    if (bundle.task == "collab") != want_collab:
        wanted = "a recommender" if want_collab else "an image model"
        raise ScoringError(f"model {model}: bundle {bundle.name}/{bundle.version} is a "
                           f"{bundle.task!r} bundle, not {wanted}")
    get_run_logger().info("model %s → %s/%s (%s)", model, bundle.name, bundle.version, path)
    return str(path)


@task(name="check-image-folder", cache_policy=NO_CACHE)
def check_image_folder(folder: str) -> str:
    """Fail fast on a folder that does not exist, before a model is loaded."""
    if is_url(folder):
        fs, path = filesystem(folder)
        if not fs.isdir(path):
            raise ScoringError(f"folder {folder}: no such folder")
        return ref_text(folder)
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ScoringError(f"folder {folder}: no such directory")
    return str(path.resolve())


@contextlib.contextmanager
def health_published(out: str, day: date, *, key: str, description: str):
    """A run the breaker refuses still shows its health: publish it, then let the error end
    the flow with its one line."""
    try:
        yield
    except DriftRefusedError as refused:
        publish_run_health(out, day, refused.health.run_id, key=key, description=description)
        raise


def _publish_health(out: str, day: date, summary, *, key: str, description: str) -> None:
    if summary.health is not None:
        if summary.health_line():
            get_run_logger().info(summary.health_line())
        publish_run_health(out, day, summary.run_id, key=key, description=description)


def _run_id() -> str | None:
    run_id = prefect_runtime.flow_run.id
    return str(run_id) if run_id else None


@flow(name="score-image-folder")
@declared_options(options=ImageScoreOptions)
@user_errors_fail_the_run
def score_image_folder_flow(folder: PathText, model: PathText, out: PathText,
                            run_date: date | None = None, dask_address: DaskAddress | None = None,
                            *, options: ImageScoreOptions) -> dict | State:
    """Score every image under ``folder`` with ``model`` into ``<out>/image_predictions/``.

    ``model`` is ``REG/NAME`` (its promoted version), ``REG/NAME/VERSION`` or a bundle dir;
    ``run_date`` defaults to the date the run was scheduled for. ``dask_address``
    (``tcp://HOST:PORT``, default ``$LENSFLOW_DASK_ADDRESS``) runs the ``shards`` (default 1
    here, 16 on a cluster) on that Dask cluster; folder, model and out must be on storage every
    worker sees at the same path, or URLs (``s3://...``: credentials from the workers'
    environment, never from parameters).
    """
    address = resolve_dask_address(dask_address)
    folder_path = check_image_folder(folder)
    bundle = resolve_model(model, want_collab=False)
    day = run_date or scheduled_run_date()
    progress = ProgressArtifact(key="score-image-folder-progress",
                                description=f"images scored in {folder}")
    health_artifact = {"key": "score-image-folder-health",
                       "description": f"run health of {folder} for {day}"}
    with health_published(out, day, **health_artifact):
        summary = score_image_folder(
            folder_path, bundle, out, options.updated(shards=shard_count(options.shards, address)),
            run_date=day, run_id=_run_id(), progress=progress, run_shards=shard_runner(address))
    get_run_logger().info(summary.summary_line())
    _publish_health(out, day, summary, **health_artifact)
    publish_markdown(summary_markdown("Image scoring", summary.to_dict(), summary.summary_line()),
                     key="score-image-folder-summary",
                     description=f"scoring summary of {folder} for {day}")
    return summary.to_dict()


@task(name="check-users-file", cache_policy=NO_CACHE)
def check_users_file(users: str | list | None) -> str | list | None:
    """Fail fast on a users file that is not there, before a model is loaded."""
    if isinstance(users, str) and not (is_file(users) if is_url(users)
                                       else Path(users).expanduser().is_file()):
        raise ScoringError(f"users {users}: no such file")
    return users


@flow(name="score-recommendations")
@declared_options(options=RecScoreOptions)
@user_errors_fail_the_run
def score_recommendations_flow(model: PathText, out: PathText, run_date: date | None = None,
                               dask_address: DaskAddress | None = None, *,
                               options: RecScoreOptions) -> dict | State:
    """Top-k items per user (seen items left out) into ``<out>/recommendations_topk/``, and with
    ``full_table`` every user × item score into ``<out>/recommendations_full/`` (``top_k`` 0
    with ``full_table`` writes only the full table).

    ``users`` is a file of raw user ids, one per line (default: every user the model knows).
    ``dask_address`` (default ``$LENSFLOW_DASK_ADDRESS``) runs the ``shards`` (blocks of users;
    default 1 here, 16 on a cluster) on that Dask cluster.
    """
    address = resolve_dask_address(dask_address)
    bundle = resolve_model(model, want_collab=True)
    check_users_file(options.users)
    day = run_date or scheduled_run_date()
    progress = ProgressArtifact(key="score-recommendations-progress", description="users scored")
    health_artifact = {"key": "score-recommendations-health",
                       "description": f"run health of {model} for {day}"}
    with health_published(out, day, **health_artifact):
        summary = score_recommendations(
            bundle, out, options.updated(shards=shard_count(options.shards, address)),
            run_date=day, run_id=_run_id(), progress=progress, run_shards=shard_runner(address))
    get_run_logger().info(summary.summary_line())
    _publish_health(out, day, summary, **health_artifact)
    publish_markdown(
        summary_markdown("Recommendation scoring", summary.to_dict(), summary.summary_line()),
        key="score-recommendations-summary", description=f"recommendations of {model} for {day}")
    return summary.to_dict()


def _check_distinct_outputs(jobs: list, out: str, kind: str) -> None:
    """Two jobs of one kind with one output root would replace each other's partition."""
    seen: dict[str | Path, int] = {}
    for i, job in enumerate(jobs):
        root = job.out or out
        root = ref_text(root) if is_url(root) else Path(root).expanduser().resolve()
        if root in seen:
            raise ScoringError(f"{kind}[{i}] and {kind}[{seen[root]}] both write under {root}; "
                               f"give one of them its own 'out'")
        seen[root] = i


@flow(name="nightly")
@declared_options(options=NightlyOptions)
@user_errors_fail_the_run
def nightly_flow(
    out: PathText,
    image_jobs: list[ImageJob] | None = None,
    rec_jobs: list[RecJob] | None = None,
    run_date: date | None = None,
    dask_address: DaskAddress | None = None,
    *,
    options: NightlyOptions,
) -> dict | State:
    """Score every image job and recommender job for one date, each as a subflow.

    A failing job does not stop the others; the run fails at the end, naming every failed job.
    ``dask_address`` (default ``$LENSFLOW_DASK_ADDRESS``) runs every job's shards on that
    Dask cluster.
    """
    image_jobs, rec_jobs = image_jobs or [], rec_jobs or []
    if not image_jobs and not rec_jobs:
        raise ScoringError("nightly: image_jobs and rec_jobs are both empty; nothing to score")
    _check_distinct_outputs(image_jobs, out, "image_jobs")
    _check_distinct_outputs(rec_jobs, out, "rec_jobs")
    day = run_date or scheduled_run_date()
    get_run_logger().info("nightly run for %s: %d image jobs, %d recommender jobs", day,
                          len(image_jobs), len(rec_jobs))
    outcomes = []
    for job in image_jobs:
        state = score_image_folder_flow(job.folder, job.model, job.out or out, run_date=day,
                                        **options.model_dump(), shards=job.shards,
                                        dask_address=dask_address, return_state=True)
        outcomes.append({"job": f"images {job.folder}", "model": job.model, "state": state})
    for job in rec_jobs:
        state = score_recommendations_flow(job.model, job.out or out, top_k=job.top_k,
                                           full_table=job.full_table, run_date=day,
                                           **options.model_dump(), shards=job.shards,
                                           dask_address=dask_address, return_state=True)
        outcomes.append({"job": "recommendations", "model": job.model, "state": state})
    return _nightly_outcome(outcomes, day)


def _nightly_outcome(outcomes: list[dict], day: date) -> dict | State:
    rows = [{"job": o["job"], "model": o["model"], "state": o["state"].name,
             "message": o["state"].message or "",
             "flow_run_id": str(o["state"].state_details.flow_run_id)} for o in outcomes]
    lines = "\n".join(f"| {r['job']} | {r['model']} | {r['state']} | {r['flow_run_id']} | "
                      f"{r['message']} |" for r in rows)
    publish_markdown(f"## Nightly {day}\n\n| job | model | state | run | message |\n"
                     f"| --- | --- | --- | --- | --- |\n{lines}\n",
                     key="nightly-summary", description=f"nightly jobs for {day}")
    failed = [r for r in rows if r["state"] != "Completed"]
    if failed:
        detail = "; ".join(f"{r['job']} ({r['model']}): {r['message']}" for r in failed)
        return Failed(message=f"{len(failed)} of {len(rows)} nightly jobs failed: {detail}")
    return {"run_date": day.isoformat(), "jobs": rows}
