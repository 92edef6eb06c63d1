"""The GPU path, proved in one run on a lent GPU machine (driven by ``benchmarks/gpu_check.sh``).

Steps, each timed and reported on its own line (a failed step does not stop the others):

1. ``env``: torch, CUDA device, ONNX Runtime providers.
2. ``parity``: export resnet50 (random init; no weights download there) and lite0 (packaged
   ImageNet weights) to an fp32 and an fp16 bundle each (``--val``: real JPEGs for the gate);
   the export's parity gate includes ONNX Runtime's CUDA provider with TF32 off
   (``use_tf32=0``), at the precision's own tolerances; also reported: the largest difference
   with TF32 on, which is what scoring runs with by default.
3. ``model-only``: images/s of each graph in ONNX Runtime CUDA on a batch already on the GPU
   (IO binding, TF32 on), and of eager PyTorch with AMP (channels-last, bf16) for scale.
4. ``end-to-end``: ``score_image_folder`` on a folder of JPEGs (``--images``, else ants/bees
   copies or synthetic photos) with nvJPEG batch decoding + ORT IO binding, and with CPU
   decoding workers; images/s and the ratio to model-only.
5. ``amp-epoch``: one fine-tuning epoch of lite0 with mixed precision on the GPU.

Prints one JSON object last. Usage: ``python benchmarks/gpu_check.py [--images DIR] [--train DIR]
[--val DIR] [--steps env,parity,...] [--json F]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARCHS = ("resnet50", "tf_efficientnet_lite0")
STEPS = ("env", "parity", "model_only", "end_to_end", "amp_epoch")


def step(report: dict, name: str):
    """Decorator-ish runner: time ``fn``, store its result or its error under ``name``."""
    def run(fn, *args):
        started = time.perf_counter()
        try:
            value = fn(*args)
            report[name] = {"ok": True, "seconds": round(time.perf_counter() - started, 1),
                            **(value or {})}
        except Exception as err:  # report and go on: the next steps still say something
            report[name] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                            "trace": traceback.format_exc(limit=4)[-1500:]}
        print(f"[gpu_check] {name}: {json.dumps(report[name])}", flush=True)
        return report[name]
    return run


def env() -> dict:
    import onnxruntime as ort
    import torch

    return {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "onnxruntime": ort.__version__, "providers": ort.get_available_providers()}


PRECISIONS = ("fp32", "fp16")


def make_bundles(registry: Path, val: Path | None) -> dict:
    """fp32 and fp16 bundles of each arch, gated with real images when ``val`` has JPEGs."""
    from export.convert import export_bundle
    from export.errors import ParityError
    from export.pixels import decode_for_model
    from training.models.backbones import create_model

    out = {}
    for arch in ARCHS:
        weights = "packaged" if arch == "tf_efficientnet_lite0" else "none"
        model, prep = create_model(arch, 2, weights=weights)
        files = sorted(val.rglob("*.jpg"))[:128] if val is not None and val.is_dir() else []
        real = np.stack([decode_for_model(f, prep) for f in files]) if files else None
        for precision in PRECISIONS:
            manifest = {"task": "single_label", "arch": arch, "classes": ["ants", "bees"],
                        "preprocessing": prep.to_dict(), "thresholds": None,
                        "precision": precision}
            try:
                result = export_bundle(model.eval(), manifest, registry,
                                       f"{arch}-{precision}", validation_inputs=real, pt2=False)
                path, parity = result.bundle_path, result.parity
            except ParityError as err:  # report the rows: that is what this run is for
                path, parity = err.bundle_path, err.report
            cuda_rows = [r for r in parity.rows if r.runtime == "onnxruntime-cuda"]
            out[f"{arch}-{precision}"] = {
                "bundle": str(path), "parity_passed": parity.passed,
                "tolerances": parity.tolerances.to_dict(), "real_images": len(files),
                "failures": parity.failures()[:3], "cuda_rows": len(cuda_rows),
                "cuda_tf32_off_max_abs": max((r.max_abs for r in cuda_rows), default=None),
                "cuda_min_agreement": min((r.agreement for r in cuda_rows
                                           if r.agreement is not None), default=None),
                "cpu_max_abs": max((r.max_abs for r in parity.rows
                                    if r.runtime == "onnxruntime-cpu"), default=None),
                "tf32_on_max_abs": (_tf32_on_max_abs(path) if _ort_cuda()
                                    else "no CUDA provider")}
    return out


def _ort_cuda() -> bool:
    from export.runtime import onnx_cuda_available

    return onnx_cuda_available()


def _tf32_on_max_abs(bundle_path) -> float:
    """Largest |scores difference| of the CUDA provider with TF32 on vs off, random batch."""
    from export.bundle import load_bundle
    from export.runtime import OnnxRuntime

    bundle = load_bundle(bundle_path)
    size = bundle.manifest["preprocessing"]["input_size"]
    images = np.random.default_rng(0).integers(0, 256, (32, size, size, 3), dtype=np.uint8)
    onnx = bundle.file(bundle.manifest["graphs"]["model"]["files"]["onnx"])
    on = OnnxRuntime(onnx, "cuda", tf32=True).run(images)["scores"]
    off = OnnxRuntime(onnx, "cuda", tf32=False).run(images)["scores"]
    return float(np.abs(on - off).max())


def model_only(bundles: dict, batch: int = 256, seconds: float = 5.0) -> dict:
    import torch

    from export.bundle import load_bundle
    from export.runtime import open_bundle_graph

    out = {}
    for name, info in bundles.items():
        bundle = load_bundle(info["bundle"])
        size = bundle.manifest["preprocessing"]["input_size"]
        x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device="cuda")
        if _ort_cuda():
            rt = open_bundle_graph(bundle, "onnx", "cuda")
            out[f"{name}_onnx_cuda_images_per_s"] = _rate(lambda rt=rt, x=x: rt.run(x), batch,
                                                          seconds)
        arch = bundle.manifest["arch"]
        if name.endswith("fp32"):
            out[f"{arch}_eager_amp_images_per_s"] = _eager_amp_rate(arch, x, seconds)
    return out


def _eager_amp_rate(arch: str, x, seconds: float) -> float:
    import torch

    from training.models.backbones import create_model

    model, _ = create_model(arch, 2, weights="none")
    model = model.cuda().eval().to(memory_format=torch.channels_last)
    images = x.permute(0, 3, 1, 2).float().div(255).contiguous(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(images)
        torch.cuda.synchronize()
    return _rate(run, x.shape[0], seconds)


def _rate(fn, batch: int, seconds: float) -> float:
    for _ in range(3):
        fn()
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        n += batch
    return round(n / (time.perf_counter() - started), 1)


def image_folder(images: Path | None, into: Path, n: int = 4096) -> Path:
    """The folder to score: ``images`` if given, else ``n`` synthetic 500×375 photos."""
    if images is not None and images.is_dir():
        return images
    from PIL import Image

    into.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    for i in range(64):
        base = np.stack([x * 255 / 500, y * 255 / 375, (x * y * (i + 1)) % 255], -1)
        noisy = np.clip(base + rng.normal(0, 16, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(into / f"seed{i:03d}.jpg", quality=90)
    for i in range(64, n):
        os.link(into / f"seed{i % 64:03d}.jpg", into / f"img{i:05d}.jpg")
    return into


def end_to_end(bundles: dict, folder: Path, model: dict) -> dict:
    """images/s with GPU and with CPU decoding, and how far the two decodes' answers differ."""
    out = {"gpu_decode_only_images_per_s": _gpu_decode_rate(folder)}
    if not _ort_cuda():
        out["skipped"] = "onnxruntime has no CUDA provider here: no end-to-end GPU runs"
        return out
    for arch, info in bundles.items():  # arch: "<arch>-<precision>"
        rows = {}
        for gpu_decode in (True, False):
            label = f"{arch}_{'gpu' if gpu_decode else 'cpu'}_decode"
            summary, rows[gpu_decode] = _score(folder, info["bundle"], gpu_decode=gpu_decode)
            out[f"{label}_images_per_s"] = summary.images_per_s
            ceiling = model.get(f"{arch}_onnx_cuda_images_per_s")
            if ceiling:
                out[f"{label}_over_model_only"] = round(summary.images_per_s / ceiling, 3)
        if arch == "resnet50-fp32":  # the decoding-process cap before this run measured it
            summary, _ = _score(folder, info["bundle"], gpu_decode=False, workers=8)
            out[f"{arch}_cpu_decode_8_workers_images_per_s"] = summary.images_per_s
        gpu, cpu = rows[True], rows[False]
        out[f"{arch}_gpu_vs_cpu_decode_top1_agreement"] = round(float(np.mean(
            np.array(gpu["pred_label"]) == np.array(cpu["pred_label"]))), 4)
        out[f"{arch}_gpu_vs_cpu_decode_max_score_diff"] = round(float(np.max(np.abs(
            np.array(gpu["pred_score"]) - np.array(cpu["pred_score"])))), 4)
    return out


