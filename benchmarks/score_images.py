"""Image-folder scoring, side by side: lensflow end to end vs a naive eager loop vs ONNX alone.

(a) ``score_image_folder``: walk, decode in DataLoader workers, ONNX Runtime, Parquet commit.
(b) the loop most tutorials write: a Dataset of PIL images with torchvision's ``Resize`` /
    ``CenterCrop`` / ``ToTensor`` / ``Normalize``, a DataLoader with the same workers and batch
    size, and the eager model under ``torch.no_grad``. The eager model is the bundle's own
    architecture rebuilt by ``training.models.backbones.create_model`` with the bundle's
    ``weights.safetensors`` loaded into it — the same weights the exports were made from (the
    bundle's TorchScript is frozen, so it cannot give eager modules back).
(c) the bundle's ONNX graph alone in the same runtime on images decoded beforehand: the ceiling
    for (a), since (a) must also read and decode every file.

(a) and (c) run ``--repeat`` alternating rounds and keep their best (the machine may be shared).
Prints images/s of each and the ratios a/b and a/c (goals on 2 cores: a/b >= 2.0, a/c >= 0.85),
and the top-1 agreement of (a) and (b). Usage::

    python benchmarks/score_images.py --make-bundle            # hymenoptera ×2, lite0 bundle
    python benchmarks/score_images.py FOLDER --model REG/NAME --batch-size 32 --workers 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from export.bundle import load_bundle, resolve_bundle  # noqa: E402
from export.pixels import Preprocessing, decode_for_model  # noqa: E402
from export.runtime import open_bundle_graph  # noqa: E402
from scoring.image_folder import default_workers, walk_images  # noqa: E402
from scoring.image_scoring import score_image_folder  # noqa: E402
from scoring.partition import read_partition  # noqa: E402


def shared_data() -> Path:
    return Path(os.environ.get("LENSFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


def copy_folder(src: Path, copies: int, into: Path) -> Path:
    """``copies`` copies of ``src`` side by side, so a small sample makes a longer run."""
    for i in range(copies):
        shutil.copytree(src, into / f"copy{i}")
    return into


def make_bundle(registry: Path, arch: str = "tf_efficientnet_lite0") -> Path:
    """A 2-class bundle of ``arch`` with offline ImageNet weights (head untrained: speed only)."""
    from export.convert import export_bundle
    from training.models.backbones import create_model

    model, prep = create_model(arch, 2, weights="packaged")
    manifest = {"task": "single_label", "arch": arch, "classes": ["ants", "bees"],
                "preprocessing": prep.to_dict(), "thresholds": None}
    return export_bundle(model.eval(), manifest, registry, "bench", pt2=False).bundle_path


def eager_model(bundle) -> torch.nn.Module:
    """The bundle's architecture in eager mode with the bundle's own safetensors weights."""
    from safetensors.torch import load_model

    from training.models.backbones import create_model

    n_out = len(bundle.manifest["classes"])
    model, _ = create_model(bundle.manifest["arch"], n_out, weights="none")
    load_model(model, str(bundle.file(bundle.manifest.get("weights") or "weights.safetensors")))
    return model.eval()


class NaiveImages(torch.utils.data.Dataset):
    """What a tutorial writes: PIL open, convert RGB, torchvision transforms."""

    def __init__(self, paths: list[Path], prep: dict):
        from torchvision import transforms as T

        self.paths = paths
        self.transform = T.Compose([
            T.Resize(prep["resize_size"]), T.CenterCrop(prep["input_size"]), T.ToTensor(),
            T.Normalize(prep["mean"], prep["std"])])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB"))


def run_lensflow(folder: Path, bundle_path: Path, out: Path, args) -> tuple[float, list[str]]:
    summary = score_image_folder(folder, bundle_path, out, batch_size=args.batch_size,
                                 workers=args.workers, runtime="onnx", device=args.device)
    labels = read_partition(out, "image_predictions", _run_date(summary))["pred_label"]
    return summary.seconds, labels.to_pylist()


def _run_date(summary):
    from datetime import date

    return date.fromisoformat(summary.partition.rsplit("=", 1)[1])


def run_naive(paths: list[Path], bundle, args, workers: int) -> tuple[float, list[str]]:
    started = time.perf_counter()
    model = eager_model(bundle)
    loader = torch.utils.data.DataLoader(NaiveImages(paths, bundle.manifest["preprocessing"]),
                                         batch_size=args.batch_size, num_workers=workers)
    classes, labels = bundle.manifest["classes"], []
    with torch.no_grad():
        for batch in loader:
            best = torch.softmax(model(batch), dim=1).argmax(dim=1)
            labels += [classes[i] for i in best.tolist()]
    return time.perf_counter() - started, labels


def run_onnx_only(paths: list[Path], bundle, args) -> float:
    spec = Preprocessing.from_dict(bundle.manifest["preprocessing"])
    images = np.stack([decode_for_model(p, spec) for p in paths])
    runtime = open_bundle_graph(bundle, "onnx", args.device)
    runtime.run(images[: args.batch_size])  # warm-up: first call plans memory
    started = time.perf_counter()
    for i in range(0, len(images), args.batch_size):
        runtime.run(images[i: i + args.batch_size])
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path,
                        help="images to score (default: shared hymenoptera_data × --copies)")
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--model", help="REG/NAME[/VERSION] or a bundle dir")
    parser.add_argument("--make-bundle", action="store_true",
                        help="export tf_efficientnet_lite0 (packaged ImageNet weights) first")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of (a) and (c); the best of each counts")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not args.model and not args.make_bundle:
        parser.error("give --model REG/NAME or --make-bundle")
    with tempfile.TemporaryDirectory(prefix="lensflow-bench-") as tmp:
        tmp = Path(tmp)
        folder = args.folder or copy_folder(shared_data() / "hymenoptera_data", args.copies,
                                            tmp / "images")
        bundle_path = make_bundle(tmp / "registry") if args.make_bundle else resolve_bundle(
            args.model)
        bundle = load_bundle(bundle_path)
        files = walk_images(folder)
        paths = [f.path for f in files]
        workers = default_workers(len(files)) if args.workers is None else args.workers
        # (a) and (c) alternate and each keeps its best round: on a shared machine the load
        # changes from one minute to the next, and it should not favour either side.
        a_runs, c_runs = [], []
        for _ in range(args.repeat):
            a_s, a_labels = run_lensflow(folder, bundle_path, tmp / "out", args)
            a_runs.append(a_s)
            c_runs.append(run_onnx_only(paths, bundle, args))
        a_s, c_s = min(a_runs), min(c_runs)
        b_s, b_labels = run_naive(paths, bundle, args, workers)
    n = len(files)
    figures = {
        "images": n, "workers": workers, "batch_size": args.batch_size,
        "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
        "a_lensflow_images_per_s": round(n / a_s, 2),
        "b_naive_eager_images_per_s": round(n / b_s, 2),
        "c_onnx_only_images_per_s": round(n / c_s, 2),
        "a_over_b": round(b_s / a_s, 3), "a_over_c": round(c_s / a_s, 3),
        "a_rounds_s": [round(x, 2) for x in a_runs], "c_rounds_s": [round(x, 2) for x in c_runs],
        "top1_agreement_a_b": round(float(np.mean([x == y for x, y in
                                                    zip(a_labels, b_labels, strict=True)])), 4),
    }
    for key, value in figures.items():
        print(f"{key:30s} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
