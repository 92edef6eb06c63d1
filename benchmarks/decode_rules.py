"""JPEG decode rules side by side: how much DCT scaling a model's answers can take, and its cost.

A rule decides how a JPEG becomes the (S, S, 3) uint8 centre crop the model sees. Each candidate
is compared with a full-size decode (every pixel, then the manifest's resample):

- ``k1``: libjpeg-turbo's DCT scaling at the smallest power of two (1/2, 1/4, 1/8) that keeps the
  side the resize needs (``jpeg_decode="dct-scaled"``, bundles before ``dct-scaled-2x``);
- ``k1.5``, ``k2``: the same, keeping 1.5× and 2× that side (``k2`` is ``dct-scaled-2x``);
- ``k1+lanczos``, ``k1+box``: ``k1``'s reduced decode, then a Lanczos (sharper than lite0's
  bicubic) or a box resample instead of the manifest's filter, to undo or match the blur of the
  reduced decode (an 8×8 block average at 1/8) at ``k1``'s cost; ``k2+lanczos`` both;
- ``k2+fastdct``: ``k2`` with libjpeg-turbo's fast (less exact) inverse DCT.

For each candidate and case it reports top-1 agreement and the largest probability difference
against the full decode for (1) a lite0 fine-tuned on ants/bees (``--trained DIR``, a training
output; default: one trained here on the ants/bees train split, 1 frozen + 1 unfrozen epoch)
and (2) lite0's 1000-class ImageNet head (packaged weights), far more sensitive than a two-class
head; and the decode's CPU ms per image (this thread, best of ``--repeat`` interleaved rounds,
file read, EXIF and crop included). Cases: the ants/bees validation images (~0.2 MP) and JPEG
copies of them at 2732×2048 (5.6 MP: the short side is 8× the 256 px resize, so ``k1`` decodes at
1/8 to the resize side itself and ``k2`` at 1/4 to twice it, each rule's closest call), 4032×3024
(12 MP phones: ``k1`` at 1/8 keeps 1.48× the side) and 4096×3072 (12.6 MP: ``k1.5``'s closest
call, 1/8 to 1.5× the side). Usage::

    python benchmarks/decode_rules.py [--images 0] [--repeat 2] [--trained DIR] [--json out.json]
    python benchmarks/decode_rules.py --trained DIR --rules k2,k2+lanczos --no-timing
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decoders import (  # noqa: E402  (decoders.py puts the repository on sys.path)
    cpu_ms_per_image,
    imagenet_lite0,
    phone_copies,
    probabilities,
    shared_data,
    val_images,
)

from export.pixels import (  # noqa: E402
    Preprocessing,
    decode_for_model,
    open_rgb,
    resize_and_crop,
    upright_size,
)

Rule = Callable[[Path, Preprocessing], np.ndarray]
CASES = {"0.2MP": None, "2732x2048": (2732, 2048), "4032x3024": (4032, 3024),
         "4096x3072": (4096, 3072)}


def keep(k: float, resample: str | None = None, fast_idct: bool = False) -> Rule:
    """DCT-scaled decode keeping ``k`` × the side the resize needs (with libjpeg-turbo's fast
    inverse DCT if ``fast_idct``), then the manifest's filter (or ``resample`` when the decode
    was reduced)."""
    def decode(path: Path, pre: Preprocessing) -> np.ndarray:
        im = open_rgb(path, min_side=math.ceil(k * max(pre.resize_size, pre.input_size)),
                      fast_idct=fast_idct)
        if resample and im.size != upright_size(path):
            pre = Preprocessing(**(pre.to_dict() | {"interpolation": resample}))
        return np.asarray(resize_and_crop(im, pre), dtype=np.uint8)
    return decode


def full(path: Path, pre: Preprocessing) -> np.ndarray:
    return decode_for_model(path, Preprocessing(**(pre.to_dict() | {"jpeg_decode": "full"})))


RULES: dict[str, Rule] = {"full": full, "k1": keep(1), "k1.5": keep(1.5), "k2": keep(2),
                          "k1+lanczos": keep(1, "lanczos"), "k1+box": keep(1, "box"),
                          "k2+lanczos": keep(2, "lanczos"), "k2+fastdct": keep(2, fast_idct=True)}
#: The manifest modes and the candidate each must equal, pixel for pixel.
SHIPPED = {"dct-scaled": "k1", "dct-scaled-2x": "k2", "full": "full"}


def check_shipped_modes(paths: list[Path], pre: Preprocessing) -> None:
    """Refuse to report if a manifest mode does not decode as the candidate named for it."""
    for mode, rule in SHIPPED.items():
        if rule not in RULES:
            continue
        shipped = Preprocessing(**(pre.to_dict() | {"jpeg_decode": mode}))
        for path in paths:
            if not np.array_equal(decode_for_model(path, shipped), RULES[rule](path, pre)):
                raise SystemExit(f"jpeg_decode={mode} does not decode {path} as {rule}")


def fine_tuned_lite0(trained: Path | None, into: Path) -> tuple[torch.nn.Module, Preprocessing,
                                                                dict]:
    """The lite0 of a training output, or one fine-tuned here on ants/bees (2 epochs)."""
    from training.models.checkpoint import load_image_model

    if trained is None:
        from training.recipes.image import prepare_image_data, train_image_model

        trained = into / "trained"
        data = prepare_image_data(shared_data() / "hymenoptera_data")
        train_image_model(data, trained, freeze_epochs=1, epochs=1)
    model, spec = load_image_model(trained)
    metrics = json.loads((trained / "metrics.json").read_text())
    return model, spec.preprocessing, {"dir": str(trained), "accuracy": metrics.get("accuracy")}


def fidelity(models: dict[str, tuple[torch.nn.Module, Preprocessing]],
             cases: dict[str, list[Path]]) -> dict:
    """{model: {case: {rule: top-1 agreement and max |Δp| vs the full decode}}}; each rule's
    pixels decoded once per input recipe."""
    out: dict[str, dict] = {name: {} for name in models}
    for case, paths in cases.items():
        pixels: dict[str, dict[str, np.ndarray]] = {}
        for name, (model, pre) in models.items():
            key = json.dumps(pre.to_dict())
            if key not in pixels:
                pixels[key] = {rule_name: np.stack([rule(p, pre) for p in paths])
                               for rule_name, rule in RULES.items()}
            probs = {rule: probabilities(model, images, pre)
                     for rule, images in pixels[key].items()}
            reference = probs.pop("full")
            out[name][case] = {rule: {
                "top1_agreement": round(float(np.mean(p.argmax(1) == reference.argmax(1))), 4),
                "max_prob_diff": round(float(np.abs(p - reference).max()), 4)}
                for rule, p in probs.items()}
    return out


def timings(cases: dict[str, list[Path]], pre: Preprocessing, repeat: int) -> dict:
    """{case: {rule: best CPU ms per image}}, rounds interleaved across rules."""
    best: dict[str, dict[str, float]] = {case: {} for case in cases}
    for _ in range(repeat):
        for case, paths in cases.items():
            for name, rule in RULES.items():
                ms = cpu_ms_per_image(rule, paths, pre)
                best[case][name] = round(min(ms, best[case].get(name, float("inf"))), 2)
    return best


def report(figures: dict) -> None:
    ms = figures["cpu_ms_per_image"]
    models = [m for m in ("fine_tuned", "imagenet_1000") if m in figures]
    print(f"cores {figures['cores']}, {figures['images_per_case']} images per case; "
          f"fine-tuned: {figures.get('fine_tuned_model')}")
    for case in ms:
        print(f"\n{case:10s} rule  ms/image  vs k1   "
              + "  ".join(f"{m + ' agree / max|dp|':>28s}" for m in models))
        for name in RULES:
            took = ms[case].get(name, math.nan)
            cells = ["reference".rjust(28) if name == "full" else
                     f"{figures[m][case][name]['top1_agreement']:.4f} / "
                     f"{figures[m][case][name]['max_prob_diff']:.4f}".rjust(28) for m in models]
            print(f"  {name:18s} {took:8.2f}  {took / ms[case].get('k1', math.nan):5.2f}   "
                  + "  ".join(cells))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=0,
                        help="validation images per case (0: all 153)")
    parser.add_argument("--repeat", type=int, default=2, help="timing rounds; best counts")
    parser.add_argument("--trained", type=Path, help="training output of a fine-tuned model")
    parser.add_argument("--no-imagenet", action="store_true",
                        help="skip the 1000-class ImageNet head")
    parser.add_argument("--rules", help="comma-separated candidates (default: all; full is "
                        "always measured)")
    parser.add_argument("--cases", help=f"comma-separated cases of {', '.join(CASES)}")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.rules:
        for name in set(RULES) - {"full", *args.rules.split(",")}:
            del RULES[name]
    wanted = args.cases.split(",") if args.cases else list(CASES)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="lensflow-decode-rules-") as tmp:
        small = val_images(args.images)
        cases = {case: small if size is None else phone_copies(small, Path(tmp) / case, size=size)
                 for case, size in CASES.items() if case in wanted}
        model, pre, about = fine_tuned_lite0(args.trained, Path(tmp))
        check_shipped_modes([paths[0] for paths in cases.values()], pre)
        models = {"fine_tuned": (model, pre)}
        if not args.no_imagenet:
            models["imagenet_1000"] = imagenet_lite0()
        figures: dict = {"images_per_case": len(small), "cores": len(os.sched_getaffinity(0)),
                         "fine_tuned_model": about,
                         "cpu_ms_per_image": timings(cases, pre, 0 if args.no_timing
                                                     else args.repeat),
                         **fidelity(models, cases)}
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
