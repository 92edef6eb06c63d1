"""Image loaders: datasets that decode and transform ``ImageItem``s, and the train/valid loaders.

Decoding runs in DataLoader worker processes (started from a forkserver, see
``export.loader_workers``) while the model trains; tiny sets decode in the main process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from export.loader_workers import worker_context
from export.pixels import Preprocessing
from training.data.images import ImageData, ImageItem
from training.data.transforms import (
    TRAIN_SCALE,
    decode_min_side,
    load_rgb,
    train_transform,
    valid_transform,
)
from training.errors import TrainingError

#: Below this many images, worker start-up costs more than decoding in the main process.
TINY_DATASET = 256


class ImageItemsDataset(Dataset):
    """Decodes `items` with `load_rgb` and applies `transform`; yields (image, target)."""

    def __init__(self, items: Sequence[ImageItem], transform, *, min_side: int | None = None):
        self.items = tuple(items)
        self.transform = transform
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.items[i]
        image = self.transform(load_rgb(item.path, min_side=self.min_side))
        if isinstance(item.label, int):
            return image, torch.tensor(item.label, dtype=torch.long)
        return image, torch.tensor(item.label, dtype=torch.float32)


@dataclass(frozen=True)
class Loaders:
    """Training (shuffled, augmented), validation, and plain training loaders.

    train_plain: the training items in order with the validation transform, for precomputing
    the frozen body's activations once.
    """

    train: DataLoader
    valid: DataLoader
    train_plain: DataLoader
    classes: tuple[str, ...]


def default_workers(n_images: int) -> int:
    """DataLoader worker processes: none for tiny sets, else up to 4."""
    return 0 if n_images < TINY_DATASET else min(4, os.cpu_count() or 1)


def build_image_loaders(
    data: ImageData,
    preprocessing: Preprocessing,
    *,
    bs: int = 32,
    workers: int | None = None,
    augment: bool = True,
    device_type: str = "cpu",
    seed: int = 42,
    dataset_cls: type[ImageItemsDataset] = ImageItemsDataset,
    train_scale: tuple[float, float] = TRAIN_SCALE,
    flip: bool = True,
) -> Loaders:
    """DataLoaders over `data` with the transforms of `preprocessing`.

    dataset_cls: how an item becomes (image, target), e.g. one that moves point targets with
    the image; train_scale, flip: the training crop's area range and the horizontal flip.
    """
    if bs < 1:
        raise TrainingError(f"bs must be at least 1, got {bs}")
    if workers is None:
        workers = default_workers(len(data.train) + len(data.valid))
    plain = valid_transform(preprocessing)
    plain_side = decode_min_side(preprocessing, train=False)
    if augment:
        train_ds = dataset_cls(data.train, train_transform(preprocessing, scale=train_scale,
                                                           flip=flip),
                               min_side=decode_min_side(preprocessing, train=True,
                                                        scale=train_scale))
    else:
        train_ds = dataset_cls(data.train, plain, min_side=plain_side)

    # Workers start from a forkserver, not by forking a process that may run Prefect's threads.
    context = worker_context(__name__, dataset_cls.__module__) if workers else None

    def loader(ds, *, shuffle=False, persistent=True, drop_last=False) -> DataLoader:
        return DataLoader(
            ds, batch_size=bs, shuffle=shuffle, num_workers=workers,
            persistent_workers=workers > 0 and persistent,
            pin_memory=device_type == "cuda", drop_last=drop_last,
            generator=torch.Generator().manual_seed(seed),
            multiprocessing_context=context,
        )

    return Loaders(
        # A ragged last batch of 1 breaks BatchNorm in train mode; fast.ai drops it too.
        train=loader(train_ds, shuffle=True, drop_last=len(data.train) > bs),
        valid=loader(dataset_cls(data.valid, plain, min_side=plain_side)),
        # Iterated once to precompute features: its workers need not outlive that pass.
        train_plain=loader(dataset_cls(data.train, plain, min_side=plain_side),
                           persistent=False),
        classes=data.classes,
    )
