"""The modules that get exported: an eager model plus everything a scorer must not re-implement.

Image models are wrapped so the graph takes what PIL and numpy hand over — uint8 RGB in NHWC
layout at the model's input size — and does the permute, scaling and mean/std normalisation
itself, then turns logits into the task's scores (softmax, sigmoid or identity). Baking
preprocessing into the graph is the ONNX Runtime and TorchScript deployment advice ("export the
whole pipeline"), and it removes the commonest train/serve skew: normalising twice or never.

With test-time augmentation (``tta``) the graph takes the same batch and averages the scores of
fixed views — ``export.manifest.TTA_VIEWS``: the centre crop and its mirror image — so a scorer
gets TTA without code of its own. Both views go through the model as one batch of 2N. Point
outputs of the mirror view are mirrored back (x → -x in the ``input_crop_normalised`` frame,
whose origin is the crop's centre) before averaging; ``logits`` is the views' mean logit
(``scores`` is not its softmax).

Collaborative-filtering models (fast.ai lesson 6's dot product with biases) give two graphs: one
scores every item for a batch of users, one predicts the rating of (user, item) pairs.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from export.errors import ConversionError
from export.manifest import IMAGE_TASKS, PRECISIONS

#: The dtype an image graph's model runs in, per ``export.manifest.PRECISIONS`` name.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def task_scores(task: str, logits: torch.Tensor) -> torch.Tensor:
    """Softmax (single_label), sigmoid (multi_label) or the output itself (regression)."""
    if task == "single_label":
        return torch.softmax(logits, dim=-1)
    if task == "multi_label":
        return torch.sigmoid(logits)
    # Regression heads already end in sigmoid_range: the raw output is the prediction.
    return logits


def unmirror_points(outputs: torch.Tensor) -> torch.Tensor:
    """(x1, y1, x2, y2, ...) predicted on a mirrored image, in the crop's [-1, 1] frame, back
    in the original image's frame: every x negated."""
    sign = torch.tensor([-1.0, 1.0], dtype=outputs.dtype, device=outputs.device)
    return (outputs.unflatten(-1, (-1, 2)) * sign).flatten(-2)


class FlipAverage(nn.Module):
    """Normalised NCHW → ``(scores, logits)`` averaged over ``TTA_VIEWS`` (one batch of 2N).

    points: the outputs are (x, y) pairs in the ``input_crop_normalised`` frame.
    """

    def __init__(self, model: nn.Module, task: str, points: bool = False) -> None:
        super().__init__()
        if points and task != "regression":
            raise ConversionError(f"task {task!r}: only regression outputs points")
        self.model = model
        self.task = task
        self.points = points

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Scores in float32 whatever the model's precision (a no-op for an fp32 model).
        out = self.model(torch.cat([x, x.flip(-1)])).to(torch.float32)
        views = out.reshape(2, -1, out.shape[-1])  # no batch size in the graph: it stays dynamic
        direct, mirrored = views[0], views[1]
        if self.points:
            mirrored = unmirror_points(mirrored)
        scores = (task_scores(self.task, direct) + task_scores(self.task, mirrored)) / 2
        return scores, (direct + mirrored) / 2


class ImageExportWrapper(nn.Module):
    """uint8 ``images`` (N, H, W, 3) RGB → ``scores`` and ``logits`` of an eager image model.

    tta: average over ``TTA_VIEWS`` (``FlipAverage``); points: the regression outputs are points.
    precision: ``fp16`` runs a half-precision copy of the model on the normalised pixels (which
    are computed in fp32) and hands back float32 outputs, so the graph's inputs and outputs are
    the same as an fp32 graph's and no scorer changes.
    """

    def __init__(self, model: nn.Module, task: str, mean: Sequence[float],
                 std: Sequence[float], *, tta: bool = False, points: bool = False,
                 precision: str = "fp32") -> None:
        super().__init__()
        if task not in IMAGE_TASKS:
            raise ConversionError(f"task {task!r}: not an image task (one of {IMAGE_TASKS})")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ConversionError(
                f"preprocessing mean/std {list(mean)}/{list(std)}: need 3 values, std > 0")
        if precision not in PRECISIONS:
            raise ConversionError(f"precision {precision!r}: not one of {list(PRECISIONS)}")
        self.dtype = DTYPES[precision]
        if self.dtype != torch.float32:
            model = copy.deepcopy(model).to(self.dtype)  # .to() is in place: keep the caller's
        self.model = FlipAverage(model, task, points) if tta else model
        self.task = task
        self.tta = tta
        # Buffers, not Python floats, so the constants travel with the graph and the weights.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).to(torch.float32).div(255.0)
        x = ((x - self.mean) / self.std).to(self.dtype)
        if self.tta:
            return self.model(x)
        logits = self.model(x).to(torch.float32)  # softmax/sigmoid in fp32
        return task_scores(self.task, logits), logits


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
