"""Training flows for CSV-labelled images: multi-label classification and image regression.

Same chain as ``train-image-model`` (check inputs → prepare → fine-tune → export with the parity
gate → promote); only the data reader, the recipe and the option model differ
(``training.recipes.multilabel``, ``training.recipes.regression``). Data prep is cached as JSON
on the files' fingerprint like the single-label flow's (``flows.prepared_cache``).
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from export.options import ExportOptions
from flows.failures import user_errors_fail_the_run
from flows.option_surfaces import declared_options
from flows.params import ModelName, PathText
from flows.prepared_cache import prepared_or_cached
from flows.train_flows import check_training_inputs, fine_tune_and_publish
from training.recipes.options import MultiLabelOptions, RegressionOptions


@task(name="prepare-multilabel-data", cache_policy=NO_CACHE, persist_result=False)
def prepare_multilabel_task(data: str, csv: str | None, valid_pct: float, seed: int,
                            label_delim: str = " ", split_by: str | None = None):
    """Read and split ``fname,labels[,is_valid]`` (cached as JSON: an unchanged dataset is not
    re-read)."""
    from training.data.multilabel import from_multilabel_csv

    return prepared_or_cached(
        {"kind": "multilabel", "data": data, "csv": csv, "valid_pct": valid_pct, "seed": seed,
         "label_delim": label_delim, "split_by": split_by},
        lambda: from_multilabel_csv(csv, data, label_delim=label_delim, valid_pct=valid_pct,
                                    seed=seed, split_by=split_by),
        get_run_logger())


@task(name="prepare-regression-data", cache_policy=NO_CACHE, persist_result=False)
def prepare_regression_task(data: str, csv: str | None, valid_pct: float, seed: int,
                            targets: str | None = None, points: str | None = None,
                            split_by: str | None = None):
    """Read and split a CSV of float targets or pixel points (cached like image data)."""
    from training.data.regression import from_regression_csv

    return prepared_or_cached(
        {"kind": "regression", "data": data, "csv": csv, "valid_pct": valid_pct, "seed": seed,
         "targets": targets, "points": points, "split_by": split_by},
        lambda: from_regression_csv(csv, data, targets=targets, points=points,
                                    valid_pct=valid_pct, seed=seed, split_by=split_by),
        get_run_logger())


@flow(name="train-multilabel-model")
@declared_options(options=MultiLabelOptions, export=ExportOptions)
@user_errors_fail_the_run
def train_multilabel_model_flow(data: PathText, csv: PathText, registry: PathText, name: ModelName,
                                train_dir: str | None = None, *,
                                options: MultiLabelOptions,
                                export: ExportOptions) -> dict | State:
    """Fine-tune a multi-label model on ``csv`` (``fname,labels[,is_valid]`` relative to
    ``data``), tune its threshold on validation, export, gate on parity, promote."""
    data = check_training_inputs(data, registry, csv)
    prepared = prepare_multilabel_task(
        data, csv, options.valid_pct, options.seed, label_delim=options.label_delim,
        split_by=options.split_by)
    return fine_tune_and_publish("multilabel", prepared, registry, name, train_dir, options,
                                 export)


@flow(name="train-regression-model")
@declared_options(options=RegressionOptions, export=ExportOptions)
@user_errors_fail_the_run
def train_regression_model_flow(data: PathText, csv: PathText, registry: PathText, name: ModelName,
                                train_dir: str | None = None, *,
                                options: RegressionOptions,
                                export: ExportOptions) -> dict | State:
    """Fine-tune an image regressor on ``csv`` (``fname`` + ``targets`` columns, or pixel
    ``points`` ``X,Y``), export, gate on parity, promote. ``y_range``: auto | none | LOW,HIGH."""
    data = check_training_inputs(data, registry, csv)
    prepared = prepare_regression_task(
        data, csv, options.valid_pct, options.seed, targets=options.targets,
        points=options.points, split_by=options.split_by)
    return fine_tune_and_publish("regression", prepared, registry, name, train_dir, options,
                                 export)
