"""Scoring flows: an image folder, a recommender, and the nightly run that calls both.

Wiring only: ``scoring.sharded_runs`` plans a run (files or users cut into shards, the pending
partition opened), ``scoring.shards`` scores one shard into its parts, and the plan is committed
once every shard is in. These flows check inputs first, pin the model version for the whole run,
pick the partition date from the schedule, map one task per shard — on threads here, or on an
existing Dask cluster with ``dask_address`` (see ``flows.dask_runner``) — and publish the summary
and a live progress bar as artifacts. A run with any failed shard commits nothing.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect import runtime as prefect_runtime
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed, State

from export.bundle import load_bundle, resolve_bundle
from flows.artifacts import ProgressArtifact, publish_markdown, summary_markdown
from flows.dask_runner import resolve_dask_address, run_shards, shard_count
from flows.failures import (
    STORAGE_RETRY_DELAYS,
    USER_ERRORS,
    retry_on_storage_error,
    user_failure,
)
from flows.params import (
    DaskAddress,
    Device,
    ImageJob,
    NonNegativeInt,
    PathText,
    PositiveInt,
    RecJob,
    Runtime,
)
from flows.run_date import scheduled_run_date
from scoring.errors import ScoringError
from scoring.sharded_runs import (
    ImageRunPlan,
    RecRunPlan,
    abort_run,
    finish_image_run,
    finish_rec_run,
    plan_image_run,
    plan_rec_run,
)
from scoring.shards import (
    ImageShardJob,
    ShardResult,
    UserShardJob,
    score_image_shard,
    score_user_shard,
)

#: Shard tasks retry storage errors; Dask itself reruns a shard whose worker died.
_SHARD_RETRIES = {"retries": len(STORAGE_RETRY_DELAYS), "retry_delay_seconds": STORAGE_RETRY_DELAYS,
                  "retry_condition_fn": retry_on_storage_error}


@task(name="resolve-model", cache_policy=NO_CACHE)
def resolve_model(model: str, *, want_collab: bool) -> str:
    """Fail fast on a model that is not there or is the wrong kind; pin its version."""
    path = resolve_bundle(model)
    bundle = load_bundle(path, verify=False)  # the scorer verifies every hash when it loads
    if (bundle.task == "collab") != want_collab:
        wanted = "a recommender" if want_collab else "an image model"
        raise ScoringError(f"model {model}: bundle {bundle.name}/{bundle.version} is a "
                           f"{bundle.task!r} bundle, not {wanted}")
    get_run_logger().info("model %s → %s/%s (%s)", model, bundle.name, bundle.version, path)
    return str(path)


@task(name="check-image-folder", cache_policy=NO_CACHE)
def check_image_folder(folder: str) -> str:
    """Fail fast on a folder that does not exist, before a model is loaded."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ScoringError(f"folder {folder}: no such directory")
    return str(path.resolve())


def _run_id() -> str | None:
    run_id = prefect_runtime.flow_run.id
    return str(run_id) if run_id else None


@task(name="plan-image-shards", cache_policy=NO_CACHE)
def plan_images_task(folder: str, bundle: str, out: str, run_date: date, options: dict,
                     shards: int, run_id: str | None) -> ImageRunPlan:
    """List the files, cut them into shards, open the partition's temporary directory."""
    plan = plan_image_run(folder, bundle, out, shards=shards, run_date=run_date, run_id=run_id,
                          **options)
    get_run_logger().info("%d images to score in %d shards (%d skipped as already scored)",
                          plan.to_score, len(plan.jobs), plan.skipped_incremental)
    return plan


@task(name="score-image-shard", task_run_name="score-image-shard-{job.shard}",
      cache_policy=NO_CACHE, **_SHARD_RETRIES)
def score_image_shard_task(job: ImageShardJob, progress=None) -> ShardResult:
    """Score one shard's files into its parts of the pending partition."""
    return score_image_shard(job, progress)


@task(name="commit-image-partition", cache_policy=NO_CACHE)
def commit_images_task(plan: ImageRunPlan, results: list[ShardResult]):
    """Commit ``<out>/image_predictions/run_date=.../`` once every shard is in."""
    summary = finish_image_run(plan, results)
    get_run_logger().info(summary.summary_line())
    return summary


