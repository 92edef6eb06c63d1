"""Image-folder scoring, side by side: lensflow end to end vs a naive eager loop vs the model alone.

(a) ``score_image_folder``: walk, decode (threads or processes, lensflow's default unless
    ``--workers``), the runtime, Parquet commit.
(b) the loop most tutorials write: a Dataset of PIL images with torchvision's ``Resize`` /
    ``CenterCrop`` / ``ToTensor`` / ``Normalize``, a DataLoader with worker processes (lensflow's
    count, or one per spare core where lensflow decodes in threads) and the same batch size, and
    the eager model under ``torch.no_grad``. The eager model is the bundle's own
    architecture rebuilt by ``training.models.backbones.create_model`` with the bundle's
    ``weights.safetensors`` loaded into it — the same weights the exports were made from (the
    bundle's TorchScript is frozen, so it cannot give eager modules back).
(c) the bundle's graph alone in the same runtime on images decoded beforehand ("model-only"):
    the ceiling for (a), since (a) must also read and decode every file.

Two cases: N images of the folder as they are (default: the ants/bees images, ~0.2 MP) and
their phone-size (4032×3024) JPEG copies (``--phone N``; 0: the whole folder, one case). (a)
runs once per JPEG library (``--decoders pil,simplejpeg``; each in a fresh process, since
decoding workers keep the environment they started with) and per runtime (``--runtimes
onnx,torchscript,aoti``); in each process (a) and (c) run ``--repeat`` alternating rounds and
keep their best (the machine may be shared). Prints images/s, a/c per case, 12MP/0.2MP per
configuration, a/b and the top-1 agreement of (a) and (b) (goals on 2 cores: a/b >= 2.0,
a/c >= 0.75 for lite0, 12MP/0.2MP >= 0.6).

The cost of test-time augmentation: ``--tta`` exports a ``--tta`` twin of the ``--make-bundle``
model (same weights; the graph averages the centre crop and its mirror), or ``--tta-model`` names
one for ``--model``; (a) and (c) then run on both bundles in alternating rounds of the same
process, and the TTA bundle's images/s ÷ the plain one's is printed per configuration. Usage::

    python benchmarks/score_images.py --make-bundle --phone 96   # lite0 bundle, both cases
    python benchmarks/score_images.py FOLDER --model REG/NAME --batch-size 32 --workers 1
    python benchmarks/score_images.py --make-bundle --arch resnet50 --aoti --runtimes onnx,aoti
    python benchmarks/score_images.py --make-bundle --tta --phone 0 --no-naive   # TTA's cost
    python benchmarks/score_images.py --make-bundle --phone 0 --health-cost --repeat 5

``--health-cost`` measures run health's profiling instead: (a) with ``on_drift=off`` against
``warn`` (profile, drift against the trailing runs, run_health rows) in alternating rounds of one
process; goal: with ≥ 0.97× without.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from export.bundle import load_bundle, resolve_bundle  # noqa: E402
from export.loader_workers import available_cores  # noqa: E402
from export.manifest import TTA_VIEWS  # noqa: E402
from export.pixels import Preprocessing, decode_for_model  # noqa: E402
from export.runtime import open_bundle_graph  # noqa: E402
from scoring.image_batches import default_workers  # noqa: E402
from scoring.image_folder import walk_images  # noqa: E402
from scoring.image_scoring import score_image_folder  # noqa: E402
from scoring.partition import read_partition  # noqa: E402

#: How a TTA twin's figures are keyed: ``{runtime}+tta``.
TTA_SUFFIX = "+tta"


def shared_data() -> Path:
    return Path(os.environ.get("LENSFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


def copy_folder(src: Path, copies: int, into: Path) -> Path:
    """``copies`` copies of ``src`` side by side, so a small sample makes a longer run."""
    for i in range(copies):
        shutil.copytree(src, into / f"copy{i}")
    return into


def make_bundle(registry: Path, arch: str = "tf_efficientnet_lite0", aoti: bool = False,
                tta: bool = False) -> tuple[Path, Path | None]:
    """A 2-class bundle of ``arch`` (head untrained: speed only): lite0 with its offline
    ImageNet weights, any other architecture randomly initialised (no download here); with
    ``tta`` also its twin whose graph averages ``TTA_VIEWS`` (the same weights)."""
    from export.convert import export_bundle
    from training.models.backbones import create_model

    weights = "packaged" if arch == "tf_efficientnet_lite0" else "none"
    model, prep = create_model(arch, 2, weights=weights)
    manifest = {"task": "single_label", "arch": arch, "classes": ["ants", "bees"],
                "preprocessing": prep.to_dict(), "thresholds": None}
    plain = export_bundle(model.eval(), manifest, registry, "bench", pt2=False,
                          aoti=aoti).bundle_path
    if not tta:
        return plain, None
    twin = export_bundle(model.eval(), manifest | {"tta": {"views": list(TTA_VIEWS)}}, registry,
                         "bench-tta", pt2=False, aoti=aoti).bundle_path
    return plain, twin


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


def run_lensflow(folder: Path, bundle_path: Path, out: Path, args,
                 runtime: str = "onnx") -> tuple[float, list[str]]:
    summary = score_image_folder(folder, bundle_path, out, batch_size=args.batch_size,
                                 workers=args.workers, runtime=runtime, device=args.device)
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


def run_model_only(paths: list[Path], bundle, args, runtime: str = "onnx") -> float:
    spec = Preprocessing.from_dict(bundle.manifest["preprocessing"])
    images = np.stack([decode_for_model(p, spec) for p in paths])
    graph = open_bundle_graph(bundle, runtime, args.device)
    graph.run(images[: args.batch_size])  # warm-up: first call plans memory
    started = time.perf_counter()
    for i in range(0, len(images), args.batch_size):
        graph.run(images[i: i + args.batch_size])
    return time.perf_counter() - started


def measure_cases(cases: dict[str, Path], bundle_path: Path, out: Path, args,
                  tta_path: Path | None = None) -> dict:
    """{case: {runtime: {"e2e_s", "model_only_s", "labels"}}}: alternating rounds, best kept;
    with ``tta_path`` also ``{runtime}+tta``, that bundle's figures from the same rounds."""
    bundles = {"": (bundle_path, load_bundle(bundle_path))}
    if tta_path is not None:
        bundles[TTA_SUFFIX] = (tta_path, load_bundle(tta_path))
    result: dict = {}
    for case, folder in cases.items():
        paths = [f.path for f in walk_images(folder)]
        for runtime in args.runtimes:
            e2e, model, labels = {k: [] for k in bundles}, {k: [] for k in bundles}, {}
            for _ in range(args.repeat):
                for key, (path, bundle) in bundles.items():
                    seconds, labels[key] = run_lensflow(folder, path, out, args, runtime)
                    e2e[key].append(seconds)
                    model[key].append(run_model_only(paths, bundle, args, runtime))
            for key in bundles:
                result.setdefault(case, {})[runtime + key] = {
                    "images": len(paths), "e2e_s": min(e2e[key]),
                    "model_only_s": min(model[key]), "labels": labels[key]}
    return result


