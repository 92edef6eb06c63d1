"""Training flows: fine-tune an image model or a recommender, export, gate on parity, promote.

Wiring only: ``training.recipes`` prepares and fine-tunes (LR finder, frozen head, unfrozen
discriminative LRs, early stopping), ``training.recipes.publish`` exports and runs the parity
gate, ``export.bundle.promote`` moves the registry's ``current`` pointer. The options are the
declared ``training.recipes.options`` models, flattened into flow parameters by
``declared_options``. The flow adds what Prefect is for: data prep cached across runs on the
dataset's fingerprint (as JSON, ``flows.prepared_cache``: no pickle), one task per stage so the
UI shows where a run stopped, retries only on the storage-touching promote, and artifacts for
the plots, metrics and parity table. An export signs its bundle when ``$LENSFLOW_SIGNING_KEY``
names a key.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect import runtime as prefect_runtime
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from export.bundle import promote
from export.errors import ParityError
from export.options import ExportOptions
from flows.artifacts import TrainingProgress, publish_markdown, publish_metrics, publish_plots
from flows.failures import (
    STORAGE_RETRY_DELAYS,
    retry_on_storage_error,
    user_errors_fail_the_run,
)
from flows.option_surfaces import declared_options
from flows.params import ModelName, PathText
from flows.prepared_cache import prepared_or_cached
from training.errors import TrainingError
from training.recipes.options import ImageTrainOptions, RecommenderOptions

#: Where a flow writes training outputs when ``train_dir`` is not given (under the working
#: directory, which the deployment's pull step sets to ``$LENSFLOW_HOME``).
DEFAULT_TRAIN_ROOT = Path("runs") / "flows"

#: The recipe of each image task: (module, function), looked up when the task runs.
IMAGE_RECIPES = {
    "image": ("training.recipes.image", "train_image_model"),
    "multilabel": ("training.recipes.multilabel", "train_multilabel_model"),
    "regression": ("training.recipes.regression", "train_regression_model"),
}


def train_dir_for(name: str, train_dir: str | None) -> Path:
    """``train_dir``, or ``runs/flows/<name>/<flow-run-name>`` made absolute."""
    if train_dir:
        return Path(train_dir).expanduser().resolve()
    run_name = prefect_runtime.flow_run.name or "local"
    return (DEFAULT_TRAIN_ROOT / name / run_name).resolve()


@task(name="check-training-inputs", cache_policy=NO_CACHE)
def check_training_inputs(data: str, registry: str, csv: str | None = None) -> str:
    """Fail fast on missing data before any model is built; returns ``data`` made absolute."""
    path = Path(data).expanduser()
    if not path.exists():
        raise TrainingError(f"data {data}: no such file or directory")
    if csv is not None and not Path(csv).expanduser().is_file():
        raise TrainingError(f"csv {csv}: no such file")
    reg = Path(registry).expanduser()
    if reg.exists() and not reg.is_dir():
        raise TrainingError(f"registry {registry}: exists and is not a directory")
    return str(path.resolve())


@task(name="prepare-image-data", cache_policy=NO_CACHE, persist_result=False)
def prepare_image_data_task(data: str, csv: str | None, valid_pct: float, seed: int):
    """Find, validate and split the images (cached as JSON: an unchanged dataset is not re-read)."""
    from training.data.images import prepare_image_data

    return prepared_or_cached(
        {"kind": "image", "data": data, "csv": csv, "valid_pct": valid_pct, "seed": seed},
        lambda: prepare_image_data(data, csv=csv, valid_pct=valid_pct, seed=seed),
        get_run_logger())


@task(name="fine-tune", cache_policy=NO_CACHE)
def fine_tune_task(kind: str, prepared, out_dir: Path, options: ImageTrainOptions):
    """The task's recipe: LR finder → frozen head → unfrozen body → best epoch restored."""
    module, func = IMAGE_RECIPES[kind]
    recipe = getattr(importlib.import_module(module), func)
    key = f"train-{kind}-model"
    progress = TrainingProgress(key=f"{key}-progress",
                                total_epochs=options.freeze_epochs + options.epochs,
                                description=f"epochs of {out_dir.name}", log=get_run_logger())
    result = recipe(prepared, out_dir, options, progress=progress)
    progress({"event": "end"})
    publish_plots(result.plots, key=f"{key}-plots", description="LR finder, curves, task plots")
    publish_metrics({"best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
                     **result.metrics}, key=f"{key}-metrics",
                    description=f"validation metrics of the restored best epoch ({out_dir})")
    return result


