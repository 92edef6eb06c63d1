"""A model trained the way a team without lensflow trains one: plain PyTorch, timm's own
eval transform, ``torch.save(model.state_dict())``. No lensflow code is imported here.

The images' shorter side is the transform's resize side, so its ``Resize`` is the identity and
the pixels the model sees are exactly lensflow's; the centre crop still cuts (the images are
not square).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch.nn import functional as F

ARCH = "test_resnet"  # timm's own tiny ResNet for tests: 0.37 M parameters
INPUT_SIZE = 32
RESIZE_SIZE = 33  # timm's floor(32 / crop_pct 0.95)
CLASSES = ("red", "blue")


def make_tinted_images(folder: Path, per_class: int, *, seed: int = 0,
                       by_class: bool = True) -> list[Path]:
    """Noise tinted red or blue, shorter side ``RESIZE_SIZE``, landscape and portrait."""
    rng = np.random.default_rng(seed)
    files = []
    for c, name in enumerate(CLASSES):
        target = folder / name if by_class else folder
        target.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            long = int(rng.integers(RESIZE_SIZE, 2 * RESIZE_SIZE))
            h, w = (RESIZE_SIZE, long) if i % 2 else (long, RESIZE_SIZE)
            pixels = rng.integers(0, 160, (h, w, 3))
            pixels[..., 0 if c == 0 else 2] += 95
            path = target / f"{name}_{seed}_{i:03d}.png"
            Image.fromarray(pixels.astype(np.uint8)).save(path)
            files.append(path)
    return sorted(files)


def eval_transform(model: torch.nn.Module):
    """timm's eval transform of ``model`` at ``INPUT_SIZE``: Resize, CenterCrop, Normalize."""
    return create_transform(**resolve_data_config({"input_size": (3, INPUT_SIZE, INPUT_SIZE)},
                                                  model=model))


def train_plain_model(folder: Path, *, steps: int = 15, seed: int = 0) -> torch.nn.Module:
    """A few full-batch SGD steps on the class folders under ``folder``; eval mode."""
    torch.manual_seed(seed)
    model = timm.create_model(ARCH, num_classes=len(CLASSES))
    transform = eval_transform(model)
    files = sorted(folder.rglob("*.png"))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in files])
    y = torch.tensor([CLASSES.index(p.parent.name) for p in files])
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def eager_probabilities(model: torch.nn.Module, files: list[Path]) -> np.ndarray:
    """Softmax of the model on each file through its own eval transform, in file order."""
    transform = eval_transform(model)
    with torch.no_grad():
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in files])
        return model(x).softmax(-1).numpy()


def predictions_by_name(partition: Path) -> dict[str, tuple[str, list[float]]]:
    """File name → (pred_label, probabilities in class order) from a committed partition."""
    table = ds.dataset(partition, format="parquet").to_table(
        columns=["path", "pred_label", "topk_labels", "topk_scores"]).to_pylist()
    rows = {}
    for row in table:
        scores = dict(zip(row["topk_labels"], row["topk_scores"], strict=True))
        rows[Path(row["path"]).name] = (row["pred_label"], [scores[c] for c in CLASSES])
    return rows


def assert_scored_like_eager(partition: Path, model: torch.nn.Module, files: list[Path],
                             atol: float = 1e-4, rtol: float = 1e-3) -> float:
    """Every file's Parquet top-1 is the eager top-1 and its probabilities are within the
    parity tolerances; returns the largest probability difference."""
    rows = predictions_by_name(partition)
    eager = eager_probabilities(model, files)
    assert sorted(rows) == sorted(p.name for p in files)
    labels = [rows[p.name][0] for p in files]
    assert labels == [CLASSES[i] for i in eager.argmax(1)]
    scored = np.array([rows[p.name][1] for p in files])
    np.testing.assert_allclose(scored, eager, atol=atol, rtol=rtol)
    return float(np.abs(scored - eager).max())