def measure_health_cost(folder: Path, bundle_path: Path, out: Path, args) -> dict:
    """Run health's cost: (a) with ``on_drift=off`` (no profile, no comparison, no run_health
    rows) and ``warn`` (all of it), in alternating rounds of this process (order swapped each
    round), the best of ``--repeat`` each, as wall-clock images/s and as images per CPU second
    of this process (its decoding threads included): on a shared host the CPU time is the
    steadier of the two."""
    n = len(walk_images(folder))
    wall = {"off": float("inf"), "warn": float("inf")}
    cpu = dict(wall)
    run_lensflow(folder, bundle_path, out, args)  # warm-up: runtime loaded, a baseline exists
    for round_ in range(args.repeat):
        for mode in ("off", "warn") if round_ % 2 == 0 else ("warn", "off"):
            started, cpu_started = time.perf_counter(), time.process_time()
            score_image_folder(folder, bundle_path, out, batch_size=args.batch_size,
                               workers=args.workers, device=args.device, on_drift=mode)
            wall[mode] = min(wall[mode], time.perf_counter() - started)
            cpu[mode] = min(cpu[mode], time.process_time() - cpu_started)
    figures = {"images": n, "off_images_per_s": round(n / wall["off"], 2),
               "warn_images_per_s": round(n / wall["warn"], 2),
               "with_over_without": round(wall["off"] / wall["warn"], 4),
               "off_images_per_cpu_s": round(n / cpu["off"], 2),
               "warn_images_per_cpu_s": round(n / cpu["warn"], 2),
               "with_over_without_cpu": round(cpu["off"] / cpu["warn"], 4)}
    print(f"run health over {n} images, best of {args.repeat} (goal: with >= 0.97x without):\n"
          f"  wall clock: {figures['warn_images_per_s']} images/s with profiling, "
          f"{figures['off_images_per_s']} without: {figures['with_over_without']:.3f}x\n"
          f"  CPU time:   {figures['warn_images_per_cpu_s']} images/CPU-s with, "
          f"{figures['off_images_per_cpu_s']} without: {figures['with_over_without_cpu']:.3f}x")
    return figures


