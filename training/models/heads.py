"""Classifier heads put on a pretrained body: today's ``linear`` one and fast.ai's ``fastai`` one.

``linear`` is pool → Dropout → Linear, the pool staying in the body (Yosinski et al., NeurIPS
2014). ``fastai`` is ``create_head`` of fastai (Howard & Gugger, "Fastai: a layered API for deep
learning", 2020) with its defaults ``ps=0.5, lin_ftrs=[512], bn_final=False``: concat pool
(max and average, 2 × nf features), then BatchNorm → Dropout(p/2) → Linear(2nf, 512) → ReLU →
BatchNorm → Dropout(p) → Linear(512, n_out). As in fastai its linears carry no bias (each
follows a BatchNorm, whose shift does the bias's job) and their weights start from Kaiming
normal. It pools the body's feature map itself, so a body under it stops before its own pool.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from training.errors import TrainingError
from training.models.ranges import SigmoidRange

HeadKind = Literal["linear", "fastai"]
HEADS: tuple[str, ...] = ("linear", "fastai")
#: Dropout ``p`` when none is given: the linear head's, and fastai's ``ps`` (its first dropout
#: takes half of it).
DEFAULT_DROPOUT = {"linear": 0.2, "fastai": 0.5}
#: Width of the fastai head's hidden layer (fastai's ``lin_ftrs=[512]``).
FASTAI_HIDDEN = 512


class AdaptiveConcatPool2d(nn.Module):
    """fastai's pool: global max and global average side by side, (N, C, H, W) → (N, 2C, 1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.mp = nn.AdaptiveMaxPool2d(1)
        self.ap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.mp(x), self.ap(x)], dim=1)


def takes_feature_map(kind: str) -> bool:
    """Whether head ``kind`` pools the body's (N, C, H, W) map itself (else it takes (N, C))."""
    return check_head(kind) == "fastai"


def check_head(kind: str) -> str:
    """``kind`` if it names a head, else a TrainingError listing the heads."""
    if kind not in HEADS:
        raise TrainingError(f"head must be one of {', '.join(HEADS)}, got {kind!r}")
    return kind


def head_dropout(kind: str, dropout: float | None = None) -> float:
    """The dropout ``p`` head ``kind`` is built with: ``dropout``, or the head's default."""
    p = DEFAULT_DROPOUT[check_head(kind)] if dropout is None else float(dropout)
    if not 0.0 <= p < 1.0:
        raise TrainingError(f"dropout must be in [0, 1), got {p}")
    return p


def create_head(kind: str, num_features: int, n_out: int, *, dropout: float | None = None,
                y_range: tuple[float, float] | None = None) -> nn.Sequential:
    """Head ``kind`` from ``num_features`` body channels to ``n_out`` outputs.

    dropout: ``p`` of the linear head, fastai's ``ps`` (default: ``DEFAULT_DROPOUT``).
    y_range: (low, high) to squash the outputs into with ``SigmoidRange``.
    """
    p = head_dropout(kind, dropout)
    if kind == "linear":
        layers: list[nn.Module] = [nn.Dropout(p), nn.Linear(num_features, n_out)]
    else:
        nf = 2 * num_features
        layers = [
            AdaptiveConcatPool2d(), nn.Flatten(),
            nn.BatchNorm1d(nf), nn.Dropout(p / 2), nn.Linear(nf, FASTAI_HIDDEN, bias=False),
            nn.ReLU(),
            nn.BatchNorm1d(FASTAI_HIDDEN), nn.Dropout(p), nn.Linear(FASTAI_HIDDEN, n_out,
                                                                    bias=False),
        ]
        _fastai_init(layers)
    if y_range is not None:
        layers.append(SigmoidRange(*y_range))
    return nn.Sequential(*layers)


def _fastai_init(layers: list[nn.Module]) -> None:
    """fastai's head init: Kaiming-normal linears; BatchNorm weight 1 and bias 1e-3."""
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight)
        elif isinstance(layer, nn.BatchNorm1d):
            nn.init.ones_(layer.weight)
            nn.init.constant_(layer.bias, 1e-3)
