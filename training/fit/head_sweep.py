"""The frozen stage's LR range test, run on cached body features instead of images.

While the body is frozen, the finder only describes the head, so it can sweep the head alone
over the body's outputs: computed once from an un-augmented train loader (body in eval mode, as
``precompute`` caches them), or taken from ``precompute``'s own cache when that is active. A
head step on features costs next to nothing, so the sweep can afford hundreds of iterations
(``sweep_length``), cycling the cached batches, and the suggestion is the same with or without
``precompute``: both sweep the same features from the same random state.

The cost that remains is one forward pass of the body over at most ``MAX_CACHED`` training
samples (evenly spaced through the dataset, so a class-sorted folder stays balanced).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Subset

from training.fit.learner import Learner
from training.fit.lr_finder import LRFinderResult, TrainingState, lr_find
from training.fit.precompute import (
    HeadOnFeatures,
    compute_features,
    dataset_size,
    feature_loader,
    require_body_and_head,
)
from training.fit.schedule import layer_groups_of

#: Training samples whose features the sweep caches at most (one body pass over them).
MAX_CACHED = 4096
#: Fewest iterations: about 25 per decade of the default 1e-7..10 range, so the smoothed curve
#: (an EMA over ~50 steps) lags the LR by well under a decade.
MIN_ITERATIONS = 200
#: Passes over the cached batches a sweep makes when the data is large enough to need more
#: than ``MIN_ITERATIONS``: each sample is seen about once per decade of LR.
PASSES = 8
#: Most iterations: the cap on the head's share of the cost.
MAX_ITERATIONS = 1000


def sweep_length(n_batches: int) -> int:
    """Iterations of a head sweep over ``n_batches`` cached batches: ``PASSES`` passes, at least
    ``MIN_ITERATIONS`` and at most ``MAX_ITERATIONS``."""
    return int(min(MAX_ITERATIONS, max(MIN_ITERATIONS, PASSES * n_batches)))


def cached_subset(n: int, cap: int | None = None) -> torch.Tensor | None:
    """Indices of the samples to cache out of ``n`` (evenly spaced; at most ``cap``, default
    ``MAX_CACHED``), or None for all of them."""
    cap = MAX_CACHED if cap is None else cap
    if n <= cap:
        return None
    return torch.linspace(0, n - 1, cap).round().long().unique()


def _subset_loader(loader, indices: torch.Tensor | None):
    if indices is None or not isinstance(loader, DataLoader):
        return loader
    return DataLoader(Subset(loader.dataset, indices.tolist()), batch_size=loader.batch_size,
                      shuffle=False, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context)


def _batching(loader) -> tuple[int, bool]:
    """Batch size and ``drop_last`` of an image loader or of a cached-feature loader."""
    sampler = getattr(loader, "batch_sampler", None) or getattr(loader, "sampler", None)
    batch_size = getattr(loader, "batch_size", None) or getattr(sampler, "batch_size", None)
    drop_last = getattr(loader, "drop_last", False) or getattr(sampler, "drop_last", False)
    return batch_size or 64, bool(drop_last)


def _cache_loader(like, features: torch.Tensor, targets: torch.Tensor):
    """Shuffled batches of the cache, batched like the train loader ``like``."""
    batch_size, drop_last = _batching(like)
    return feature_loader(features, targets, batch_size, shuffle=True,
                          drop_last=drop_last and len(targets) > batch_size)


def train_features(learner: Learner, train_loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Body features and targets of (at most ``MAX_CACHED``) training samples, body in eval
    mode: ``precompute``'s cache when active, else one body pass over ``train_loader`` now."""
    if isinstance(learner.train_module, HeadOnFeatures):
        data = learner.train_loader.dataset
        indices = cached_subset(len(data.targets))
        if indices is None:
            return data.features, data.targets
        return data.features[indices], data.targets[indices]
    n = dataset_size(train_loader)
    subset = None if n is None else cached_subset(n)
    return compute_features(learner, _subset_loader(train_loader, subset))


def valid_features(learner: Learner) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Body features and targets of every validation sample (one body pass, body in eval mode),
    or None when there are none or more than ``MAX_CACHED``: the cache is then a sample, and
    whatever needs the whole set's outputs gets them from a validation pass instead."""
    loader = learner.valid_loader
    n = None if loader is None else dataset_size(loader)
    if not n or cached_subset(n) is not None:
        return None
    return compute_features(learner, loader)


def lr_find_head(
    learner: Learner,
    train_loader=None,
    *,
    num_it: int | None = None,
    suggestion: str = "valley",
    features: tuple[torch.Tensor, torch.Tensor] | None = None,
    **finder_kwargs,
) -> LRFinderResult:
    """The LR finder over the head alone, on cached body features; leaves everything as it was.

    train_loader: an un-augmented loader over the training set (default: the learner's own);
    while ``precompute`` is active its cache is used instead. num_it: default ``sweep_length``
    of the cached batches. features: ``train_features``' result when the caller already has it
    (the head's initialisation from the pretrained classifier reads the same cache).
    """
    model = learner.model
    require_body_and_head(model)
    like = learner.train_loader
    state = TrainingState(learner)  # caching puts the body in eval mode: undo that too
    try:
        if features is None or isinstance(learner.train_module, HeadOnFeatures):
            features = train_features(learner, train_loader or learner.train_loader)
        loader = _cache_loader(like, *features)
        head = learner.train_module if isinstance(learner.train_module, HeadOnFeatures) \
            else HeadOnFeatures(model.head, len(layer_groups_of(model)))
        with learner.substitute(head, loader, None):
            return lr_find(learner, num_it=num_it or sweep_length(len(loader)),
                           suggestion=suggestion, **finder_kwargs)
    finally:
        state.restore(learner)
