"""Which LR-finder rule should ``lr="auto"`` apply? Every rule on the cached-feature head sweep,
and full default trainings for the candidates you name.

    .venv/bin/python benchmarks/lr_rules.py [--runs auto auto-typed valley_x2 ...] [--threads 2]

Setup: ants/bees (``shared/data/hymenoptera_data``), ``tf_efficientnet_lite0 --weights packaged``,
224 px, bs 32, 1 frozen + 3 unfrozen epochs, seed 42: the recipe's defaults. First it runs the
frozen stage's head sweep exactly as ``fine_tune(base_lr="auto")`` does (same model, loaders,
seeds; ``training.fit.head_sweep.lr_find_head``) and prints each rule's head LR. Then, per name
in ``--runs``, one full ``train_image_model``: ``auto`` (the finder inside the run), or a rule's
head LR typed as a number (halved after unfreezing, like ``auto``). ``auto-typed`` is the LR
``auto`` picks, typed: the ratio of the ``auto`` run's wall time to it is automatic LR's cost.
Each full run takes minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.data.image_loaders import build_image_loaders  # noqa: E402
from training.evaluation import metrics  # noqa: E402
from training.fit.fine_tune import AUTO_RULE  # noqa: E402
from training.fit.head_sweep import lr_find_head  # noqa: E402
from training.fit.learner import Learner  # noqa: E402
from training.models.backbones import create_model  # noqa: E402
from training.recipes.image import prepare_image_data, train_image_model  # noqa: E402
from training.recipes.options import ImageTrainOptions  # noqa: E402

SETUP = {"arch": "tf_efficientnet_lite0", "weights": "packaged", "size": 224, "bs": 32,
         "freeze_epochs": 1, "epochs": 3, "seed": 42, "device": "cpu"}


def shared_data() -> Path:
    return Path(os.environ.get("LENSFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


def head_sweep(data, options: ImageTrainOptions):
    """The frozen stage's cached-feature sweep, set up as ``train_image_model`` sets it up."""
    torch.manual_seed(options.seed)
    model, prep = create_model(options.arch, len(data.classes), options.weights,
                               input_size=options.size)
    loaders = build_image_loaders(data, prep, bs=options.bs, workers=options.workers,
                                  seed=options.seed)
    learner = Learner(model, loaders.train, loaders.valid, nn.CrossEntropyLoss(),
                      {"accuracy": metrics.accuracy}, device=options.device, seed=options.seed)
    learner.freeze()
    start = time.perf_counter()
    result = lr_find_head(learner, loaders.train_plain)
    return result, time.perf_counter() - start


def rules(suggestions: dict[str, float]) -> dict[str, float]:
    """The four fastai rules and simple combinations of them."""
    s = suggestions
    return {
        **s,
        "geomean_valley_slide": math.sqrt(s["valley"] * s["slide"]),
        "geomean_valley_minimum": math.sqrt(s["valley"] * s["minimum"]),
        "geomean_valley_steep": math.sqrt(s["valley"] * s["steep"]),
        "valley_x2": 2 * s["valley"],
        "valley_x3": 3 * s["valley"],
        "valley_x0.5": 0.5 * s["valley"],
    }


def full_run(data, name: str, lr, options: ImageTrainOptions) -> dict:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = train_image_model(data, out, options, lr=lr)
        wall = time.perf_counter() - start
        history = json.loads((Path(out) / "history.json").read_text())
    choice = history.get("lr_choice", {})
    return {"name": name, "lr": lr, "accuracy": result.metrics["accuracy"],
            "valid_loss": result.metrics["valid_loss"], "best_epoch": result.best_epoch,
            "wall_s": wall, "epoch_s": result.seconds,
            "stage_lrs": {k: v.get("lr") for k, v in choice.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", default=[],
                        help="full trainings: auto, auto-typed, or a rule name from the table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = prepare_image_data(shared_data() / "hymenoptera_data")
    options = ImageTrainOptions(**SETUP)
    sweep, sweep_s = head_sweep(data, options)
    table = rules(sweep.suggestions)
    print(f"# ants/bees: {len(data.train)} train / {len(data.valid)} valid; "
          f"{options.arch} ({options.weights}), {options.size}px, bs {options.bs}, "
          f"{options.freeze_epochs}+{options.epochs} epochs; {args.threads} threads")
    print(f"# head sweep on cached features: {len(sweep.lrs)} of {sweep.num_it} iterations, "
          f"{sweep_s:.1f} s (feature cache included); auto = {AUTO_RULE}, halved after "
          "unfreezing")
    print(f"{'rule':<24} {'head LR':>10}")
    for name, lr in table.items():
        print(f"{name:<24} {lr:>10.3g}")

    runs = []
    for name in args.runs:
        if name == "auto":
            lr = "auto"
        elif name == "auto-typed":
            lr = table[AUTO_RULE]
        elif name in table:
            lr = table[name]
        else:
            lr = float(name)
        runs.append(full_run(data, name, lr, options))
        r = runs[-1]
        print(f"run {r['name']:<22} lr {r['lr']!s:>22}  accuracy {r['accuracy']:.4f}  "
              f"valid_loss {r['valid_loss']:.4f}  best_epoch {r['best_epoch']}  "
              f"wall {r['wall_s']:.1f} s  epochs {r['epoch_s']:.1f} s  "
              f"stage LRs {r['stage_lrs']}", flush=True)
    walls = {r["name"]: r["wall_s"] for r in runs}
    if "auto" in walls and "auto-typed" in walls:
        print(f"auto / auto-typed wall time: {walls['auto'] / walls['auto-typed']:.3f} "
              f"(automatic LR costs {walls['auto'] / walls['auto-typed'] - 1:.1%})")
    if args.json:
        args.json.write_text(json.dumps({"suggestions": table, "sweep_iterations":
                                         len(sweep.lrs), "sweep_s": sweep_s, "runs": runs},
                                        indent=2))


if __name__ == "__main__":
    main()
