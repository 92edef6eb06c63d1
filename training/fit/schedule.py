"""Optimizer and one-cycle schedule for layer-grouped models: discriminative LRs, no wd on norms.

The 1cycle policy is Leslie Smith's (https://arxiv.org/abs/1803.09820) as fastai uses it: cosine
warm-up from ``lr_max / div`` to ``lr_max`` over ``pct_start`` of the steps, cosine anneal to
``lr_max / div_final``, with Adam's β1 cycling the other way (0.95 → 0.85 → 0.95). Discriminative
learning rates (Howard & Ruder, ULMFiT, https://arxiv.org/abs/1801.06146) spread LRs
geometrically from the earliest layer group to the head. Decoupled weight decay (AdamW,
https://arxiv.org/abs/1711.05101) is applied to weights only: BatchNorm/LayerNorm parameters and
biases go into their own param groups with ``weight_decay=0``.

SGDR (Loshchilov & Hutter, https://arxiv.org/abs/1608.03983; fast.ai 2017's
``fit(lr, n_cycles, cycle_len, cycle_mult)``) is the other schedule: each cycle starts at every
group's top LR and follows a cosine down to 0, the first cycle ``cycle_len`` epochs long and each
next one ``cycle_mult`` times longer; Adam's β1 stays at 0.9. ``CosineAnnealingWarmRestarts``
does the stepping, per batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts, OneCycleLR

from training.errors import TrainingError

# fastai's Adam defaults (mom=0.9 is replaced by the cycled β1; sqr_mom=0.99, eps=1e-5).
ADAM_BETA2 = 0.99
ADAM_EPS = 1e-5

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)

LrSpec = float | slice | Sequence[float]


def even_mults(start: float, stop: float, n: int) -> list[float]:
    """``n`` values from ``start`` to ``stop``, evenly spaced on a log scale (fastai's)."""
    if n == 1:
        return [float(stop)]
    step = (stop / start) ** (1 / (n - 1))
    return [float(start * step**i) for i in range(n)]


def lrs_per_group(lr_max: LrSpec, n_groups: int) -> list[float]:
    """One LR per layer group: a float for all, ``slice(lo, hi)`` geometric, or an explicit list.

    ``slice(hi)`` (no start) follows fastai: ``hi / 10`` for every group but the head.
    """
    if isinstance(lr_max, slice):
        hi = lr_max.stop
        if hi is None:
            raise TrainingError("lr_max slice needs a stop value, e.g. slice(1e-5, 1e-3)")
        if lr_max.start is None:
            lrs = [hi / 10] * (n_groups - 1) + [hi]
        else:
            lrs = even_mults(lr_max.start, hi, n_groups)
    elif isinstance(lr_max, (int, float)):
        lrs = [float(lr_max)] * n_groups
    else:
        lrs = [float(lr) for lr in lr_max]
        if len(lrs) != n_groups:
            raise TrainingError(
                f"lr_max has {len(lrs)} values but the model has {n_groups} layer groups"
            )
    if not all(math.isfinite(lr) and lr > 0 for lr in lrs):
        raise TrainingError(f"lr_max must be positive and finite, got {lrs}")
    return [float(lr) for lr in lrs]


def layer_groups_of(model: nn.Module) -> list[nn.Module]:
    """The model's ``layer_groups()`` (last is the head), or the whole model as one group."""
    if hasattr(model, "layer_groups"):
        groups = list(model.layer_groups())
        if not groups:
            raise TrainingError(f"{type(model).__name__}.layer_groups() returned no groups")
        return groups
    return [model]


def norm_param_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters owned by normalisation layers anywhere in ``model``."""
    return {
        id(p)
        for module in model.modules()
        if isinstance(module, NORM_TYPES)
        for p in module.parameters(recurse=False)
    }


def no_decay_param_ids(model: nn.Module) -> set[int]:
    """Normalisation parameters and biases, found by their place in the model itself.

    Layer groups may be views that hold parameters under other names (a ParameterList of
    loose parameters), so the model's own module tree decides, not the group's.
    """
    biases = {id(p) for name, p in model.named_parameters() if name.endswith("bias")}
    return norm_param_ids(model) | biases


def param_groups(model: nn.Module, lrs: Sequence[float], wd: float) -> list[dict]:
    """Two optimizer param groups per layer group (decay, no-decay), tagged with ``layer_group``.

    Groups stay in place even when empty (a frozen layer group), so param group ``2 * i`` is
    always layer group ``i`` and LRs can be reported per layer group in every stage.
    """
    groups = layer_groups_of(model)
    if len(lrs) != len(groups):
        raise TrainingError(f"{len(lrs)} learning rates for {len(groups)} layer groups")
    no_decay_ids = no_decay_param_ids(model)
    seen: set[int] = set()
    result = []
    for i, (group, lr) in enumerate(zip(groups, lrs, strict=True)):
        decay, no_decay = [], []
        for param in group.parameters():
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            (no_decay if id(param) in no_decay_ids else decay).append(param)
        result.append({"params": decay, "lr": lr, "weight_decay": wd, "layer_group": i})
        result.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "layer_group": i})
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise TrainingError(
            f"parameter {missing[0]!r} is in no layer group; layer_groups() must cover the model"
        )
    if not any(g["params"] for g in result):
        raise TrainingError("no trainable parameters: every layer group is frozen")
    return result


def make_optimizer(model: nn.Module, lrs: Sequence[float], wd: float, beta1: float = 0.9):
    """AdamW over ``param_groups(model, lrs, wd)`` with fastai's β2 and eps."""
    groups = param_groups(model, lrs, wd)
    return torch.optim.AdamW(groups, lr=lrs[-1], betas=(beta1, ADAM_BETA2), eps=ADAM_EPS)


def layer_group_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The current LR of each layer group (one per pair of param groups)."""
    lrs: dict[int, float] = {}
    for group in optimizer.param_groups:
        lrs.setdefault(group["layer_group"], float(group["lr"]))
    return [lrs[i] for i in sorted(lrs)]


def one_cycle(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    *,
    pct_start: float = 0.25,
    div: float = 25.0,
    div_final: float = 1e5,
    moms: tuple[float, float, float] = (0.95, 0.85, 0.95),
) -> OneCycleLR:
    """OneCycleLR whose per-group peak is each param group's current ``lr``.

    OneCycleLR starts at ``max_lr / div_factor`` and ends at ``initial_lr / final_div_factor``,
    so ``final_div_factor = div_final / div`` ends at ``max_lr / div_final`` as fastai does.
    """
    if not math.isclose(moms[0], moms[2]):
        raise TrainingError(f"moms must start and end at the same value, got {moms}")
    if not 0 < pct_start < 1:
        raise TrainingError(f"pct_start must be between 0 and 1, got {pct_start}")
    if total_steps < 1:
        raise TrainingError("the train loader is empty: no batches to schedule")
    # OneCycleLR peaks at step pct_start * total_steps - 1 and divides by it: a warm-up that
    # ends at step 0 raises ZeroDivisionError (4 steps at pct_start=0.25) and one that ends
    # before it skips the low start. Short schedules warm up for one step instead.
    if pct_start * total_steps < 2 and total_steps > 2:
        pct_start = 2 / total_steps
    return OneCycleLR(
        optimizer,
        max_lr=[float(g["lr"]) for g in optimizer.param_groups],
        total_steps=total_steps,
        pct_start=pct_start,
        anneal_strategy="cos",
        cycle_momentum=True,
        base_momentum=moms[1],
        max_momentum=moms[0],
        div_factor=div,
        final_div_factor=div_final / div,
    )


def sgdr_epochs(cycles: int, cycle_len: int, cycle_mult: int) -> int:
    """Epochs of ``cycles`` SGDR cycles: ``cycle_len * (1 + mult + mult² + ...)``."""
    return cycle_len * sum(cycle_mult**i for i in range(cycles))


@dataclass(frozen=True)
class Sgdr:
    """Cosine annealing with warm restarts: the first cycle ``cycle_len`` epochs, each next one
    ``cycle_mult`` times longer."""

    cycle_len: int = 1
    cycle_mult: int = 1

    def __post_init__(self) -> None:
        if self.cycle_len < 1 or self.cycle_mult < 1:
            raise TrainingError(f"SGDR cycle_len and cycle_mult must be whole numbers >= 1, "
                                f"got {self.cycle_len} and {self.cycle_mult}")

    def cycle_lengths(self, epochs: int) -> list[int]:
        """Epochs of each cycle of a stage ``epochs`` long, which must end a cycle."""
        lengths, total = [], 0
        while total < epochs:
            lengths.append(self.cycle_len * self.cycle_mult ** len(lengths))
            total += lengths[-1]
        if total != epochs:
            ends = [sgdr_epochs(k, self.cycle_len, self.cycle_mult)
                    for k in range(1, len(lengths) + 1)]
            raise TrainingError(
                f"{epochs} epochs end mid-cycle with cycle_len={self.cycle_len}, "
                f"cycle_mult={self.cycle_mult}: a stage must end a cycle "
                f"({', '.join(map(str, ends))} epochs do)")
        return lengths

    def cycle_of_epoch(self, epochs: int) -> list[int]:
        """The cycle (0, 1, ...) each epoch of a stage ``epochs`` long belongs to."""
        return [i for i, n in enumerate(self.cycle_lengths(epochs)) for _ in range(n)]

    def to_dict(self) -> dict:
        return {"schedule": "sgdr", "cycle_len": self.cycle_len, "cycle_mult": self.cycle_mult}


def sgdr_lr(lr_max: float, step: int, first_cycle_steps: int, cycle_mult: int) -> float:
    """The closed form: ``lr_max * (1 + cos(pi * t / T)) / 2`` at step ``t`` of its cycle of
    ``T`` steps (the reference the schedule is tested against)."""
    t, length = step, first_cycle_steps
    while t >= length:
        t, length = t - length, length * cycle_mult
    return lr_max * (1 + math.cos(math.pi * t / length)) / 2


def sgdr(optimizer: torch.optim.Optimizer, steps_per_epoch: int,
         schedule: Sgdr) -> CosineAnnealingWarmRestarts:
    """Per-batch warm restarts over each param group's current ``lr`` (discriminative LRs kept),
    annealing to 0."""
    if steps_per_epoch < 1:
        raise TrainingError("the train loader is empty: no batches to schedule")
    return CosineAnnealingWarmRestarts(optimizer, T_0=schedule.cycle_len * steps_per_epoch,
                                       T_mult=schedule.cycle_mult, eta_min=0.0)


def cycle_spans(history) -> list[dict]:
    """SGDR cycles of a run's epoch records: stage, cycle, first and last epoch of each
    (a restart happens at each ``first_epoch`` but a stage's first); [] under one-cycle."""
    spans: list[dict] = []
    for record in history:
        if record.cycle is None:
            continue
        last = spans[-1] if spans else None
        if last and (last["stage"], last["cycle"]) == (record.stage, record.cycle):
            last["last_epoch"] = record.epoch
        else:
            spans.append({"stage": record.stage, "cycle": record.cycle,
                          "first_epoch": record.epoch, "last_epoch": record.epoch})
    return spans