def _score(folder: Path, bundle: str, **options):
    """One warm-up run (workers, cuDNN plans), then the measured one: (summary, its rows)."""
    from datetime import date

    from scoring.image_scoring import score_image_folder
    from scoring.partition import read_partition

    with tempfile.TemporaryDirectory() as tmp:
        score_image_folder(folder, bundle, tmp, batch_size=256, device="cuda", **options)
    with tempfile.TemporaryDirectory() as tmp:
        summary = score_image_folder(folder, bundle, tmp, batch_size=256, device="cuda",
                                     **options)
        run_date = date.fromisoformat(summary.partition.rsplit("=", 1)[1])
        rows = read_partition(tmp, "image_predictions", run_date,
                              ["pred_label", "pred_score"]).to_pydict()
    return summary, rows


def _gpu_decode_rate(folder: Path, batch: int = 256) -> float:
    """images/s of nvJPEG batch decoding + GPU resize alone (file reads included)."""
    import torch

    from export.pixels import Preprocessing
    from scoring.image_batches import gpu_decoded_batches
    from scoring.image_folder import walk_images

    files = walk_images(folder)
    for _ in gpu_decoded_batches(files[:batch], Preprocessing(), batch):
        pass  # warm-up: nvJPEG handles, kernels
    started = time.perf_counter()
    for _ in gpu_decoded_batches(files, Preprocessing(), batch):
        pass
    torch.cuda.synchronize()
    return round(len(files) / (time.perf_counter() - started), 1)


