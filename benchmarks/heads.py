"""Linear head or fastai's head: which one learns ants/bees better in a few epochs.

One recipe run per head, everything else fixed: ``tf_efficientnet_lite0`` with packaged ImageNet
weights on ants/bees (``shared/data/hymenoptera_data``, 245 train / 153 valid images), 224 px,
bs 32, 1 frozen epoch then 3 unfrozen, early-stopping patience 2, and a fixed ``lr=5e-3`` so the
comparison does not depend on the LR finder. Prints validation accuracy, valid_loss and seconds
per head (metrics of the restored best epoch, as written to ``metrics.json``).

    .venv/bin/python benchmarks/heads.py [--heads linear,fastai] [--threads 2] [--out DIR]

Each run takes about 4–6 minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.recipes.image import prepare_image_data, train_image_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"arch": "tf_efficientnet_lite0", "weights": "packaged", "size": 224, "bs": 32,
            "freeze_epochs": 1, "epochs": 3, "patience": 2, "lr": 5e-3}


def shared_data() -> Path:
    return Path(os.environ.get("LENSFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


def run_head(prepared, head: str, out_dir: Path) -> dict:
    """Train once with ``head``; the restored best epoch's figures."""
    start = time.perf_counter()
    result = train_image_model(prepared, out_dir, head=head, **SETTINGS)
    wall = time.perf_counter() - start
    n_valid = result.metrics["n_valid"]
    accuracy = result.metrics["accuracy"]
    return {"head": head, "accuracy": accuracy, "correct": round(accuracy * n_valid),
            "n_valid": n_valid, "valid_loss": result.metrics["valid_loss"],
            "best_epoch": result.best_epoch, "fit_seconds": result.seconds, "wall_seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", default="linear,fastai", help="comma-separated head kinds")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=None, help="keep training outputs here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = shared_data() / "hymenoptera_data"
    if not root.is_dir():
        sys.exit(f"{root} not found: this benchmark needs the ants/bees data")
    prepared = prepare_image_data(root)
    print(f"# {SETTINGS} on {root}: {len(prepared.train)} train, {len(prepared.valid)} valid; "
          f"torch {torch.__version__}, {args.threads} threads")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = args.out or Path(tmp)
        for head in args.heads.split(","):
            row = run_head(prepared, head, base / head)
            rows.append(row)
            print(f"{head:7s} accuracy {row['accuracy']:.4f} ({row['correct']}/{row['n_valid']})"
                  f"  valid_loss {row['valid_loss']:.4f}  best epoch {row['best_epoch']}"
                  f"  fit {row['fit_seconds']:.0f} s  wall {row['wall_seconds']:.0f} s",
                  flush=True)
    if len(rows) == 2:
        a, b = rows
        diff = b["correct"] - a["correct"]
        print(f"# {b['head']} - {a['head']}: {diff:+d} correct images, valid_loss "
              f"{b['valid_loss'] - a['valid_loss']:+.4f}, time ratio "
              f"{b['wall_seconds'] / a['wall_seconds']:.2f}x")


if __name__ == "__main__":
    main()
