"""fp16 graphs against their fp32 model: how far they drift, and what they cost here.

    .venv/bin/python benchmarks/half_precision.py [--images DIR] [--batch 32] [--seconds 5]
        [--device cpu|cuda] [--json FILE]

For lite0 (the packaged ImageNet weights with their 1000-class classifier, a real and decisive
model) and resnet50 (random init: no weights here), export an fp32 and an fp16 bundle with the
gate's tolerances opened wide, so every deviation is printed rather than refused: the largest
score difference and decision agreement of each runtime (ONNX Runtime, TorchScript) on real
images (``--images``: JPEGs, default ``../shared/data``'s ants/bees ``val/``) and on the gate's
random batches. Then images/s of ONNX Runtime on the same batch for fp32 and fp16 and their
ratio (``--device cuda`` on a GPU). Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "support"), str(REPO / "benchmarks")]

from decoders import imagenet_lite0  # noqa: E402  (the packaged ImageNet classifier)

from export.bundle import load_bundle  # noqa: E402
from export.convert import export_bundle  # noqa: E402
from export.parity import ParityTolerances  # noqa: E402
from export.pixels import Preprocessing, decode_for_model  # noqa: E402
from export.runtime import open_bundle_graph  # noqa: E402

WIDE_OPEN = ParityTolerances(atol=1.0, rtol=1.0, min_agreement=0.0)


def resnet50_random() -> tuple[torch.nn.Module, Preprocessing]:
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet50", pretrained=False, num_classes=1000).eval(), \
        Preprocessing()


def real_batch(folder: Path | None, prep: Preprocessing, limit: int = 256) -> np.ndarray | None:
    if folder is None or not folder.is_dir():
        return None
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:limit]
    return np.stack([decode_for_model(p, prep) for p in files]) if files else None


def deviations(result) -> dict:
    """Largest |difference| and lowest agreement per runtime, real images apart from random."""
    out: dict = {}
    for row in result.parity.rows:
        kind = "real" if row.input == "validation" else "random"
        key = f"{row.runtime}_{kind}"
        seen = out.setdefault(key, {"max_abs": 0.0, "agreement": 1.0})
        seen["max_abs"] = max(seen["max_abs"], row.max_abs)
        if row.agreement is not None:
            seen["agreement"] = min(seen["agreement"], row.agreement)
    return {k: {"max_abs": float(f"{v['max_abs']:.3g}"), "agreement": round(v["agreement"], 4)}
            for k, v in out.items()}


def rate(bundle_path: Path, device: str, batch: np.ndarray, seconds: float) -> float:
    runtime = open_bundle_graph(load_bundle(bundle_path), "onnx", device)
    for _ in range(2):
        runtime.run(batch)
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        runtime.run(batch)
        n += len(batch)
    return round(n / (time.perf_counter() - started), 1)


def main(argv: list[str] | None = None) -> dict:
    from paths import SHARED_DATA

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path,
                        default=SHARED_DATA / "hymenoptera_data" / "val")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--archs", default="tf_efficientnet_lite0,resnet50")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    builders = {"tf_efficientnet_lite0": imagenet_lite0, "resnet50": resnet50_random}
    report: dict = {"device": args.device, "batch": args.batch}
    with tempfile.TemporaryDirectory(prefix="lensflow-half-") as registry:
        for arch in args.archs.split(","):
            model, prep = builders[arch]()
            real = real_batch(args.images, prep)
            bundles = {}
            for precision in ("fp32", "fp16"):
                manifest = {"task": "single_label", "arch": arch,
                            "classes": [f"c{i}" for i in range(1000)],
                            "preprocessing": prep.to_dict(), "precision": precision}
                started = time.perf_counter()
                result = export_bundle(model, manifest, registry, f"{arch}-{precision}",
                                       validation_inputs=real, tolerances=WIDE_OPEN, pt2=False)
                bundles[precision] = result.bundle_path
                report[f"{arch}_{precision}"] = {
                    "export_s": round(time.perf_counter() - started, 1),
                    "deviation": deviations(result)}
                print(f"[half] {arch} {precision}: {json.dumps(report[f'{arch}_{precision}'])}",
                      flush=True)
            size = prep.input_size
            batch = np.random.default_rng(0).integers(0, 256, (args.batch, size, size, 3),
                                                      dtype=np.uint8)
            rates = {p: rate(b, args.device, batch, args.seconds) for p, b in bundles.items()}
            report[f"{arch}_onnx_{args.device}_images_per_s"] = rates
            report[f"{arch}_fp16_over_fp32"] = round(rates["fp16"] / rates["fp32"], 3)
            print(f"[half] {arch} onnx {args.device} images/s: {rates} "
                  f"(fp16/fp32 {report[f'{arch}_fp16_over_fp32']})", flush=True)
    print(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
