"""Training flows: fine-tune an image model or a recommender, export, gate on parity, promote.

Wiring only: ``training.recipes.image`` prepares, fine-tunes (LR finder, frozen head, unfrozen
discriminative LRs, early stopping) and exports; ``export.bundle.promote`` moves the registry's
``current`` pointer. The flow adds what Prefect is for: data prep cached across runs on the
dataset's fingerprint, one task per stage so the UI shows where a run stopped, retries only on
the storage-touching promote, and artifacts for the plots, metrics and parity table.
"""

from __future__ import annotations

import importlib
from datetime import timedelta
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect import runtime as prefect_runtime
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from export.bundle import promote
from export.errors import ParityError
from flows.artifacts import TrainingProgress, publish_markdown, publish_metrics, publish_plots
from flows.cache_keys import prepared_data_key, result_cache_dir
from flows.failures import (
    STORAGE_RETRY_DELAYS,
    USER_ERRORS,
    retry_on_storage_error,
    user_failure,
)
from flows.params import (
    Device,
    ImageLearningRate,
    LearningRate,
    ModelName,
    NonNegativeFloat,
    NonNegativeInt,
    PathText,
    PositiveInt,
    ValidFraction,
)
from training.errors import TrainingError

#: Where a flow writes training outputs when ``train_dir`` is not given (under the working
#: directory, which the deployment's pull step sets to ``$LENSFLOW_HOME``).
DEFAULT_TRAIN_ROOT = Path("runs") / "flows"


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


@task(name="prepare-image-data", cache_key_fn=prepared_data_key,
      cache_expiration=timedelta(days=30), persist_result=True, result_serializer="pickle")
def prepare_image_data_task(data: str, csv: str | None, valid_pct: float, seed: int):
    """Find, validate and split the images (cached: an unchanged dataset is not re-read)."""
    from training.recipes.image import prepare_image_data

    prepared = prepare_image_data(data, csv=csv, valid_pct=valid_pct, seed=seed)
    get_run_logger().info(prepared.summary())
    return prepared


@task(name="fine-tune", cache_policy=NO_CACHE)
def fine_tune_task(prepared, out_dir: Path, options: dict):
    """LR finder → frozen head → unfrozen body with discriminative LRs → best epoch restored."""
    from training.recipes.image import train_image_model

    total = options["freeze_epochs"] + options["epochs"]
    progress = TrainingProgress(key="train-image-model-progress", total_epochs=total,
                                description=f"epochs of {out_dir.name}", log=get_run_logger())
    result = train_image_model(prepared, out_dir, progress=progress, **options)
    progress({"event": "end"})
    publish_plots(result.plots, key="train-image-model-plots",
                  description="LR finder, learning curve and confusion matrix")
    publish_metrics({"best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
                     **result.metrics}, key="train-image-model-metrics",
                    description=f"validation metrics of the restored best epoch ({out_dir})")
    return result


#: The plain export function of each recipe: training output → committed, parity-checked bundle.
EXPORTERS = {
    "image-model": ("training.recipes.image", "export_image_model"),
    "recommender": ("training.recipes.collab", "export_recommender"),
}


@task(name="export-and-check-parity", cache_policy=NO_CACHE)
def export_task(train_out: Path, registry: str, name: str, *, recipe: str):
    """Export TorchScript/ONNX(/pt2) into a new bundle and run the parity gate against eager."""
    module, func = EXPORTERS[recipe]
    export = getattr(importlib.import_module(module), func)
    key = f"train-{recipe}-parity"
    try:
        result = export(train_out, registry, name)
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