def amp_epoch(folder: Path | None) -> dict:
    from training.recipes.image import prepare_image_data, train_image_model

    data_dir = folder if folder is not None and folder.is_dir() else None
    if data_dir is None:
        raise RuntimeError("needs --train DIR (class folders, e.g. hymenoptera_data/train)")
    data = prepare_image_data(data_dir)
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = train_image_model(data, out, freeze_epochs=0, epochs=1, lr=1e-3,
                                   device="cuda", bs=64)
        return {"epoch_seconds": round(time.perf_counter() - started, 1),
                "metrics": getattr(result, "metrics", None)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help="JPEG folder to score end to end")
    parser.add_argument("--train", type=Path, help="class folders for the AMP epoch")
    parser.add_argument("--val", type=Path, help="JPEGs the parity gate checks as real images")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"comma-separated subset of {','.join(STEPS)}")
    args = parser.parse_args(argv)
    steps = set(args.steps.split(","))
    if steps - set(STEPS):
        parser.error(f"--steps: unknown {sorted(steps - set(STEPS))}; choose from {STEPS}")
    report: dict = {}
    if "env" in steps:
        step(report, "env")(env)
    with tempfile.TemporaryDirectory(prefix="lensflow-gpu-") as tmp:
        tmp = Path(tmp)
        bundles = {}
        if steps & {"parity", "model_only", "end_to_end"}:
            bundles = step(report, "parity")(make_bundles, tmp / "registry", args.val)
        arch_bundles = {name: info for name, info in bundles.items()
                        if isinstance(info, dict) and "bundle" in info}
        model = {}
        if steps & {"model_only", "end_to_end"}:
            model = step(report, "model_only")(model_only, arch_bundles)
        if "end_to_end" in steps:
            folder = image_folder(args.images, tmp / "images")
            step(report, "end_to_end")(end_to_end, arch_bundles, folder, model)
        if "amp_epoch" in steps:
            step(report, "amp_epoch")(amp_epoch, args.train)
    print(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
