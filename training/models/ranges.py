"""Bounded outputs: fast.ai's ``sigmoid_range`` and the ``y_range`` option that sets its bounds.

Image regression heads and recommenders both end in ``sigmoid_range(x, low, high)``: outputs
start mid-range and can reach but never pass the extremes.
"""

from __future__ import annotations

import torch
from torch import nn

from training.errors import TrainingError


def sigmoid_range(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Sigmoid squashed into (low, high), so predictions can reach but not pass the extremes."""
    return torch.sigmoid(x) * (high - low) + low


class SigmoidRange(nn.Module):
    """``sigmoid_range`` as the last layer of a head."""

    def __init__(self, low: float, high: float):
        super().__init__()
        self.low = float(low)
        self.high = float(high)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sigmoid_range(x, self.low, self.high)

    def extra_repr(self) -> str:
        return f"low={self.low}, high={self.high}"


def parse_y_range(value) -> tuple[float, float] | str | None:
    """A ``y_range`` option: ``"auto"``, ``"none"`` (None), ``"LOW,HIGH"`` or a (low, high) pair.

    Returns ``"auto"``, None or ``(low, high)`` with low < high.
    """
    if value is None:
        return None
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("auto", "none"):
            return None if word == "none" else "auto"
        try:
            value = tuple(float(v) for v in value.split(","))
        except ValueError:
            raise TrainingError(f"y_range must be auto, none or LOW,HIGH, got {value!r}") \
                from None
    if len(value) != 2 or not float(value[0]) < float(value[1]):
        raise TrainingError(f"y_range must be 'auto', 'none' or LOW,HIGH with LOW < HIGH, "
                            f"got {value!r}")
    return (float(value[0]), float(value[1]))


def y_range_text(value) -> str:
    """A ``y_range`` given as a pair or None, as the option's text (``"LOW,HIGH"``, ``"none"``)."""
    if value is None:
        return "none"
    if isinstance(value, str):
        return value
    low, high = parse_y_range(value)
    return f"{low!r},{high!r}"