@flow(name="train-image-model")
def train_image_model_flow(
    data: PathText,
    registry: PathText,
    name: ModelName,
    arch: str = "tf_efficientnet_lite0",
    weights: str = "packaged",
    size: PositiveInt = 224,
    bs: PositiveInt = 32,
    freeze_epochs: NonNegativeInt = 1,
    epochs: NonNegativeInt = 3,
    lr: ImageLearningRate = "auto",
    patience: NonNegativeInt = 2,
    precompute: bool = False,
    seed: int = 42,
    valid_pct: ValidFraction = 0.2,
    csv: str | None = None,
    device: Device = "auto",
    workers: NonNegativeInt | None = None,
    train_dir: str | None = None,
) -> dict | State:
    """Fine-tune ``arch`` on ``data``, export a bundle to ``registry/name``, promote it if parity
    passes.

    ``data``: a folder per class (optionally under train/ and val/), or the image root of
    ``csv`` (``fname,label[,is_valid]``). ``weights``: imagenet | none | packaged | a file.
    ``lr``: "auto" runs the LR finder. ``patience``: early stopping, 0 disables.
    """
    try:
        data = check_training_inputs(data, registry, csv)
        prepared = prepare_image_data_task.with_options(result_storage=result_cache_dir())(
            data, csv, valid_pct, seed)
        out_dir = train_dir_for(name, train_dir)
        options = {"arch": arch, "weights": weights, "size": size, "bs": bs,
                   "freeze_epochs": freeze_epochs, "epochs": epochs, "lr": lr,
                   "patience": patience or None, "precompute": precompute, "seed": seed,
                   "workers": workers, "device": device}
        trained = fine_tune_task(prepared, out_dir, options)
        exported = export_task(trained.out_dir, registry, name, recipe="image-model")
        pointer = promote_task(exported.bundle_path)
    except USER_ERRORS as err:
        get_run_logger().error(str(err))
        return user_failure(err)
    return {"train_dir": str(trained.out_dir), "bundle": str(exported.bundle_path),
            "current": pointer, "metrics": trained.metrics}


@task(name="fit-recommender", cache_policy=NO_CACHE)
def fit_recommender_task(data: str, out_dir: Path, options: dict):
    """LR finder → one-cycle fit (early stopping optional) → training output in ``out_dir``."""
    from training.recipes.collab import train_recommender

    progress = TrainingProgress(key="train-recommender-progress", total_epochs=options["epochs"],
                                description=f"epochs of {out_dir.name}", log=get_run_logger())
    result = train_recommender(data, out_dir, progress=progress, **options)
    progress({"event": "end"})
    for line in result.report_lines():
        get_run_logger().info(line)
    publish_plots(result.plots, key="train-recommender-plots",
                  description="LR finder and learning curve")
    publish_metrics(result.metrics, key="train-recommender-metrics",
                    description=f"validation metrics of {out_dir}")
    return result


@flow(name="train-recommender")
def train_recommender_flow(
    data: PathText,
    registry: PathText,
    name: ModelName,
    factors: PositiveInt = 50,
    epochs: PositiveInt = 5,
    wd: NonNegativeFloat = 0.2,
    lr: LearningRate = "auto",
    bs: PositiveInt = 512,
    valid_pct: ValidFraction = 0.2,
    split: Literal["random", "time"] = "random",
    use_nn: bool = False,
    patience: NonNegativeInt = 0,
    seed: int = 42,
    user_col: str | None = None,
    item_col: str | None = None,
    rating_col: str | None = None,
    device: Device = "auto",
    train_dir: str | None = None,
) -> dict | State:
    """Train a dot-product (or ``use_nn`` embedding-MLP) recommender on ``data`` (a MovieLens
    folder, or a CSV/Parquet of ratings), export it to ``registry/name`` and promote it if
    parity passes. ``split``: random, or by time (the latest ratings are validation)."""
    try:
        data = check_training_inputs(data, registry)
        out_dir = train_dir_for(name, train_dir)
        columns = {k: v for k, v in {"user_col": user_col, "item_col": item_col,
                                     "rating_col": rating_col}.items() if v}
        options = {"factors": factors, "epochs": epochs, "wd": wd, "lr": lr, "bs": bs,
                   "valid_pct": valid_pct, "split": split, "use_nn": use_nn,
                   "patience": patience or None, "seed": seed, "device": device, **columns}
        trained = fit_recommender_task(data, out_dir, options)
        exported = export_task(trained.out_dir, registry, name, recipe="recommender")
        pointer = promote_task(exported.bundle_path)
    except USER_ERRORS as err:
        get_run_logger().error(str(err))
        return user_failure(err)
    return {"train_dir": str(trained.out_dir), "bundle": str(exported.bundle_path),
            "current": pointer, "metrics": trained.metrics}
