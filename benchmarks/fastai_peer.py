"""fastai 2.8's defaults on the items lensflow trained on: the peer rows of quality_suite.py.

    FASTAI_PYTHON benchmarks/fastai_peer.py SPEC.json OUT.json [--threads 2]

Runs in an interpreter that has fastai (not a lensflow dependency). SPEC holds the task
(``single_label`` | ``multi_label`` | ``points`` | ``collab``), the items with their labels and
split (images), size, bs and epochs. Images: ``vision_learner`` on timm's
``tf_efficientnet_lite0`` with lensflow's packaged ImageNet weights loaded into its body (fastai
cannot download any here), fastai's own head, ``Resize(size)`` + ``aug_transforms()``,
normalised as the weights expect, then ``fine_tune(epochs, freeze_epochs=...)`` at fastai's
default base LR (2e-3). Metrics are computed with lensflow's own metric functions on fastai's
validation predictions; multi-label at fastai's threshold, 0.5. Collab: fastbook chapter 8
(``collab_learner``, 50 factors, y_range (0, 5.5), ``fit_one_cycle(5, 5e-3, wd=0.1)``, bs 64) on
lensflow's split. Writes the metrics, seconds and LR as JSON to OUT.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from fastai.vision.all import (  # noqa: E402
    BCEWithLogitsLossFlat,
    ColSplitter,
    DataBlock,
    ImageBlock,
    MSELossFlat,
    MultiCategoryBlock,
    Normalize,
    PointBlock,
    Resize,
    aug_transforms,
    set_seed,
    tensor,
    vision_learner,
)

from training.evaluation import metrics  # noqa: E402
from training.models.packaged_weights import (  # noqa: E402
    packaged_lite0_state_dict,
    packaged_preprocessing,
)

FASTAI_BASE_LR = 2e-3


def image_frame(items: list[dict]) -> pd.DataFrame:
    return pd.DataFrame({"path": [i["path"] for i in items],
                         "label": [i["label"] for i in items],
                         "is_valid": [i["valid"] for i in items]})


def blocks(task: str):
    if task == "single_label":
        from fastai.vision.all import CategoryBlock
        return CategoryBlock(), lambda r: r["label"]
    if task == "multi_label":
        return MultiCategoryBlock(), lambda r: list(r["label"])
    return PointBlock, lambda r: tensor(r["label"], dtype=torch.float32).reshape(-1, 2)


def load_packaged_body(learn) -> None:
    """Fill the timm body with lensflow's packaged ImageNet weights (its classifier aside)."""
    body = learn.model[0].model
    state = {k: v for k, v in packaged_lite0_state_dict().items()
             if not k.startswith("classifier.")}
    missing, unexpected = body.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"packaged weights do not fit: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")


def train_images(spec: dict) -> dict:
    set_seed(spec["seed"], reproducible=True)
    task = spec["task"]
    frame = image_frame(spec["items"])
    y_block, get_y = blocks(task)
    prep = packaged_preprocessing()
    block = DataBlock(blocks=(ImageBlock, y_block), get_x=lambda r: r["path"], get_y=get_y,
                      splitter=ColSplitter("is_valid"), item_tfms=Resize(spec["size"]),
                      batch_tfms=[*aug_transforms(),
                                  Normalize.from_stats(list(prep.mean), list(prep.std))],
                      n_inp=1)
    dls = block.dataloaders(frame, bs=spec["bs"], num_workers=0)
    kwargs = {}
    if task == "multi_label":
        kwargs["loss_func"] = BCEWithLogitsLossFlat()
    elif task == "points":
        kwargs |= {"loss_func": MSELossFlat(), "y_range": (-1, 1), "n_out": 2}
    learn = vision_learner(dls, "tf_efficientnet_lite0", pretrained=False, normalize=False,
                           **kwargs)
    load_packaged_body(learn)
    start = time.perf_counter()
    learn.fine_tune(spec["epochs"], base_lr=FASTAI_BASE_LR, freeze_epochs=spec["freeze_epochs"])
    preds, targets = learn.get_preds(dl=dls.valid)
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "lr": f"{FASTAI_BASE_LR:.2e} (fastai default)"}
    if task == "single_label":
        out["accuracy"] = metrics.accuracy(preds, targets)
    elif task == "multi_label":
        out |= {"mean_average_precision": metrics.mean_average_precision(preds, targets),
                "f1_macro": metrics.f1_macro(preds, targets, 0.5, sigmoid=False),
                "threshold": 0.5}
    else:
        preds, targets = preds.reshape(len(preds), -1), targets.reshape(len(targets), -1)
        train_targets = torch.cat([y.reshape(len(y), -1) for _, y in
                                   dls.test_dl(frame[~frame.is_valid], with_labels=True)])
        out |= {"valid_mse": metrics.mse(preds, targets),
                "baseline_mse": metrics.baseline_mse(train_targets.cpu(), targets)}
    return out


def train_collab(spec: dict) -> dict:
    from fastai.collab import TabularCollab, collab_learner
    from fastai.tabular.all import Categorify, IndexSplitter, TransformBlock

    from training.data.ratings import load_ratings

    data = load_ratings(spec["path"], valid_pct=spec["valid_pct"], seed=spec["seed"])
    frames = []
    for pairs, ratings, valid in ((data.train_pairs, data.train_ratings, False),
                                  (data.valid_pairs, data.valid_ratings, True)):
        frames.append(pd.DataFrame({"user": data.users.decode(pairs[:, 0]),
                                    "item": data.items.decode(pairs[:, 1]),
                                    "rating": ratings, "is_valid": valid}))
    df = pd.concat(frames, ignore_index=True)
    splits = IndexSplitter(df.index[df.is_valid].to_numpy())(range(len(df)))
    to = TabularCollab(df, [Categorify], ["user", "item"], y_names=["rating"],
                       y_block=TransformBlock(), splits=splits)
    set_seed(spec["seed"])
    learn = collab_learner(to.dataloaders(bs=64), n_factors=spec["factors"], y_range=(0, 5.5))
    start = time.perf_counter()
    learn.fit_one_cycle(spec["epochs"], 5e-3, wd=0.1)
    return {"valid_mse": float(learn.validate()[0]), "seconds": time.perf_counter() - start,
            "lr": "5.00e-03 (fastbook)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = json.loads(args.spec.read_text())
    result = train_collab(spec) if spec["task"] == "collab" else train_images(spec)
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