@task(name="export-and-check-parity", cache_policy=NO_CACHE)
def export_task(train_out: Path, registry: str, name: str, *, recipe: str,
                export: ExportOptions | None = None):
    """Export TorchScript/ONNX(/pt2) into a new bundle and run the parity gate against eager."""
    from training.recipes.publish import export_training_output

    key = f"train-{recipe}-parity"
    try:
        result = export_training_output(train_out, registry, name, options=export)
    except ParityError as err:
        if err.report is not None:
            publish_markdown(err.report.to_markdown(), key=key,
                             description=f"parity FAILED for {err.bundle_path}")
        raise
    publish_markdown(result.parity.to_markdown(), key=key,
                     description=f"parity of {result.bundle_path}")
    get_run_logger().info("bundle %s written; parity passed", result.bundle_path)
    return result


@task(name="promote", cache_policy=NO_CACHE, retries=len(STORAGE_RETRY_DELAYS),
      retry_delay_seconds=STORAGE_RETRY_DELAYS, retry_condition_fn=retry_on_storage_error)
def promote_task(bundle_path: Path) -> str:
    """Point ``<registry>/<name>/current`` at the bundle (atomic replace)."""
    pointer = promote(bundle_path)
    get_run_logger().info("promoted %s (%s)", bundle_path, pointer)
    return str(pointer)


def publish_trained(trained, registry: str, name: str, *, recipe: str,
                    export: ExportOptions | None = None) -> dict:
    """Export → parity gate → promote a training output; the flow's result."""
    exported = export_task(trained.out_dir, registry, name, recipe=recipe, export=export)
    pointer = promote_task(exported.bundle_path)
    return {"train_dir": str(trained.out_dir), "bundle": str(exported.bundle_path),
            "current": pointer, "metrics": trained.metrics}


def fine_tune_and_publish(kind: str, prepared, registry: str, name: str,
                          train_dir: str | None, options: ImageTrainOptions,
                          export: ExportOptions | None = None) -> dict:
    """The image tasks' chain after data prep: fine-tune, then export, gate and promote."""
    trained = fine_tune_task(kind, prepared, train_dir_for(name, train_dir), options)
    return publish_trained(trained, registry, name, recipe="image-model", export=export)


@flow(name="train-image-model")
@declared_options(options=ImageTrainOptions, export=ExportOptions)
@user_errors_fail_the_run
def train_image_model_flow(data: PathText, registry: PathText, name: ModelName,
                           csv: str | None = None, train_dir: str | None = None, *,
                           options: ImageTrainOptions,
                           export: ExportOptions) -> dict | State:
    """Fine-tune ``arch`` on ``data``, export a bundle to ``registry/name``, promote it if parity
    passes.

    ``data``: a folder per class (optionally under train/ and val/), or the image root of
    ``csv`` (``fname,label[,is_valid]``). The other parameters are ``ImageTrainOptions`` and
    ``ExportOptions``.
    """
    data = check_training_inputs(data, registry, csv)
    prepared = prepare_image_data_task(data, csv, options.valid_pct, options.seed)
    return fine_tune_and_publish("image", prepared, registry, name, train_dir, options, export)


@task(name="fit-recommender", cache_policy=NO_CACHE)
def fit_recommender_task(data: str, out_dir: Path, options: RecommenderOptions):
    """LR finder → one-cycle fit (early stopping optional) → training output in ``out_dir``."""
    from training.recipes.collab import train_recommender

    progress = TrainingProgress(key="train-recommender-progress", total_epochs=options.epochs,
                                description=f"epochs of {out_dir.name}", log=get_run_logger())
    result = train_recommender(data, out_dir, options, progress=progress)
    progress({"event": "end"})
    for line in result.report_lines():
        get_run_logger().info(line)
    publish_plots(result.plots, key="train-recommender-plots",
                  description="LR finder and learning curve")
    publish_metrics(result.metrics, key="train-recommender-metrics",
                    description=f"validation metrics of {out_dir}")
    return result


@flow(name="train-recommender")
@declared_options(options=RecommenderOptions)
@user_errors_fail_the_run
def train_recommender_flow(data: PathText, registry: PathText, name: ModelName,
                           train_dir: str | None = None, *,
                           options: RecommenderOptions) -> dict | State:
    """Train a dot-product (or ``use_nn`` embedding-MLP) recommender on ``data`` (a MovieLens
    folder, or a CSV/Parquet of ratings), export it to ``registry/name`` and promote it if
    parity passes. The other parameters are ``RecommenderOptions``."""
    data = check_training_inputs(data, registry)
    trained = fit_recommender_task(data, train_dir_for(name, train_dir), options)
    return publish_trained(trained, registry, name, recipe="recommender")