def measure_in_child(decoder: str, cases: dict[str, Path], bundle_path: Path, args,
                     tta_path: Path | None = None) -> dict:
    """:func:`measure_cases` in a fresh process whose JPEG library is ``decoder``."""
    from export.pixels import DECODER_ENV

    request = {"cases": {k: str(v) for k, v in cases.items()}, "bundle": str(bundle_path),
               "tta_bundle": str(tta_path) if tta_path else None,
               "args": {k: getattr(args, k) for k in ("batch_size", "workers", "device",
                                                       "repeat", "runtimes")}}
    env = os.environ | {DECODER_ENV: decoder}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(request)], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{decoder}: benchmark child failed\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(request: str) -> None:
    spec = json.loads(request)
    args = argparse.Namespace(**spec["args"])
    with tempfile.TemporaryDirectory(prefix="lensflow-bench-") as tmp:
        tta = spec.get("tta_bundle")
        result = measure_cases({k: Path(v) for k, v in spec["cases"].items()},
                               Path(spec["bundle"]), Path(tmp) / "out", args,
                               Path(tta) if tta else None)
    print(json.dumps(result))


def phone_cases(folder: Path, n: int, into: Path) -> dict[str, Path]:
    """``n`` JPEGs of ``folder`` (spread over its sorted listing) as they are, and their
    phone-size copies: the same pictures at ~0.2 MP and at 12 MP."""
    sys.path.insert(0, str(Path(__file__).parent))
    from decoders import phone_copies

    jpegs = [f.path for f in walk_images(folder) if f.path.suffix.lower() in (".jpg", ".jpeg")]
    picked = [jpegs[int(i * len(jpegs) / n)] for i in range(min(n, len(jpegs)))]
    (into / "small").mkdir(parents=True)
    for i, path in enumerate(picked):
        shutil.copy(path, into / "small" / f"{i:04d}_{path.name}")
    phone_copies(picked, into / "phone")
    return {"0.2MP": into / "small", "12MP": into / "phone"}


def tta_ratios(configurations: dict) -> dict:
    """Per configuration measured with a TTA twin (``case/runtime+tta/decoder``): its e2e and
    model-only images/s ÷ the plain bundle's."""
    ratios = {}
    for key, value in configurations.items():
        case, runtime, decoder = key.split("/")
        if not runtime.endswith(TTA_SUFFIX):
            continue
        plain = configurations.get(f"{case}/{runtime.removesuffix(TTA_SUFFIX)}/{decoder}")
        if plain:
            ratios[f"{case}/{runtime.removesuffix(TTA_SUFFIX)}/{decoder}"] = {
                "e2e": round(value["e2e_images_per_s"] / plain["e2e_images_per_s"], 3),
                "model_only": round(value["model_only_images_per_s"]
                                    / plain["model_only_images_per_s"], 3)}
    return ratios


