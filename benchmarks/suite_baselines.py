"""The quality suite's single-label baseline and its summary: a linear probe on the frozen
body's features, and the per-set table of lensflow's defaults against fastai and the probe.

The probe is the cheapest honest baseline (Kornblith et al., CVPR 2019): the same backbone and
packaged weights, the validation transform (no augmentation) at the suite's input size, one body
pass over the training and validation images, then multinomial logistic regression on the pooled
features with its L2 strength chosen by 5-fold cross-validation on the training features
(``training.models.probe`` without a prior). If fine-tuning loses to it, the recipe is wrong.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from training.data.image_loaders import build_image_loaders
from training.evaluation import metrics
from training.fit.learner import Learner
from training.fit.precompute import compute_features
from training.models.backbones import create_model
from training.models.probe import fit_linear_probe


def linear_probe(data, options) -> tuple[dict, float, str]:
    """(metrics, seconds, note) of a logistic-regression probe on ``options.arch``'s frozen
    features of ``data`` (an ``ImageData``) at ``options.size``."""
    start = time.perf_counter()
    torch.manual_seed(options.seed)
    model, prep = create_model(options.arch, len(data.classes), options.weights,
                               input_size=options.size)
    loaders = build_image_loaders(data, prep, bs=options.bs, workers=options.workers)
    learner = Learner(model, loaders.train, loaders.valid, nn.CrossEntropyLoss(), {},
                      device=options.device)
    train_x, train_y = compute_features(learner, loaders.train_plain)
    valid_x, valid_y = compute_features(learner, loaders.valid)
    fit = fit_linear_probe(train_x, train_y, len(data.classes))
    accuracy = metrics.accuracy(fit.predict(valid_x), valid_y)
    return {"accuracy": accuracy}, time.perf_counter() - start, f"l2 {fit.l2:.0e} by 5-fold CV"


def single_label_summary(rows, tasks: list[str]) -> list[str]:
    """Markdown lines: per single-label set, lensflow's defaults against fastai and the probe
    (accuracy and seconds), the means, and the issue's goals checked on this run."""
    def find(task, tool):
        return next((r for r in rows if r.task == task and r.tool == tool and r.metrics), None)

    lines = ["| set | lensflow | fastai | probe | lensflow s | fastai s | lensflow ≥ both |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    means = {"lensflow": [], "fastai": [], "probe": []}
    ok_quality, ok_time = [], []
    for task in tasks:
        ours = find(task, "lensflow")
        if ours is None or "accuracy" not in ours.metrics:
            continue
        peers = {tool: find(task, tool) for tool in ("fastai", "probe")}
        acc = {"lensflow": ours.metrics["accuracy"]} | {
            tool: r.metrics.get("accuracy") for tool, r in peers.items() if r is not None}
        for tool, value in acc.items():
            if value is not None:
                means[tool].append(value)
        beats = all(acc["lensflow"] >= v for t, v in acc.items() if t != "lensflow" and
                    v is not None)
        ok_quality.append(beats)
        fastai = peers["fastai"]
        if fastai is not None:
            ok_time.append(ours.seconds <= fastai.seconds)

        cell = {tool: "—" if acc.get(tool) is None else f"{acc[tool]:.4f}"
                for tool in ("lensflow", "fastai", "probe")}
        lines.append(f"| {task} | {cell['lensflow']} | {cell['fastai']} | {cell['probe']} | "
                     f"{ours.seconds:.0f} | "
                     f"{'—' if fastai is None else f'{fastai.seconds:.0f}'} | "
                     f"{'yes' if beats else 'no'} |")
    mean = {tool: sum(v) / len(v) for tool, v in means.items() if v}
    lines.append("| **mean** | " + " | ".join(
        f"{mean[t]:.4f}" if t in mean else "—" for t in ("lensflow", "fastai", "probe"))
        + " | | | |")
    goals = [f"lensflow ≥ fastai and ≥ probe on every set: {all(ok_quality)} "
             f"({sum(ok_quality)} of {len(ok_quality)})"]
    if "fastai" in mean and len(means["fastai"]) == len(means["lensflow"]):
        gap = 100 * (mean["lensflow"] - mean["fastai"])
        goals.append(f"mean ≥ fastai's + 3 points: {gap >= 3} ({gap:+.1f} points)")
    if ok_time:
        goals.append(f"seconds ≤ fastai's on every set: {all(ok_time)} "
                     f"({sum(ok_time)} of {len(ok_time)})")
    return lines + ["", "goals: " + "; ".join(goals)]
