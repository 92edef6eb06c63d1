"""The base every declared option set derives from, and the field types they share.

Each option (name, type, default, help, checks) is declared once, as a field of a pydantic model:
``training.recipes.options``, ``training.recipes.import_options``, ``scoring.options``,
``export.options``; ``flows.option_surfaces`` derives the CLI flags and the flow parameters from
them. The base lives in ``export``, the lowest layer, so that training and scoring, which may not
import each other, share it.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Device = Literal["auto", "cpu", "cuda"]
OptionsT = TypeVar("OptionsT", bound="Options")


class Options(BaseModel):
    """Base of every declared option set: unknown names are refused, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def updated(self: OptionsT, **changes) -> OptionsT:
        """A validated copy with ``changes`` applied (``model_copy`` would skip validation)."""
        return type(self)(**(self.model_dump() | changes))