def _score_shards(plan: ImageRunPlan | RecRunPlan, shard_task, commit_task, address: str | None,
                  progress: ProgressArtifact):
    """Run every shard, then commit; any failure drops what the shards wrote."""
    progress({"event": "start", "total": plan.to_score})
    try:
        results = run_shards(shard_task, plan.jobs, address, progress)
        summary = commit_task(plan, results)
    except BaseException:
        abort_run(plan)
        raise
    progress({"event": "end"})
    return summary


@flow(name="score-image-folder")
def score_image_folder_flow(
    folder: PathText,
    model: PathText,
    out: PathText,
    run_date: date | None = None,
    batch_size: PositiveInt = 64,
    workers: NonNegativeInt | None = None,
    runtime: Runtime = "onnx",
    device: Device = "auto",
    top_k: PositiveInt = 5,
    incremental: bool = False,
    shards: PositiveInt | None = None,
    dask_address: DaskAddress | None = None,
) -> dict | State:
    """Score every image under ``folder`` with ``model`` into ``<out>/image_predictions/``.

    ``model`` is ``REG/NAME`` (its promoted version), ``REG/NAME/VERSION`` or a bundle dir;
    ``run_date`` defaults to the date the run was scheduled for. ``dask_address``
    (``tcp://HOST:PORT``, default ``$LENSFLOW_DASK_ADDRESS``) runs the ``shards`` (default 1
    here, 16 on a cluster) on that Dask cluster; folder, model and out must be on storage every
    worker sees at the same path.
    """
    try:
        address = resolve_dask_address(dask_address)
        folder_path = check_image_folder(folder)
        bundle = resolve_model(model, want_collab=False)
        day = run_date or scheduled_run_date()
        options = {"batch_size": batch_size, "workers": workers, "runtime": runtime,
                   "device": device, "top_k": top_k, "incremental": incremental}
        plan = plan_images_task(folder_path, bundle, out, day, options,
                                shard_count(shards, address), _run_id())
        progress = ProgressArtifact(key="score-image-folder-progress",
                                    description=f"images scored in {folder}")
        summary = _score_shards(plan, score_image_shard_task, commit_images_task, address,
                                progress)
    except USER_ERRORS as err:
        get_run_logger().error(str(err))
        return user_failure(err)
    publish_markdown(summary_markdown("Image scoring", summary.to_dict(), summary.summary_line()),
                     key="score-image-folder-summary",
                     description=f"scoring summary of {folder} for {day}")
    return summary.to_dict()


@task(name="check-users-file", cache_policy=NO_CACHE)
def check_users_file(users: str | None) -> str | None:
    if users is not None and not Path(users).expanduser().is_file():
        raise ScoringError(f"users {users}: no such file")
    return users


@task(name="plan-user-shards", cache_policy=NO_CACHE)
def plan_recommendations_task(bundle: str, out: str, run_date: date, options: dict,
                              shards: int, run_id: str | None) -> RecRunPlan:
    """Choose the users, cut them into blocks, open the partitions' temporary directories."""
    plan = plan_rec_run(bundle, out, shards=shards, run_date=run_date, run_id=run_id, **options)
    get_run_logger().info("%d users to score in %d shards (%d unknown ids skipped)",
                          plan.to_score, len(plan.jobs), plan.unknown_users)
    return plan


@task(name="score-user-shard", task_run_name="score-user-shard-{job.shard}",
      cache_policy=NO_CACHE, **_SHARD_RETRIES)
def score_user_shard_task(job: UserShardJob, progress=None) -> ShardResult:
    """Score one block of users into its parts of the pending partition(s)."""
    return score_user_shard(job, progress)


@task(name="commit-recommendation-partitions", cache_policy=NO_CACHE)
def commit_recommendations_task(plan: RecRunPlan, results: list[ShardResult]):
    """Commit the top-k (and full-table) partition once every shard is in."""
    summary = finish_rec_run(plan, results)
    get_run_logger().info(summary.summary_line())
    return summary


