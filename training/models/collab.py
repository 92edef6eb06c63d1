"""Collaborative-filtering models: biased matrix factorisation and its neural variant.

``DotProductBias`` is the model of fastbook chapter 8 ("Collaborative Filtering Deep Dive",
fastai's ``EmbeddingDotBias``), i.e. the biased latent-factor model of Koren, Bell & Volinsky,
"Matrix Factorization Techniques for Recommender Systems", IEEE Computer 2009:
``r̂(u, i) = sigmoid_range(p_u · q_i + b_u + b_i, y_range)``. ``CollabNN`` is fastai's
``EmbeddingNN``: concatenated user/item embeddings through an MLP.

Both take ``pairs`` = LongTensor (N, 2) of (user index, item index) and return (N,) ratings, and
``score_users(users)`` = (B, n_items) ratings of every item, with no data-dependent Python control
flow so TorchScript tracing and ONNX export see one graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from training.errors import TrainingError
from training.models.ranges import sigmoid_range


def embedding_size(n_categories: int) -> int:
    """fastai's rule of thumb for an embedding width: min(600, round(1.6 · n^0.56))."""
    return min(600, round(1.6 * n_categories**0.56))


def _embedding(n: int, width: int) -> nn.Embedding:
    emb = nn.Embedding(n, width)
    # fastai initialises embeddings with a truncated normal of std 0.01: small enough that the
    # first dot products sit in the sigmoid's linear part.
    nn.init.trunc_normal_(emb.weight, std=0.01, a=-0.02, b=0.02)
    return emb


@dataclass(frozen=True)
class CollabConfig:
    """What it takes to rebuild a model from its weights (stored as model.json / manifest)."""

    n_users: int
    n_items: int
    n_factors: int = 50
    y_range: tuple[float, float] = (0.0, 5.5)
    use_nn: bool = False
    nn_hidden: int = 100

    def to_dict(self) -> dict:
        return asdict(self) | {"y_range": list(self.y_range)}

    @classmethod
    def from_dict(cls, d: dict) -> CollabConfig:
        return cls(int(d["n_users"]), int(d["n_items"]), int(d.get("n_factors", 50)),
                   tuple(float(v) for v in d.get("y_range", (0.0, 5.5))),
                   bool(d.get("use_nn", False)), int(d.get("nn_hidden", 100)))


class DotProductBias(nn.Module):
    """Biased dot product of user and item factors through ``sigmoid_range(y_range)``."""

    def __init__(self, n_users: int, n_items: int, n_factors: int = 50,
                 y_range: tuple[float, float] = (0.0, 5.5)) -> None:
        super().__init__()
        _check_sizes(n_users, n_items, n_factors, y_range)
        self.n_users, self.n_items, self.n_factors = n_users, n_items, n_factors
        self.y_range = (float(y_range[0]), float(y_range[1]))
        self.user_factors = _embedding(n_users, n_factors)
        self.item_factors = _embedding(n_items, n_factors)
        self.user_bias = _embedding(n_users, 1)
        self.item_bias = _embedding(n_items, 1)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        users, items = pairs[:, 0], pairs[:, 1]
        dot = (self.user_factors(users) * self.item_factors(items)).sum(dim=1)
        raw = dot + self.user_bias(users).squeeze(1) + self.item_bias(items).squeeze(1)
        return sigmoid_range(raw, *self.y_range)

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        """(B,) user indices → (B, n_items) predicted ratings, one matmul for the whole block."""
        raw = self.user_factors(users) @ self.item_factors.weight.T
        raw = raw + self.user_bias(users) + self.item_bias.weight.T
        return sigmoid_range(raw, *self.y_range)

    def layer_groups(self) -> list[nn.Module]:
        return [self]

    def config(self) -> CollabConfig:
        return CollabConfig(self.n_users, self.n_items, self.n_factors, self.y_range, False)

    def item_biases(self) -> torch.Tensor:
        return self.item_bias.weight.detach().squeeze(1)


