"""Training flows for CSV-labelled images: multi-label classification and image regression.

Same chain as ``train-image-model`` (check inputs → prepare → fine-tune → export with the parity
gate → promote); only the data reader and the recipe differ (``training.recipes.multilabel``,
``training.recipes.regression``). Data prep is cached on the files' fingerprint like the
single-label flow's.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from flows.artifacts import TrainingProgress, publish_metrics, publish_plots
from flows.cache_keys import prepared_data_key, result_cache_dir
from flows.failures import USER_ERRORS, user_failure
from flows.params import (
    Device,
    ImageLearningRate,
    ModelName,
    NonNegativeInt,
    PathText,
    PositiveInt,
    ValidFraction,
)
from flows.train_flows import check_training_inputs, export_task, promote_task, train_dir_for


@task(name="prepare-multilabel-data", cache_key_fn=prepared_data_key,
      cache_expiration=timedelta(days=30), persist_result=True, result_serializer="pickle")
def prepare_multilabel_task(data: str, csv: str | None, valid_pct: float, seed: int,
                            label_delim: str = " ", split_by: str | None = None):
    """Read and split ``fname,labels[,is_valid]`` (cached: an unchanged dataset is not re-read)."""
    from training.data.multilabel import from_multilabel_csv

    prepared = from_multilabel_csv(csv, data, label_delim=label_delim, valid_pct=valid_pct,
                                   seed=seed, split_by=split_by)
    get_run_logger().info(prepared.summary())
    return prepared


@task(name="prepare-regression-data", cache_key_fn=prepared_data_key,
      cache_expiration=timedelta(days=30), persist_result=True, result_serializer="pickle")
def prepare_regression_task(data: str, csv: str | None, valid_pct: float, seed: int,
                            targets: str | None = None, points: str | None = None,
                            split_by: str | None = None):
    """Read and split a CSV of float targets or pixel points (cached like image data)."""
    from training.data.regression import from_regression_csv

    prepared = from_regression_csv(csv, data, targets=targets, points=points,
                                   valid_pct=valid_pct, seed=seed, split_by=split_by)
    get_run_logger().info(prepared.summary())
    return prepared


@task(name="fine-tune", cache_policy=NO_CACHE)
def fine_tune_csv_task(kind: str, prepared, out_dir: Path, options: dict):
    """The task's recipe: LR finder → frozen head → unfrozen body → best epoch restored."""
    if kind == "multilabel":
        from training.recipes.multilabel import train_multilabel_model as recipe
    else:
        from training.recipes.regression import train_regression_model as recipe
    key = f"train-{kind}-model"
    total = options["freeze_epochs"] + options["epochs"]
    progress = TrainingProgress(key=f"{key}-progress", total_epochs=total,
                                description=f"epochs of {out_dir.name}", log=get_run_logger())
    result = recipe(prepared, out_dir, progress=progress, **options)
    progress({"event": "end"})
    publish_plots(result.plots, key=f"{key}-plots", description="LR finder, curves, task plots")
    publish_metrics({"best_epoch": result.best_epoch, **result.metrics}, key=f"{key}-metrics",
                    description=f"validation metrics of the restored best epoch ({out_dir})")
    return result


def _train_chain(kind: str, prepared, registry: str, name: str, train_dir: str | None,
                 options: dict) -> dict:
    trained = fine_tune_csv_task(kind, prepared, train_dir_for(name, train_dir), options)
    exported = export_task(trained.out_dir, registry, name, recipe="image-model")
    pointer = promote_task(exported.bundle_path)
    return {"train_dir": str(trained.out_dir), "bundle": str(exported.bundle_path),
            "current": pointer, "metrics": trained.metrics}


@flow(name="train-multilabel-model")
def train_multilabel_model_flow(
    data: PathText,
    csv: PathText,
    registry: PathText,
    name: ModelName,
    label_delim: str = " ",
    threshold_metric: Literal["accuracy_multi", "f1_macro", "f1_micro"] = "accuracy_multi",
    per_label_thresholds: bool = False,
    split_by: str | None = None,
    arch: str = "tf_efficientnet_lite0",
    weights: str = "packaged",
    size: PositiveInt = 224,
    bs: PositiveInt = 32,
    freeze_epochs: NonNegativeInt = 1,
    epochs: NonNegativeInt = 3,
    lr: ImageLearningRate = "auto",
    patience: NonNegativeInt = 2,
    seed: int = 42,
    valid_pct: ValidFraction = 0.2,
    device: Device = "auto",
    train_dir: str | None = None,
) -> dict | State:
    """Fine-tune a multi-label model on ``csv`` (``fname,labels[,is_valid]`` relative to
    ``data``), tune its threshold on validation, export, gate on parity, promote."""
    try:
        data = check_training_inputs(data, registry, csv)
        prepared = prepare_multilabel_task.with_options(result_storage=result_cache_dir())(
            data, csv, valid_pct, seed, label_delim=label_delim, split_by=split_by)
        options = {"threshold_metric": threshold_metric,
                   "per_label_thresholds": per_label_thresholds, "arch": arch,
                   "weights": weights, "size": size, "bs": bs, "freeze_epochs": freeze_epochs,
                   "epochs": epochs, "lr": lr, "patience": patience or None, "seed": seed,
                   "device": device}
        return _train_chain("multilabel", prepared, registry, name, train_dir, options)
    except USER_ERRORS as err:
        get_run_logger().error(str(err))
        return user_failure(err)


@flow(name="train-regression-model")
def train_regression_model_flow(
    data: PathText,
    csv: PathText,
    registry: PathText,
    name: ModelName,
    targets: str | None = None,
    points: str | None = None,
    split_by: str | None = None,
    y_range: str = "auto",
    flip: bool = True,
    arch: str = "tf_efficientnet_lite0",
    weights: str = "packaged",
    size: PositiveInt = 224,
    bs: PositiveInt = 32,
    freeze_epochs: NonNegativeInt = 1,
    epochs: NonNegativeInt = 3,
    lr: ImageLearningRate = "auto",
    patience: NonNegativeInt = 2,
    seed: int = 42,
    valid_pct: ValidFraction = 0.2,
    device: Device = "auto",
    train_dir: str | None = None,
) -> dict | State:
    """Fine-tune an image regressor on ``csv`` (``fname`` + ``targets`` columns, or pixel
    ``points`` ``X,Y``), export, gate on parity, promote. ``y_range``: auto | none | LOW,HIGH."""
    try:
        from training.recipes.regression import parse_y_range

        data = check_training_inputs(data, registry, csv)
        prepared = prepare_regression_task.with_options(result_storage=result_cache_dir())(
            data, csv, valid_pct, seed, targets=targets, points=points, split_by=split_by)
        options = {"y_range": parse_y_range(y_range), "flip": flip, "arch": arch,
                   "weights": weights, "size": size, "bs": bs, "freeze_epochs": freeze_epochs,
                   "epochs": epochs, "lr": lr, "patience": patience or None, "seed": seed,
                   "device": device}
        return _train_chain("regression", prepared, registry, name, train_dir, options)
    except USER_ERRORS as err:
        get_run_logger().error(str(err))
        return user_failure(err)
