"""Exact integer ids from a ratings or items file: no float round trip, int64 or a named error.

Ids pass through float64 nowhere: 2⁵³ and 2⁵³ + 1 stay two users, and an id beyond int64 (or
written as ``1e20``) is refused with its file, line and column instead of wrapping around.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from training.errors import TrainingError

_INTEGER_TEXT = r"[+-]?\d+(?:\.0*)?"  # "12", "-3", "12.0": exact integers written in digits
_INT64_MAX = str(np.iinfo(np.int64).max)


class RatingsFormatError(TrainingError):
    """A ratings or items file is missing, unreadable, or holds a bad value at a named line."""


def exact_ids(raw: pd.Series, kind: str, where, name: str) -> np.ndarray:
    """Exact int64 ids from integers, whole floats below 2⁵³, or text in digits; else an error
    naming the first bad value and every bad line."""
    if pd.api.types.is_signed_integer_dtype(raw.dtype):
        return raw.to_numpy(dtype=np.int64)
    if pd.api.types.is_float_dtype(raw.dtype) or pd.api.types.is_unsigned_integer_dtype(raw.dtype):
        values = raw.to_numpy(dtype=np.float64, na_value=np.nan)
        # Above 2⁵³ a float no longer holds every integer: the id may already be another one.
        bad = ~np.isfinite(values) | (values != np.round(values)) | (np.abs(values) >= 2.0**53)
        if not bad.any():
            return values.astype(np.int64)
        if pd.api.types.is_unsigned_integer_dtype(raw.dtype):
            raw = raw.astype(str)  # a uint64 beyond int64: reported as text below
        else:
            _id_error(raw, bad, kind, where, name, float_column=True)
    text = raw.astype("string").fillna("").str.strip()
    integral = text.str.fullmatch(_INTEGER_TEXT).to_numpy(dtype=bool)
    digits = text.str.replace(r"\.0*$", "", regex=True)
    magnitude = digits.str.lstrip("+-").str.lstrip("0")
    width = magnitude.str.len().to_numpy(dtype=np.int64)
    beyond = (magnitude > _INT64_MAX).to_numpy(dtype=bool)  # by text: same width, same order
    too_large = (width > len(_INT64_MAX)) | ((width == len(_INT64_MAX)) & beyond)
    bad = ~integral | too_large
    if bad.any():
        _id_error(raw, bad, kind, where, name)
    return digits.astype("int64").to_numpy(dtype=np.int64)


def _id_error(raw: pd.Series, bad: np.ndarray, kind: str, where, name: str, *,
              float_column: bool = False):
    first = raw.to_numpy()[bad][0]
    text = str(first).strip()
    number = pd.to_numeric(pd.Series([text]), errors="coerce").iloc[0] if not pd.isna(first) \
        else np.nan
    if pd.isna(first) or not text:
        what = f"missing {kind}"
    elif np.isnan(number):
        what = f"non-numeric {kind} {text!r}"
    elif number != np.round(number):
        what = f"non-integer {kind} {text!r}"
    elif float_column:
        what = f"{kind} {text} in a float column past 2⁵³, where floats skip integers " \
            f"(store ids as int64)"
    elif re.fullmatch(_INTEGER_TEXT, text) or abs(number) >= 2.0**63:
        what = f"{kind} {text!r} beyond 64-bit integers (ids must fit in int64)"
    else:
        what = f"{kind} {text!r} not written in digits (ids are exact integers)"
    count = f" ({int(bad.sum())} bad values)" if bad.sum() > 1 else ""
    raise RatingsFormatError(f"{where(bad)}: {what} in column {name!r}{count}")