class CollabNN(nn.Module):
    """Concatenated user/item embeddings → Linear → ReLU → Linear → ``sigmoid_range``.

    ``score_users`` splits the first linear layer into its user and item halves
    (W·[u; i] = W_u·u + W_i·i), so a block of users costs two small matmuls plus a broadcast
    add instead of materialising every concatenated (user, item) pair.
    """

    def __init__(self, n_users: int, n_items: int, n_factors: int | None = None,
                 y_range: tuple[float, float] = (0.0, 5.5), hidden: int = 100) -> None:
        super().__init__()
        _check_sizes(n_users, n_items, n_factors or 1, y_range)
        self.n_users, self.n_items, self.hidden = n_users, n_items, hidden
        self.user_width = n_factors or embedding_size(n_users)
        self.item_width = n_factors or embedding_size(n_items)
        self.n_factors = n_factors or 0  # 0 = fastai's size rule
        self.y_range = (float(y_range[0]), float(y_range[1]))
        self.user_factors = _embedding(n_users, self.user_width)
        self.item_factors = _embedding(n_items, self.item_width)
        self.hidden_layer = nn.Linear(self.user_width + self.item_width, hidden)
        self.output_layer = nn.Linear(hidden, 1)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.user_factors(pairs[:, 0]), self.item_factors(pairs[:, 1])], dim=1)
        raw = self.output_layer(torch.relu(self.hidden_layer(x))).squeeze(1)
        return sigmoid_range(raw, *self.y_range)

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        w_user = self.hidden_layer.weight[:, : self.user_width]
        w_item = self.hidden_layer.weight[:, self.user_width:]
        h_user = self.user_factors(users) @ w_user.T  # (B, hidden)
        h_item = self.item_factors.weight @ w_item.T + self.hidden_layer.bias  # (n_items, hidden)
        h = torch.relu(h_user.unsqueeze(1) + h_item.unsqueeze(0))  # (B, n_items, hidden)
        raw = self.output_layer(h).squeeze(2)
        return sigmoid_range(raw, *self.y_range)

    def layer_groups(self) -> list[nn.Module]:
        return [self]

    def config(self) -> CollabConfig:
        return CollabConfig(self.n_users, self.n_items, self.n_factors, self.y_range, True,
                            self.hidden)


def _check_sizes(n_users: int, n_items: int, n_factors: int, y_range) -> None:
    if n_users < 1 or n_items < 1:
        raise TrainingError(f"need at least one user and one item, got {n_users} × {n_items}")
    if n_factors < 1:
        raise TrainingError(f"factors must be positive, got {n_factors}")
    if len(y_range) != 2 or not y_range[0] < y_range[1]:
        raise TrainingError(f"y_range must be (low, high) with low < high, got {tuple(y_range)}")


def create_collab_model(config: CollabConfig) -> DotProductBias | CollabNN:
    """The model a config describes (fresh weights)."""
    if config.use_nn:
        return CollabNN(config.n_users, config.n_items, config.n_factors or None,
                        config.y_range, config.nn_hidden)
    return DotProductBias(config.n_users, config.n_items, config.n_factors, config.y_range)


@dataclass(frozen=True)
class BiasRanking:
    """Items the model likes or dislikes regardless of who is watching (fastbook's reading)."""

    highest: tuple[tuple[str, float], ...]
    lowest: tuple[tuple[str, float], ...]

    def to_dict(self) -> dict:
        return {"highest_bias": [list(p) for p in self.highest],
                "lowest_bias": [list(p) for p in self.lowest]}


def rank_item_biases(model: DotProductBias, names: list[str], k: int = 5) -> BiasRanking:
    """Titles of the k items with the highest and lowest learned bias.

    A low bias means even users whose factors match the item rate it low: the model's reading of
    "generally disliked", beyond what genre or taste explain.
    """
    biases = model.item_biases().float()
    k = min(k, len(biases))
    top = torch.topk(biases, k).indices.tolist()
    bottom = torch.topk(-biases, k).indices.tolist()
    return BiasRanking(tuple((names[i], round(float(biases[i]), 4)) for i in top),
                       tuple((names[i], round(float(biases[i]), 4)) for i in bottom))
