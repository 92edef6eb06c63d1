"""Tiny eager models with the interfaces `export` receives from training, for fast export tests.

An image model maps normalised float NCHW to raw outputs; a collab model is fast.ai lesson 6's
dot product with user/item biases squashed into ``y_range`` by a scaled sigmoid.
"""

from __future__ import annotations

import torch
from torch import nn

PREPROCESSING = {
    "input_size": 32, "resize_size": 36, "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225], "interpolation": "bilinear",
}


class TinyCNN(nn.Module):
    """conv → batch-norm → ReLU → pool → linear; regression heads end in a sigmoid range."""

    def __init__(self, n_out: int = 4, y_range: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, n_out)
        self.y_range = y_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.body(x))
        if self.y_range is not None:
            lo, hi = self.y_range
            out = torch.sigmoid(out) * (hi - lo) + lo
        return out


class TinyCollab(nn.Module):
    """Dot product of user and item embeddings plus biases, in ``y_range``."""

    def __init__(self, n_users: int = 12, n_items: int = 9, n_factors: int = 5,
                 y_range: tuple[float, float] = (0.5, 5.5)) -> None:
        super().__init__()
        self.user_factors = nn.Embedding(n_users, n_factors)
        self.item_factors = nn.Embedding(n_items, n_factors)
        self.user_bias = nn.Embedding(n_users, 1)
        self.item_bias = nn.Embedding(n_items, 1)
        self.n_users, self.n_items, self.y_range = n_users, n_items, y_range

    def _squash(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.y_range
        return torch.sigmoid(x) * (hi - lo) + lo

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        users, items = pairs[:, 0], pairs[:, 1]
        dot = (self.user_factors(users) * self.item_factors(items)).sum(dim=1)
        return self._squash(dot + self.user_bias(users)[:, 0] + self.item_bias(items)[:, 0])

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        dot = self.user_factors(users) @ self.item_factors.weight.T
        return self._squash(dot + self.user_bias(users) + self.item_bias.weight.T)


def image_manifest(task: str = "single_label", n_out: int = 4) -> dict:
    classes = [f"class_{i}" for i in range(n_out)] if task != "regression" else []
    return {"task": task, "classes": classes, "preprocessing": dict(PREPROCESSING),
            "thresholds": 0.5 if task == "multi_label" else None,
            "y_range": [0.0, 1.0] if task == "regression" else None,
            "metrics": {"accuracy": 0.5}, "arch": "tiny_cnn"}


def collab_manifest(model: TinyCollab) -> dict:
    return {"task": "collab", "users": [f"u{i}" for i in range(model.n_users)],
            "items": [f"i{i}" for i in range(model.n_items)],
            "titles": [f"Item {i}" for i in range(model.n_items)],
            "y_range": list(model.y_range)}


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give batch-norm non-trivial running statistics, as a trained model has."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()
