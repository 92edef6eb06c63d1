"""A linear classifier fitted on cached body features: multinomial logistic regression, L2 toward
a prior, its strength chosen by cross-validation on the training samples.

This is the linear probe of the transfer-learning literature (Kornblith et al., "Do Better
ImageNet Models Transfer Better?", CVPR 2019; CLIP's evaluation protocol): full-batch L-BFGS on
``mean CE(features @ W.T + b) + l2 / 2 * ||W - W0||²``. With a prior ``W0`` (the start the
pretrained classifier suggests, ``training.models.head_init``) a strong ``l2`` keeps that start
and a weak one lets the data move it; the k-fold log loss on the training features chooses
between them, so a task whose classes ImageNet knows keeps what the classifier knew, and one it
does not (digits, textures, scans) gets a fitted head. It costs seconds on a few thousand
features, next to minutes for an epoch through the body.

Used as the head's start before fine-tuning (LP-FT: Kumar et al., "Fine-Tuning can Distort
Pretrained Features and Underperform Out-of-Distribution", ICLR 2022) and, without a prior, as
the quality suite's cheapest honest baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

#: L2 strengths tried, strongest first (each fit warm-starts from the one before).
L2_GRID = tuple(float(v) for v in torch.logspace(3, -5, 9))
#: Folds of the cross-validation that picks ``l2``.
FOLDS = 5
#: L-BFGS iterations per fit.
MAX_ITER = 100


@dataclass(frozen=True, eq=False)
class ProbeFit:
    """The fitted weight (C, F) and bias (C,), the ``l2`` chosen and every strength's CV loss."""

    weight: torch.Tensor
    bias: torch.Tensor
    l2: float
    cv_loss: dict[float, float]
    train_loss: float

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return linear_logits(features, self.weight, self.bias)

    def to_dict(self) -> dict:
        return {"l2": self.l2, "cv_loss": {f"{k:.0e}": round(v, 5)
                                           for k, v in self.cv_loss.items()},
                "train_loss": self.train_loss}


def linear_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
                  ) -> torch.Tensor:
    """A linear head's logits for pooled ``features`` (N, F): ``features @ weight.T + bias``."""
    return features.float().flatten(1) @ weight.T + bias


def _fit(x: torch.Tensor, y: torch.Tensor, l2: float, w0: torch.Tensor, b0: torch.Tensor,
         start: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    w = start[0].clone().requires_grad_(True)
    b = start[1].clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=MAX_ITER, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * (w - w0).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _folds(y: torch.Tensor, k: int, seed: int) -> list[torch.Tensor]:
    """Stratified fold ids: each class's samples dealt round-robin in a seeded order."""
    gen = torch.Generator().manual_seed(seed)
    fold = torch.empty_like(y)
    for c in y.unique():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        fold[idx] = torch.arange(len(idx)) % k
    return [fold == i for i in range(k)]


@torch.no_grad()
def _loss(x, y, w, b) -> float:
    return float(nn.functional.cross_entropy(x @ w.T + b, y))


def fit_linear_probe(features: torch.Tensor, targets: torch.Tensor, n_classes: int, *,
                     prior: tuple[torch.Tensor, torch.Tensor] | None = None,
                     l2_grid: tuple[float, ...] = L2_GRID, folds: int = FOLDS,
                     seed: int = 0) -> ProbeFit:
    """Logistic regression of ``targets`` (N,) on ``features`` (N, F), L2 toward ``prior``
    (weight, bias; default zero) with the strength of least ``folds``-fold log loss."""
    with torch.enable_grad():
        x = features.float().flatten(1)
        y = targets.long()
        if prior is None:
            w0, b0 = torch.zeros(n_classes, x.shape[1]), torch.zeros(n_classes)
        else:
            w0, b0 = prior[0].float(), prior[1].float()
        # Fewer samples of a class than folds: fit every strength on all, choose by train loss
        # (nothing better to go on), rather than folds that miss a class entirely.
        k = min(folds, int(torch.bincount(y, minlength=n_classes)[y.unique()].min()))
        cv = {}
        splits = _folds(y, k, seed) if k >= 2 else []
        starts = [(w0, b0)] * len(splits)
        for l2 in l2_grid:
            losses = []
            for i, held in enumerate(splits):
                starts[i] = _fit(x[~held], y[~held], l2, w0, b0, starts[i])
                losses.append(_loss(x[held], y[held], *starts[i]) * int(held.sum()))
            cv[l2] = sum(losses) / len(y) if splits else math.nan
        best = min(cv, key=lambda v: cv[v]) if splits else min(l2_grid)
        w, b = _fit(x, y, best, w0, b0, (w0, b0))
        return ProbeFit(w, b, best, cv, _loss(x, y, w, b))
