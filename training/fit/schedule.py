"""Optimizer and one-cycle schedule for layer-grouped models: discriminative LRs, no wd on norms.

The 1cycle policy is Leslie Smith's (https://arxiv.org/abs/1803.09820) as fastai uses it: cosine
warm-up from ``lr_max / div`` to ``lr_max`` over ``pct_start`` of the steps, cosine anneal to
``lr_max / div_final``, with Adam's β1 cycling the other way (0.95 → 0.85 → 0.95). Discriminative
learning rates (Howard & Ruder, ULMFiT, https://arxiv.org/abs/1801.06146) spread LRs
geometrically from the earliest layer group to the head. Decoupled weight decay (AdamW,
https://arxiv.org/abs/1711.05101) is applied to weights only: BatchNorm/LayerNorm parameters and
biases go into their own param groups with ``weight_decay=0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR

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
