"""The learning-rate range test (Smith, https://arxiv.org/abs/1506.01186) with fastai's suggestions.

``lr_find`` trains for up to ``num_it`` batches while the LR grows exponentially from
``start_lr`` to ``end_lr``, records the bias-corrected exponential moving average of the loss,
and stops once it exceeds four times its minimum. It then puts everything back: weights,
buffers (BatchNorm running statistics), gradients, train/eval modes, the GradScaler and every RNG,
so a later fit runs exactly as if the finder had never run.

The suggestions follow fastai 2.x (``fastai/callback/schedule.py``): ``valley`` (about two
thirds down the longest valley, the default), ``steep`` (steepest descent), ``minimum`` (the LR
of the lowest loss ÷ 10) and ``slide`` (the interval slide rule), all computed on the curve
without its first ``num_it // 10`` and last 5 points.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from training.errors import TrainingError
from training.fit.learner import Learner
from training.fit.schedule import layer_groups_of, make_optimizer

SKIP_END = 5


@dataclass(frozen=True)
class LRFinderResult:
    """The sweep (LR per batch, smoothed loss) and the suggested LRs by method name."""

    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    suggestions: dict[str, float]
    chosen: str = "valley"
    #: Iterations the sweep was planned for (it stops early once the loss diverges).
    num_it: int | None = None

    @property
    def suggestion(self) -> float:
        return self.suggestions[self.chosen]

    def to_dict(self) -> dict:
        return {
            "lrs": list(self.lrs),
            "losses": list(self.losses),
            "suggestions": dict(self.suggestions),
            "chosen": self.chosen,
            "suggestion": self.suggestion,
            "num_it": self.num_it,
        }


def suggest_valley(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """fastai's valley: two thirds of the way down the longest decreasing run of the loss.

    The run is the longest strictly decreasing subsequence; its bounds are updated exactly as
    fastai's loop does (inside the inner loop), so the suggestions agree with fastai's.
    """
    n = len(losses)
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end, max_start = i, i - lds[i]
    sections = (max_end - max_start) / 3
    idx = max(0, max_start + int(sections) + int(sections / 2))
    return float(lrs[idx])


def suggest_steep(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The LR where the loss falls fastest per unit of log LR."""
    grads = np.diff(np.asarray(losses)) / np.diff(np.log(np.asarray(lrs)))
    return float(lrs[int(np.argmin(grads))])


