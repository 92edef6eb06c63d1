"""Channels-last against contiguous (NCHW) tensors for training and validation steps on this CPU.

    .venv/bin/python benchmarks/memory_format.py [--archs tf_efficientnet_lite0,resnet18,...]
        [--batch 16] [--size 224] [--rounds 5] [--threads 1] [--json FILE]

What chose ``training.fit.device.channels_last_on``: for each backbone (lite0 with its packaged
ImageNet weights; the others randomly initialised, which costs the same per step), one
``Learner`` train step (forward, backward, AdamW) and one eval forward on the same batch, in
each memory format. The two formats alternate round by round and each keeps its fastest round,
so a busy machine slows both alike. Prints seconds per step and the ratio contiguous/channels-
last (> 1: channels-last is faster). Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.models.backbones import create_model  # noqa: E402

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def step_seconds(arch: str, batch: int, size: int, rounds: int) -> dict:
    """Fastest train-step and eval-forward seconds per memory format for ``arch``."""
    weights = "packaged" if arch == "tf_efficientnet_lite0" else "none"
    torch.manual_seed(0)
    model, _ = create_model(arch, 10, weights, input_size=size)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    opt = torch.optim.AdamW(model.parameters(), 1e-5)
    best = {(f, kind): float("inf") for f in FORMATS for kind in ("train", "eval")}
    for _ in range(rounds + 1):  # the first round warms up oneDNN's kernels for both
        for name, fmt in FORMATS.items():
            model = model.to(memory_format=fmt)
            xx = x.contiguous(memory_format=fmt)
            model.train()
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(xx), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            best[name, "train"] = min(best[name, "train"], time.perf_counter() - start)
            model.eval()
            with torch.no_grad():
                start = time.perf_counter()
                model(xx)
                best[name, "eval"] = min(best[name, "eval"], time.perf_counter() - start)
    return {f"{kind}_{name}_s": round(best[name, kind], 4)
            for name in FORMATS for kind in ("train", "eval")} | {
        f"{kind}_ratio": round(best["contiguous", kind] / best["channels_last", kind], 3)
        for kind in ("train", "eval")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="tf_efficientnet_lite0,resnet18,resnet34,resnet50")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"memory format, CPU, {args.threads} thread(s), batch {args.batch} at {args.size} px, "
          f"fastest of {args.rounds} alternating rounds; ratio = contiguous / channels-last")
    print("| arch | train contiguous s | train channels-last s | train ratio "
          "| eval contiguous s | eval channels-last s | eval ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for arch in args.archs.split(","):
        row = {"arch": arch} | step_seconds(arch, args.batch, args.size, args.rounds)
        rows.append(row)
        print(f"| {arch} | {row['train_contiguous_s']} | {row['train_channels_last_s']} | "
              f"{row['train_ratio']} | {row['eval_contiguous_s']} | "
              f"{row['eval_channels_last_s']} | {row['eval_ratio']} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
