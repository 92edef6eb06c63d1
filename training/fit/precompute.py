"""Precomputed body activations: train the head of a frozen model on cached features.

fast.ai v0.7's ``precompute=True`` (lesson 1-3): while the body is frozen its output for a given
image never changes, so compute it once — the validation set always, the training set from an
un-augmented loader — and fit the head on the cache. A frozen epoch then costs a pass through
the head alone. The body is fully frozen and in eval mode (BatchNorm affines not trained, running
statistics not updated: ``train_bn=False``), which is exactly what the cache assumes. The head is
trained in place, so when the context ends the model holds the trained head.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from training.errors import TrainingError
from training.fit.learner import EpochRecord, Learner
from training.fit.schedule import LrSpec, layer_groups_of


class HeadOnFeatures(nn.Module):
    """The head as the module being fitted; empty stand-ins keep the model's layer-group count,
    so LRs are specified and reported per group exactly as without precompute."""

    def __init__(self, head: nn.Module, n_groups: int) -> None:
        super().__init__()
        self.head = head
        self.n_groups = n_groups

    def layer_groups(self) -> list[nn.Module]:
        return [nn.Identity() for _ in range(self.n_groups - 1)] + [self.head]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    """Caching must not shift the random streams the fit would see (shuffles, dropout)."""
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    py_state = random.getstate()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)


def _in_dataset_order(loader):
    """The same data unshuffled and complete, so the cache holds every sample in dataset order
    and the head's own shuffles pick the same samples a fit through the body would."""
    if not (isinstance(loader, DataLoader) and isinstance(loader.sampler, RandomSampler)
            and loader.batch_size is not None):
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context)


@torch.no_grad()
def compute_features(learner: Learner, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """``model.body`` outputs (CPU) and targets for every batch of ``loader``, body in eval mode.

    On the first batch it checks that ``model(x) == model.head(model.body(x))``, because the
    cache is only valid for models that compose that way. Emits ``features_start`` and one
    ``features`` event per batch, so a progress bar can follow the body pass.
    """
    model = learner.model
    model.eval()
    features, targets = [], []
    ordered = _in_dataset_order(loader)
    try:
        batches = len(ordered)
    except TypeError:
        batches = None
    learner.emit(event="features_start", batches=batches)
    with _rng_preserved():
        for i, (x, y) in enumerate(ordered):
            x = learner.to_device(x)
            with learner.autocast():
                body_out = model.body(x)
                if i == 0:
                    _check_composition(model, x, body_out)
            features.append(body_out.detach().cpu())
            targets.append(y.cpu() if isinstance(y, torch.Tensor) else torch.as_tensor(y))
            learner.emit(event="features", batch=i)
    if not features:
        raise TrainingError("precompute: a loader to cache yielded no batches")
    return torch.cat(features), torch.cat(targets)


def _check_composition(model: nn.Module, x: torch.Tensor, body_out: torch.Tensor) -> None:
    full, composed = model(x).float(), model.head(body_out).float()
    if full.shape != composed.shape or not torch.allclose(full, composed, rtol=1e-2, atol=1e-3):
        raise TrainingError(
            f"precompute needs model(x) == model.head(model.body(x)), which "
            f"{type(model).__name__} does not satisfy; train with precompute=False"
        )


class _FeatureBatches(torch.utils.data.Dataset):
    """Indexable by a list of indices, so a whole batch is one tensor gather (no collation)."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        self.features, self.targets = features, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index):
        return self.features[index], self.targets[index]


def feature_loader(features, targets, batch_size: int, *, shuffle: bool, drop_last: bool):
    """Batches of cached features; shuffling draws from the global torch RNG like DataLoader's."""
    data = _FeatureBatches(features, targets)
    order = RandomSampler(data) if shuffle else SequentialSampler(data)
    return DataLoader(data, sampler=BatchSampler(order, batch_size, drop_last), batch_size=None)


def require_body_and_head(model: nn.Module) -> None:
    if not (isinstance(getattr(model, "body", None), nn.Module)
            and isinstance(getattr(model, "head", None), nn.Module)):
        raise TrainingError(
            f"precompute needs a model with .body and .head modules; {type(model).__name__} "
            "has not; train with precompute=False"
        )


@contextlib.contextmanager
def precomputed_body(learner: Learner, train_loader=None,
                     features: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> Iterator[Learner]:
    """Freeze the body (``train_bn=False``), cache its outputs, and fit the head on them.

    train_loader: an un-augmented loader over the training set (default: the learner's own,
    whose augmentations are then baked into the cache once). Batch size and ``drop_last`` of
    the head's loader follow the learner's train loader; it always shuffles. features: that
    loader's body features in dataset order, when the caller computed them already (the head's
    start reads the same): used instead of a second body pass if they cover every sample.
    """
    model = learner.model
    require_body_and_head(model)
    learner.freeze(train_bn=False)
    loader = train_loader or learner.train_loader
    if features is not None and len(features[1]) == dataset_size(loader):
        train_x, train_y = features
    else:
        train_x, train_y = compute_features(learner, loader)
    valid = learner.valid_loader
    like = learner.train_loader
    batch_size = getattr(like, "batch_size", None) or 64
    train_cache = feature_loader(train_x, train_y, batch_size, shuffle=True,
                                 drop_last=bool(getattr(like, "drop_last", False)))
    valid_cache = None
    if valid is not None:
        valid_x, valid_y = compute_features(learner, valid)
        valid_bs = getattr(valid, "batch_size", None) or batch_size
        valid_cache = feature_loader(valid_x, valid_y, valid_bs, shuffle=False, drop_last=False)
    head = HeadOnFeatures(model.head, len(layer_groups_of(model)))
    with learner.substitute(head, train_cache, valid_cache):
        yield learner


def dataset_size(loader) -> int | None:
    """Samples in ``loader``'s dataset, or None when it has no sized dataset."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def fit_head_precomputed(
    learner: Learner, epochs: int, lr_max: LrSpec, *, train_loader=None, **fit_kwargs
) -> list[EpochRecord]:
    """``fit_one_cycle`` of the head on cached body features; see ``precomputed_body``."""
    with precomputed_body(learner, train_loader):
        return learner.fit_one_cycle(epochs, lr_max, **fit_kwargs)
