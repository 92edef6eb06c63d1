"""The modules that get exported: an eager model plus everything a scorer must not re-implement.

Image models are wrapped so the graph takes what PIL and numpy hand over — uint8 RGB in NHWC
layout at the model's input size — and does the permute, scaling and mean/std normalisation
itself, then turns logits into the task's scores (softmax, sigmoid or identity). Baking
preprocessing into the graph is the ONNX Runtime and TorchScript deployment advice ("export the
whole pipeline"), and it removes the commonest train/serve skew: normalising twice or never.

Collaborative-filtering models (fast.ai lesson 6's dot product with biases) give two graphs: one
scores every item for a batch of users, one predicts the rating of (user, item) pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from export.errors import ConversionError
from export.manifest import IMAGE_TASKS


class ImageExportWrapper(nn.Module):
    """uint8 ``images`` (N, H, W, 3) RGB → ``scores`` and ``logits`` of an eager image model."""

    def __init__(self, model: nn.Module, task: str, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        super().__init__()
        if task not in IMAGE_TASKS:
            raise ConversionError(f"task {task!r}: not an image task (one of {IMAGE_TASKS})")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ConversionError(
                f"preprocessing mean/std {list(mean)}/{list(std)}: need 3 values, std > 0")
        self.model = model
        self.task = task
        # Buffers, not Python floats, so the constants travel with the graph and the weights.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).to(torch.float32).div(255.0)
        logits = self.model((x - self.mean) / self.std)
        if self.task == "single_label":
            scores = torch.softmax(logits, dim=-1)
        elif self.task == "multi_label":
            scores = torch.sigmoid(logits)
        else:
            # Regression heads already end in sigmoid_range: the raw output is the prediction.
            scores = logits
        return scores, logits


class CollabUsersWrapper(nn.Module):
    """int64 ``users`` (B,) → ``scores`` (B, n_items): every item's predicted rating."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        return self.model.score_users(users)


class CollabPairsWrapper(nn.Module):
    """int64 ``pairs`` (N, 2) of (user, item) indices → ``ratings`` (N,)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.model(pairs)


def check_collab_model(model: nn.Module) -> None:
    """Refuse a recommender that lacks the interface the collab graphs are built on."""
    missing = [a for a in ("score_users", "n_items") if not hasattr(model, a)]
    if missing:
        raise ConversionError(
            f"collab model {type(model).__name__}: missing {', '.join(missing)} "
            "(needs forward(pairs), score_users(users) and n_items)")
