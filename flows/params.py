"""Typed flow parameters of ``flows`` itself: paths, model names, Dask addresses, nightly jobs.

Each alias is a pydantic type, so Prefect turns it into the deployment's JSON schema (enums,
``exclusiveMinimum``, patterns) and rejects a bad value before the run does any work. The
options of training and scoring are declared in ``training.recipes.options`` and
``scoring.options``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from export.declared_options import NonNegativeInt, PositiveInt

#: A non-empty path or registry reference (``REG/NAME``, ``REG/NAME/VERSION`` or a bundle dir).
PathText = Annotated[str, Field(min_length=1)]
#: A Dask scheduler address, ``tcp://HOST:PORT`` (tls, ucx, ws, wss also accepted; IPv6 hosts
#: in brackets).
DASK_ADDRESS_PATTERN = r"^(tcp|tls|ucx|ws|wss)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):[0-9]{1,5}$"
DaskAddress = Annotated[str, Field(pattern=DASK_ADDRESS_PATTERN)]
#: A model name in the registry: one plain directory name.
ModelName = Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class ImageJob(BaseModel):
    """One image folder to score with one model in the nightly run."""

    model_config = ConfigDict(extra="forbid")

    folder: PathText
    model: PathText
    #: Output root of this job (default: the flow's ``out``).
    out: str | None = None
    #: Shards of this job (default: 1 here, 16 on a Dask cluster).
    shards: PositiveInt | None = None


class RecJob(BaseModel):
    """One recommender to score in the nightly run."""

    model_config = ConfigDict(extra="forbid")

    model: PathText
    top_k: NonNegativeInt = 10
    full_table: bool = False
    #: Output root of this job (default: the flow's ``out``).
    out: str | None = None
    #: Shards (user blocks) of this job (default: 1 here, 16 on a Dask cluster).
    shards: PositiveInt | None = None
