"""One-cycle vs SGDR, with vs without TTA: ants/bees and the pet head-centre points, one run.

    .venv/bin/python benchmarks/sgdr_tta.py [--tasks ants,pets] [--size 128] [--threads 2]

Per task, two ``lensflow train`` recipes that differ only in ``schedule`` — one-cycle against
SGDR with ``cycle_mult=2`` over the same number of epochs — and, from each run's
``metrics.json``, the validation metrics of the restored best epoch without and with TTA (the
centre crop and its mirror, the views a ``--tta`` bundle averages). Then the cost of TTA: the
eager forward time of the exported graph's module on the validation sample, with and without the
views. Ratios are within this one run; seconds vary with the machine's load.

- ants/bees (``shared/data/hymenoptera_data``, 245 train / 153 valid): tf_efficientnet_lite0,
  packaged weights, bs 32, 1 frozen + 3 unfrozen epochs (SGDR: cycles of 1 then 2), lr 5e-3.
- pets (``shared/data/oxford-iiit-pet-sample``, head centres as one point): the same backbone,
  1 frozen + 3 unfrozen epochs (SGDR: 1, 2), lr 1e-2, patience 0, precompute — the point recipe
  of docs/training.md cut from 15 unfrozen epochs to 3, so it stays far from its best MSE.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from export.wrappers import ImageExportWrapper  # noqa: E402
from training.data.regression import from_regression_csv  # noqa: E402
from training.models.checkpoint import load_image_model  # noqa: E402
from training.recipes.image import (  # noqa: E402
    OUTPUTS_FILE,
    VALID_SAMPLE_FILE,
    prepare_image_data,
    train_image_model,
)
from training.recipes.regression import train_regression_model  # noqa: E402
from training.recipes.training_output import read_json  # noqa: E402

COMMON = {"arch": "tf_efficientnet_lite0", "weights": "packaged", "bs": 32, "seed": 42}
TASKS = {
    "ants": {"train": {"freeze_epochs": 1, "epochs": 3, "lr": 5e-3},
             "metric": "accuracy", "higher": True},
    "pets": {"train": {"freeze_epochs": 1, "epochs": 3, "lr": 1e-2, "patience": 0,
                       "precompute": True},
             "metric": "mean_pixel_distance", "higher": False},
}
SCHEDULES = {"one_cycle": {}, "sgdr": {"schedule": "sgdr", "cycle_mult": 2}}


def shared_data() -> Path:
    return Path(os.environ.get("LENSFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


def prepare(task: str):
    if task == "ants":
        return prepare_image_data(shared_data() / "hymenoptera_data"), train_image_model
    pets = shared_data() / "oxford-iiit-pet-sample"
    data = from_regression_csv(pets / "derived" / "head_center.csv", pets,
                               points="center_x,center_y")
    return data, train_regression_model


def epoch_line(event: dict) -> None:
    if event["event"] == "epoch_end":
        print(f"  {event['stage']} epoch {event['epoch']} (cycle {event['cycle']}): valid_loss "
              f"{event['valid_loss']:.4f} {event['seconds']:.0f} s", file=sys.stderr, flush=True)


def tta_cost(out_dir: Path, repeats: int = 3) -> float:
    """Eager seconds of the TTA graph's module ÷ the plain one's, on the validation sample."""
    model, spec = load_image_model(out_dir)
    images = load_file(str(out_dir / VALID_SAMPLE_FILE))["images"]
    prep = spec.preprocessing
    targets = (read_json(out_dir / OUTPUTS_FILE) or {}).get("targets") or {}
    points = targets.get("kind") == "points"
    seconds = {}
    for tta in (False, True):
        module = ImageExportWrapper(model.eval(), spec.task, prep.mean, prep.std, tta=tta,
                                    points=points).eval()
        with torch.inference_mode():
            module(images)
            start = time.perf_counter()
            for _ in range(repeats):
                module(images)
        seconds[tta] = time.perf_counter() - start
    return seconds[True] / seconds[False]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="ants,pets")
    parser.add_argument("--schedules", default="one_cycle,sgdr",
                        help="run only these (the ratios need both)")
    parser.add_argument("--size", type=int, default=128, help="input side in pixels")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=None, help="keep training outputs here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {COMMON} size {args.size}; torch {torch.__version__}, {args.threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        base = args.out or Path(tmp)
        for task in args.tasks.split(","):
            spec = TASKS[task]
            data, recipe = prepare(task)
            metric, rows = spec["metric"], {}
            for name in args.schedules.split(","):
                schedule = SCHEDULES[name]
                start = time.perf_counter()
                result = recipe(data, base / task / name, size=args.size, **COMMON,
                                **spec["train"], **schedule, progress=epoch_line)
                m = result.metrics
                rows[name] = {"plain": m[metric], "tta": m["tta"][metric],
                              "seconds": time.perf_counter() - start,
                              "best_epoch": result.best_epoch}
                print(f"{task} {name:9s} {metric} {m[metric]:.4f}  with TTA "
                      f"{m['tta'][metric]:.4f}  best epoch {result.best_epoch}  "
                      f"wall {rows[name]['seconds']:.0f} s", flush=True)
            if len(rows) < 2:
                continue
            one, sgdr = rows["one_cycle"], rows["sgdr"]
            cost = tta_cost(base / task / "sgdr")
            wall = sgdr["seconds"] / one["seconds"]
            print(f"# {task}: sgdr/one_cycle {metric} {sgdr['plain'] / one['plain']:.3f}x "
                  f"(TTA {sgdr['tta'] / one['tta']:.3f}x), wall {wall:.2f}x;"
                  f" TTA/plain {metric} one_cycle {one['tta'] / one['plain']:.3f}x, sgdr "
                  f"{sgdr['tta'] / sgdr['plain']:.3f}x; TTA forward time {cost:.2f}x", flush=True)


if __name__ == "__main__":
    main()
