"""Time one frozen epoch with and without precomputed body activations, on the same data.

Real run: ``tf_efficientnet_lite0`` with packaged ImageNet weights on ants/bees
(``shared/data/hymenoptera_data``) through ``training.data.images`` loaders. If those pieces or the
data are missing it falls back to a small synthetic CNN on random images, and says so.

    .venv/bin/python benchmarks/precompute.py [--threads 2] [--bs 32] [--synthetic]

Without precompute a frozen epoch (fastai's ``train_bn=True``) decodes and augments every image,
runs the whole model forward and back through the body's BatchNorms, then validates. With
precompute the body runs once per image to fill the cache (reported separately), after which
an epoch is the head alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.evaluation.metrics import accuracy  # noqa: E402
from training.fit.learner import Learner  # noqa: E402
from training.fit.precompute import precomputed_body  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    return Path(os.environ.get("LENSFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


def real_setup(bs: int):
    """(model, train, valid, train_plain, description) for lite0 on ants/bees, or None."""
    root = shared_data() / "hymenoptera_data"
    try:
        from training.data import images as image_data
        from training.data.image_loaders import build_image_loaders
        from training.models.backbones import create_model
    except ImportError as err:
        print(f"# real setup unavailable ({err}); using the synthetic fallback")
        return None
    if not root.is_dir():
        print(f"# {root} not found; using the synthetic fallback")
        return None
    model, prep = create_model("tf_efficientnet_lite0", 2, "packaged")
    data = image_data.from_folder(root)
    loaders = build_image_loaders(data, prep, bs=bs)
    desc = (f"tf_efficientnet_lite0 (packaged) on ants/bees: {len(data.train)} train, "
            f"{len(data.valid)} valid images, {prep.input_size}px, bs={bs}")
    return model, loaders.train, loaders.valid, loaders.train_plain, desc


class SyntheticCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        def block(i, o):
            return [nn.Conv2d(i, o, 3, stride=2, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
        self.body = nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 128),
                                  *block(128, 256), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(256, 2))

    def layer_groups(self):
        return [self.body[:6], self.body[6:], self.head]

    def forward(self, x):
        return self.head(self.body(x))


def synthetic_setup(bs: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(384, 3, 128, 128, generator=g)
    y = torch.randint(0, 2, (384,), generator=g)
    train = TensorDataset(x[:256], y[:256])
    valid = TensorDataset(x[256:], y[256:])
    return (SyntheticCNN(), DataLoader(train, batch_size=bs, shuffle=True, drop_last=True),
            DataLoader(valid, batch_size=bs), DataLoader(train, batch_size=bs),
            f"synthetic CNN, 256 train / 128 valid random 128px images, bs={bs}")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bs", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="precomputed epochs to average")
    parser.add_argument("--synthetic", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    setup = None if args.synthetic else real_setup(args.bs)
    model, train, valid, plain, desc = setup or synthetic_setup(args.bs)
    print(f"# {desc}; {args.threads} threads; device auto")
    torch.manual_seed(0)
    learner = Learner(model, train, valid, nn.CrossEntropyLoss(), {"accuracy": accuracy}, seed=0)
    learner.fit_one_cycle(1, 1e-3)  # warm-up: first-call costs (imports, allocator, workers)

    learner.freeze()  # the usual frozen stage: BatchNorm affines train, the body runs each epoch
    without = timed(lambda: learner.fit_one_cycle(1, 1e-3, stage="frozen"))

    with_cache = {}
    def cache_and_fit():
        with precomputed_body(learner, plain):
            with_cache["ready"] = time.perf_counter()
            learner.fit_one_cycle(args.epochs, 1e-3, stage="frozen-precomputed")
    start = time.perf_counter()
    cache_and_fit()
    end = time.perf_counter()
    cache = with_cache["ready"] - start
    per_epoch = (end - with_cache["ready"]) / args.epochs

    print(f"frozen epoch without precompute: {without:8.3f} s")
    print(f"feature cache (one-time):        {cache:8.3f} s")
    print(f"frozen epoch with precompute:    {per_epoch:8.3f} s  (mean of {args.epochs})")
    print(f"ratio per frozen epoch:          {without / per_epoch:8.1f}x")
    print(f"ratio, first epoch incl. cache:  {without / (cache + per_epoch):8.1f}x")
    acc = learner.history[-1].metrics.get("accuracy")
    print(f"# last precomputed epoch: valid_loss {learner.history[-1].valid_loss:.4f}, "
          f"accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
