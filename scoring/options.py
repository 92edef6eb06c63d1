"""The options of every scoring run, each declared once (see ``training.recipes.options``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Runtime = Literal["onnx", "torchscript"]
Device = Literal["auto", "cpu", "cuda"]


class ScoreOptions(BaseModel):
    """Base of the scoring option sets: unknown names are refused, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    runtime: Runtime = Field("onnx", description="onnx | torchscript: which exported graph runs")
    device: Device = Field("auto", description="auto | cpu | cuda")
    shards: PositiveInt | None = Field(None, description="pieces the run is split into "
                                       "(default 1 here, 16 on a Dask cluster)")

    def updated(self, **changes) -> ScoreOptions:
        """A validated copy with ``changes`` applied."""
        return type(self)(**(self.model_dump() | changes))


class ImageScoreOptions(ScoreOptions):
    """Scoring an image folder to ``image_predictions``."""

    batch_size: PositiveInt = Field(64, description="images per runtime call")
    workers: NonNegativeInt | None = Field(None, description="image-decoding worker processes "
                                           "(default: by folder size and cores)")
    top_k: NonNegativeInt = Field(5, description="best classes kept per image")
    incremental: bool = Field(False, description="skip files an earlier partition scored with "
                              "this model version")


class RecScoreOptions(ScoreOptions):
    """Scoring a recommender: top-k per user, optionally the full user × item table."""

    top_k: NonNegativeInt = Field(10, description="items recommended per user (seen excluded)")
    full_table: bool = Field(False, description="also write every user × item score")
    users: str | None = Field(None, description="file of raw user ids, one per line (default: "
                              "every user)")
    strict: bool = Field(False, description="an unknown user id is an error, not a skip")
