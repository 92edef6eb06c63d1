"""The options of every scoring run, each declared once (see ``training.recipes.options``).

The scorers, the Prefect flows and the CLI all take their option parameters from these models.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal, TypeVar

from pydantic import Field, ValidationError, field_validator

from export.declared_options import Device, NonNegativeInt, Options, PositiveInt
from scoring.errors import ScoringError

Runtime = Literal["onnx", "torchscript", "aoti"]
TableFormat = Literal["parquet", "delta"]
RunOptions = TypeVar("RunOptions", bound="RuntimeOptions")
OnDrift = Literal["off", "warn", "fail"]
PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(gt=0, lt=1)]


class RuntimeOptions(Options):
    """Which exported graph runs, where, and the table format it writes: shared by every scoring
    run and the nightly flow."""

    runtime: Runtime = Field("onnx", description="onnx | torchscript | aoti (an AOTInductor "
                             "package, when the bundle has one): which exported graph runs")
    device: Device = Field("auto", description="auto | cpu | cuda")
    table_format: TableFormat | None = Field(
        None, description="parquet | delta: plain Hive-partitioned Parquet committed by rename, "
        "or a Delta Lake table (default: delta for an object-store out, parquet on disk)")
    schema_evolution: bool = Field(False, description="let a run whose columns differ from its "
                                   "delta table's change the table (refused otherwise)")


class HealthOptions(Options):
    """Run health (docs/scoring.md#run-health): every run is profiled while it scores and
    compared with the trailing committed runs of its table and model before it commits."""

    on_drift: OnDrift = Field("warn", description="off | warn | fail: what a run whose output "
                              "drifted from the trailing runs does: commit and mark it (warn), "
                              "or commit nothing (fail); off skips profiling")
    accept_drift: bool = Field(False, description="commit a run on_drift=fail would refuse (a "
                               "rerun once a person has looked); recorded with the run")
    drift_runs: PositiveInt = Field(7, description="trailing committed runs of the same table "
                                    "and model name pooled as the baseline")
    drift_psi: PositiveFloat = Field(0.25, description="population stability index at or over "
                                     "which a distribution counts as drifted")
    drift_js: PositiveFloat = Field(0.05, description="Jensen-Shannon divergence (bits) at or "
                                    "over which a distribution counts as drifted")
    drift_p: Probability = Field(0.0001, description="and only when a shift that large would "
                                 "come from sampling noise less often than this (chi-square)")


class NightlyOptions(HealthOptions, RuntimeOptions):
    """The nightly flow's options: every job's runtime and run health."""


class ScoreOptions(HealthOptions, RuntimeOptions):
    """Base of the scoring option sets."""

    shards: PositiveInt | None = Field(None, description="pieces the run is split into "
                                       "(default 1 here, 16 on a Dask cluster)")
    allow_failed_parity: bool = Field(False, description="score with a bundle whose parity "
                                      "gate failed (recorded in every output file's metadata)")


class ImageScoreOptions(ScoreOptions):
    """Scoring an image folder to ``image_predictions``."""

    batch_size: PositiveInt = Field(64, description="images per runtime call")
    workers: NonNegativeInt | None = Field(None, description="image-decoding worker processes; "
                                           "0: decoding threads of the scoring process "
                                           "(default: by folder size and cores)")
    top_k: PositiveInt = Field(5, description="best classes kept per image")
    incremental: bool = Field(False, description="skip files an earlier partition scored with "
                              "this model version")
    gpu_decode: bool = Field(False, description="decode JPEGs on the GPU (nvJPEG, full size, "
                             "torch resize) when one is there; CPU decoding otherwise")


class RecScoreOptions(ScoreOptions):
    """Scoring a recommender: top-k per user, optionally the full user × item table."""

    top_k: NonNegativeInt = Field(10, description="items recommended per user (seen excluded); "
                                  "0 with full_table writes only the full table")
    full_table: bool = Field(False, description="also write every user × item score")
    users: str | list[int | str] | None = Field(
        None, description="file of raw user ids, one per line (default: every user)")
    strict: bool = Field(False, description="an unknown user id is an error, not a skip")
    block_size: PositiveInt = Field(1024, description="users per runtime call (fewer when a "
                                    "block of scores would pass 64 MiB)")

    @field_validator("users", mode="before")
    @classmethod
    def _path_as_text(cls, value):
        return os.fspath(value) if isinstance(value, os.PathLike) else value


def resolve_options(model: type[RunOptions], options: RunOptions | None,
                    overrides: dict) -> RunOptions:
    """``options`` (default ``model()``) with ``overrides`` applied and checked; a refused value
    is one :class:`ScoringError` line naming the option."""
    if options is not None and not isinstance(options, model):
        raise ScoringError(f"options: expected {model.__name__}, got {type(options).__name__}")
    try:
        if options is None:
            return model(**overrides)
        return options.updated(**overrides) if overrides else options
    except ValidationError as err:
        raise ScoringError("; ".join(
            f"{'.'.join(map(str, e['loc'])) or model.__name__}: {e['msg']} "
            f"(got {e.get('input')!r})" for e in err.errors())) from None