def suggest_minimum(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """One tenth of the LR at the lowest loss."""
    return float(lrs[int(np.argmin(losses))]) / 10


def suggest_slide(
    lrs: Sequence[float],
    losses: Sequence[float],
    lr_diff: int = 15,
    thresh: float = 0.005,
    adjust_value: float = 1.0,
) -> float:
    """fastai's interval slide rule: slide a window of ``lr_diff`` points left from the end until
    the loss gradient at both of its ends agrees within ``thresh``; take the window's left LR."""
    grads = np.gradient(np.asarray(losses, dtype=float))
    lr_diff = min(lr_diff, len(losses) - 1)
    right = len(losses) - 1
    left = right - lr_diff
    local_min_lr = lrs[left]
    while left >= 0 and abs(grads[right] - grads[left]) > thresh:
        local_min_lr = lrs[left]
        right, left = right - 1, left - 1
    return float(local_min_lr) * adjust_value


SUGGESTERS: dict[str, Callable[[Sequence[float], Sequence[float]], float]] = {
    "valley": suggest_valley,
    "steep": suggest_steep,
    "minimum": suggest_minimum,
    "slide": suggest_slide,
}


def suggest_all(lrs: Sequence[float], losses: Sequence[float], num_it: int) -> dict[str, float]:
    """Every suggestion, on the curve trimmed as fastai trims it (falling back to all of it)."""
    if len(losses) < 3:
        raise TrainingError(
            f"lr_find: the loss diverged after {len(losses)} batches (lr={lrs[-1]:.3g} at most); "
            "lower start_lr"
        )
    lo, hi = num_it // 10, len(losses) - SKIP_END
    if hi - lo < 3:
        lo, hi = 0, len(losses)
    lrs, losses = list(lrs[lo:hi]), list(losses[lo:hi])
    return {name: fn(lrs, losses) for name, fn in SUGGESTERS.items()}


class TrainingState:
    """Everything a sweep can change, copied so it can be put back bit for bit."""

    def __init__(self, learner: Learner) -> None:
        self.modules = [learner.model, learner.train_module]
        self.weights = [
            {k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.modules
        ]
        params = [p for m in self.modules for p in m.parameters()]
        self.grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in params]
        self.modes = [(m, m.training) for root in self.modules for m in root.modules()]
        self.scaler = learner.scaler.state_dict() if learner.scaler.is_enabled() else None
        self.skipped_steps = learner.skipped_steps
        self.torch_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.numpy_rng = np.random.get_state()
        self.python_rng = random.getstate()

    def restore(self, learner: Learner) -> None:
        for module, weights in zip(self.modules, self.weights, strict=True):
            module.load_state_dict(weights)
        for param, grad in self.grads:
            param.grad = grad
        for module, training in self.modes:
            module.training = training
        if self.scaler is not None:
            learner.scaler.load_state_dict(self.scaler)
        learner.skipped_steps = self.skipped_steps
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        np.random.set_state(self.numpy_rng)
        random.setstate(self.python_rng)


def _batches(loader, n: int) -> Iterator:
    """``n`` batches, going through ``loader`` again as often as needed."""
    seen = 0
    while True:
        before = seen
        for batch in loader:
            yield batch
            seen += 1
            if seen >= n:
                return
        if seen == before:
            raise TrainingError("lr_find: the train loader yields no batches")


def _sweep(learner, start_lr, end_lr, num_it, beta, stop_div) -> tuple[list[float], list[float]]:
    module = learner.train_module
    opt = make_optimizer(module, [start_lr] * len(layer_groups_of(module)), learner.wd)
    mult = (end_lr / start_lr) ** (1 / max(num_it - 1, 1))
    learner.set_train_mode(True)
    learner.emit(event="lr_find_start", iterations=num_it)
    lrs, losses, avg, best = [], [], 0.0, math.inf
    for it, (x, y) in enumerate(_batches(learner.train_loader, num_it)):
        lr = start_lr * mult**it
        for group in opt.param_groups:
            group["lr"] = lr
        loss, _ = learner.train_step(learner.to_device(x), learner.to_device(y), opt)
        if not math.isfinite(loss):
            break
        avg = beta * avg + (1 - beta) * loss
        smoothed = avg / (1 - beta ** (it + 1))
        lrs.append(lr)
        losses.append(smoothed)
        learner.emit(event="lr_find", iteration=it, lr=lr, loss=smoothed)
        best = min(best, smoothed)
        if stop_div and smoothed > 4 * best:
            break
    return lrs, losses


def lr_find(
    learner: Learner,
    start_lr: float = 1e-7,
    end_lr: float = 10,
    num_it: int = 100,
    beta: float = 0.98,
    stop_div: bool = True,
    *,
    suggestion: str = "valley",
) -> LRFinderResult:
    """Sweep the LR over the module being fitted; leave model, optimizer and RNGs untouched.

    suggestion: which method ``result.suggestion`` returns (valley | steep | minimum | slide).
    """
    if suggestion not in SUGGESTERS:
        raise TrainingError(f"lr_find suggestion must be one of {list(SUGGESTERS)}, got "
                            f"{suggestion!r}")
    if not 0 < start_lr < end_lr:
        raise TrainingError(f"lr_find needs 0 < start_lr < end_lr, got {start_lr}, {end_lr}")
    state = TrainingState(learner)
    try:
        lrs, losses = _sweep(learner, start_lr, end_lr, num_it, beta, stop_div)
    finally:
        state.restore(learner)
    if not losses:
        raise TrainingError(f"lr_find: the loss was not finite at start_lr={start_lr:g}")
    return LRFinderResult(
        lrs=tuple(lrs),
        losses=tuple(losses),
        suggestions=suggest_all(lrs, losses, num_it),
        chosen=suggestion,
        num_it=num_it,
    )