@flow(name="score-recommendations")
def score_recommendations_flow(
    model: PathText,
    out: PathText,
    top_k: NonNegativeInt = 10,
    full_table: bool = False,
    users: str | None = None,
    strict: bool = False,
    run_date: date | None = None,
    runtime: Runtime = "onnx",
    device: Device = "auto",
    block_size: PositiveInt = 1024,
    shards: PositiveInt | None = None,
    dask_address: DaskAddress | None = None,
) -> dict | State:
    """Top-k items per user (seen items left out) into ``<out>/recommendations_topk/``, and with
    ``full_table`` every user × item score into ``<out>/recommendations_full/`` (``top_k`` 0
    with ``full_table`` writes only the full table).

    ``users`` is a file of raw user ids, one per line (default: every user the model knows).
    ``dask_address`` (default ``$LENSFLOW_DASK_ADDRESS``) runs the ``shards`` (blocks of users;
    default 1 here, 16 on a cluster) on that Dask cluster.
    """
    try:
        address = resolve_dask_address(dask_address)
        bundle = resolve_model(model, want_collab=True)
        users = check_users_file(users)
        day = run_date or scheduled_run_date()
        options = {"top_k": top_k, "full_table": full_table, "users": users, "strict": strict,
                   "runtime": runtime, "device": device, "block_size": block_size}
        plan = plan_recommendations_task(bundle, out, day, options,
                                         shard_count(shards, address), _run_id())
        progress = ProgressArtifact(key="score-recommendations-progress",
                                    description="users scored")
        summary = _score_shards(plan, score_user_shard_task, commit_recommendations_task,
                                address, progress)
    except USER_ERRORS as err:
        get_run_logger().error(str(err))
        return user_failure(err)
    publish_markdown(
        summary_markdown("Recommendation scoring", summary.to_dict(), summary.summary_line()),
        key="score-recommendations-summary", description=f"recommendations of {model} for {day}")
    return summary.to_dict()


def _check_distinct_outputs(jobs: list, out: str, kind: str) -> None:
    """Two jobs of one kind with one output root would replace each other's partition."""
    seen: dict[Path, int] = {}
    for i, job in enumerate(jobs):
        root = Path(job.out or out).expanduser().resolve()
        if root in seen:
            raise ScoringError(f"{kind}[{i}] and {kind}[{seen[root]}] both write under {root}; "
                               f"give one of them its own 'out'")
        seen[root] = i


@flow(name="nightly")
def nightly_flow(
    out: PathText,
    image_jobs: list[ImageJob] | None = None,
    rec_jobs: list[RecJob] | None = None,
    run_date: date | None = None,
    runtime: Runtime = "onnx",
    device: Device = "auto",
    dask_address: DaskAddress | None = None,
) -> dict | State:
    """Score every image job and recommender job for one date, each as a subflow.

    A failing job does not stop the others; the run fails at the end, naming every failed job.
    ``dask_address`` (default ``$LENSFLOW_DASK_ADDRESS``) runs every job's shards on that
    Dask cluster.
    """
    image_jobs, rec_jobs = image_jobs or [], rec_jobs or []
    try:
        if not image_jobs and not rec_jobs:
            raise ScoringError("nightly: image_jobs and rec_jobs are both empty; nothing to score")
        _check_distinct_outputs(image_jobs, out, "image_jobs")
        _check_distinct_outputs(rec_jobs, out, "rec_jobs")
    except USER_ERRORS as err:
        return user_failure(err)
    day = run_date or scheduled_run_date()
    get_run_logger().info("nightly run for %s: %d image jobs, %d recommender jobs", day,
                          len(image_jobs), len(rec_jobs))
    outcomes = []
    for job in image_jobs:
        state = score_image_folder_flow(job.folder, job.model, job.out or out, run_date=day,
                                        runtime=runtime, device=device, shards=job.shards,
                                        dask_address=dask_address, return_state=True)
        outcomes.append({"job": f"images {job.folder}", "model": job.model, "state": state})
    for job in rec_jobs:
        state = score_recommendations_flow(job.model, job.out or out, top_k=job.top_k,
                                           full_table=job.full_table, run_date=day,
                                           runtime=runtime, device=device, shards=job.shards,
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