def summarise(measured: dict[str, dict], naive: dict | None, args) -> dict:
    """Flat figures and the ratios the goals name, from every decoder's measurements."""
    rows, figures = [], {"batch_size": args.batch_size, "cores": len(os.sched_getaffinity(0)),
                         "configurations": {}}
    for decoder, cases in measured.items():
        for case, runtimes in cases.items():
            for runtime, m in runtimes.items():
                e2e, model = m["images"] / m["e2e_s"], m["images"] / m["model_only_s"]
                key = f"{case}/{runtime}/{decoder}"
                figures["configurations"][key] = {
                    "images": m["images"], "e2e_images_per_s": round(e2e, 2),
                    "model_only_images_per_s": round(model, 2),
                    "e2e_over_model_only": round(e2e / model, 3)}
                rows.append((case, runtime, decoder, e2e, model))
    configs = figures["configurations"]
    for key, value in list(configs.items()):
        case, rest = key.split("/", 1)
        small = configs.get(f"0.2MP/{rest}")
        if case == "12MP" and small:
            value["12MP_over_0.2MP"] = round(value["e2e_images_per_s"]
                                             / small["e2e_images_per_s"], 3)
    if naive:
        figures |= naive
    tta = tta_ratios(configs)
    if tta:
        figures["tta_over_plain_images_per_s"] = tta
    print(f"{'case':6s} {'runtime':11s} {'decoder':11s} {'e2e img/s':>10s} {'model img/s':>12s} "
          f"{'e2e/model':>10s} {'12MP/0.2MP':>11s}")
    for case, runtime, decoder, e2e, model in rows:
        ratio = configs[f"{case}/{runtime}/{decoder}"].get("12MP_over_0.2MP")
        print(f"{case:6s} {runtime:11s} {decoder:11s} {e2e:10.1f} {model:12.1f} "
              f"{e2e / model:10.3f} {'' if ratio is None else f'{ratio:11.3f}'}")
    for key in ("b_naive_eager_images_per_s", "a_over_b", "top1_agreement_a_b"):
        if key in figures:
            print(f"{key:30s} {figures[key]}")
    for key, ratio in tta.items():
        print(f"TTA ÷ plain images/s {key}: e2e {ratio['e2e']:.3f}, "
              f"model-only {ratio['model_only']:.3f}")
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path,
                        help="images to score (default: shared hymenoptera_data × --copies)")
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--phone", type=int, default=96,
                        help="phone-size copies of this many images for the 12MP case (0: none)")
    parser.add_argument("--model", help="REG/NAME[/VERSION] or a bundle dir")
    parser.add_argument("--make-bundle", action="store_true",
                        help="export --arch (lite0: packaged ImageNet weights) first")
    parser.add_argument("--arch", default="tf_efficientnet_lite0")
    parser.add_argument("--aoti", action="store_true",
                        help="with --make-bundle: compile the AOTInductor package (minutes)")
    parser.add_argument("--tta", action="store_true",
                        help="with --make-bundle: also measure its --tta twin (TTA's cost)")
    parser.add_argument("--tta-model", help="with --model: a --tta bundle of the same model")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runtimes", default="onnx", help="comma-separated: onnx,torchscript,aoti")
    parser.add_argument("--decoders", default=None,
                        help="comma-separated JPEG libraries (default: pil, and simplejpeg "
                             "when installed)")
    parser.add_argument("--no-naive", action="store_true", help="skip (b)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of (a) and (c); the best of each counts")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--health-cost", action="store_true",
                        help="only measure run health's cost: (a) with on_drift off vs warn")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return {}
    if not args.model and not args.make_bundle:
        parser.error("give --model REG/NAME or --make-bundle")
    if args.tta and not args.make_bundle:
        parser.error("--tta makes a twin of --make-bundle's model; with --model give "
                     "--tta-model REG/NAME")
    args.runtimes = args.runtimes.split(",")
    from export import pixels

    decoders = (args.decoders.split(",") if args.decoders
                else ["pil"] + (["simplejpeg"] if pixels.simplejpeg is not None else []))
    with tempfile.TemporaryDirectory(prefix="lensflow-bench-") as tmp:
        tmp = Path(tmp)
        folder = args.folder or copy_folder(shared_data() / "hymenoptera_data", args.copies,
                                            tmp / "images")
        cases = phone_cases(folder, args.phone, tmp / "cases") if args.phone else {"0.2MP": folder}
        if args.make_bundle:
            bundle_path, tta_path = make_bundle(tmp / "registry", args.arch, args.aoti, args.tta)
        else:
            bundle_path = resolve_bundle(args.model)
            tta_path = resolve_bundle(args.tta_model) if args.tta_model else None
        if args.health_cost:
            figures = measure_health_cost(cases["0.2MP"], bundle_path, tmp / "out", args)
            if args.json:
                args.json.write_text(json.dumps(figures, indent=2) + "\n")
            return figures
        measured = {decoder: measure_in_child(decoder, cases, bundle_path, args, tta_path)
                    for decoder in decoders}
        naive = None
        if not args.no_naive:
            files = walk_images(cases["0.2MP"])
            # A tutorial's DataLoader decodes in processes: one per spare core, or lensflow's
            # own count where that is processes too (lensflow may use threads instead).
            workers = args.workers or default_workers(len(files)) or max(1, available_cores() - 1)
            b_s, b_labels = run_naive([f.path for f in files], load_bundle(bundle_path), args,
                                      workers)
            first = measured[decoders[0]]["0.2MP"][args.runtimes[0]]
            naive = {"b_naive_eager_images_per_s": round(len(files) / b_s, 2),
                     "a_over_b": round(b_s / first["e2e_s"], 3),
                     "top1_agreement_a_b": round(float(np.mean(
                         [x == y for x, y in zip(first["labels"], b_labels, strict=True)])), 4)}
    figures = summarise(measured, naive, args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
