"""Validation with test-time augmentation: the views the exported TTA graph averages.

``export.wrappers.FlipAverage`` is the one definition of the views (the centre crop the
validation loader yields and its mirror) and of how point outputs come back from the mirror; here
it runs over the validation loader, so ``metrics.json`` reports what a TTA bundle will score.
The averaged scores are turned back into the form each task's evaluation reads: log-probabilities
for single_label (softmax of them gives the averaged probabilities back), logits of the averaged
probabilities for multi_label, the averaged outputs for regression.
"""

from __future__ import annotations

import torch

from export.manifest import TTA_VIEWS
from export.wrappers import FlipAverage
from training.fit.learner import Learner

#: Probabilities are clamped this far from 0 and 1 before their log or logit.
EPS = 1e-7


@torch.no_grad()
def tta_predict(learner: Learner, task: str, points: bool = False,
                loader=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs averaged over ``TTA_VIEWS`` and targets over ``loader`` (default: validation),
    on the CPU in the form ``Learner.predict`` gives them."""
    views = FlipAverage(learner.model, task, points).eval()
    preds, targets = [], []
    for x, y in learner.valid_loader if loader is None else loader:
        with learner.autocast():
            scores, _ = views(learner.to_device(x))
        preds.append(scores.float().cpu())
        targets.append(y.cpu())
    if not preds:
        return torch.empty(0), torch.empty(0)
    return as_outputs(task, torch.cat(preds)), torch.cat(targets)


def as_outputs(task: str, scores: torch.Tensor) -> torch.Tensor:
    """Averaged scores in the form the model's raw outputs take for ``task``."""
    if task == "single_label":
        return scores.clamp_min(EPS).log()
    if task == "multi_label":
        return torch.logit(scores, eps=EPS)
    return scores


def with_and_without_tta(plain: dict, tta: dict) -> dict:
    """``plain`` metrics with a ``tta`` block: every number of ``tta`` and the views."""
    numbers = {k: v for k, v in tta.items() if isinstance(v, int | float)
               and not isinstance(v, bool) and k != "n_valid"}
    return plain | {"tta": {"views": list(TTA_VIEWS), **numbers}}
