"""JPEG decoders side by side: CPU time per image and what each does to a model's answers.

Every candidate goes from a file to the uint8 (S, S, 3) upright RGB centre crop the exported
graph takes, with the work around the decode included (reading the file, EXIF orientation,
colour conversion, the copies into numpy, and stacking a batch):

- ``pil``: Pillow with ``draft`` (the smallest power-of-two DCT scale that keeps the side the
  model needs) and one box resample — ``export.pixels`` with ``LENSFLOW_JPEG_DECODER=pil``;
- ``simplejpeg``: ``export.pixels`` as shipped when simplejpeg is installed: the same
  libjpeg-turbo decode at the same scale (bit-identical pixels), then the same resample;
- ``torchvision``: ``torchvision.io.decode_jpeg`` (EXIF applied) + ``transforms.v2.functional``
  resize (antialias) and centre crop on the uint8 tensor; no DCT scaling on the CPU;
- ``opencv``: ``cv2.imread`` with ``IMREAD_REDUCED_COLOR_{2,4,8}`` at the same scale (EXIF
  applied), BGR→RGB, ``cv2.resize(INTER_AREA)`` and the crop.

Timing is CPU time of this thread (``time.thread_time``), best of ``--repeat`` interleaved
rounds, single-threaded decoders: on a shared machine wall time says more about the neighbours.
Fidelity runs EfficientNet-Lite0 with its packaged 1000-class ImageNet head on each decoder's
pixels and compares with a full-size decode (Pillow, no DCT scaling, same resample): top-1
agreement and the largest probability difference. Cases: the ants/bees validation images as
they are (~0.2 MP) and phone-size (4032×3024) copies made into a temporary folder. Usage::

    python benchmarks/decoders.py [--images 48] [--repeat 3] [--no-fidelity] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from export import pixels  # noqa: E402
from export.pixels import DECODER_ENV, Preprocessing, decode_for_model  # noqa: E402

PHONE = (4032, 3024)
Decoder = Callable[[Path, Preprocessing], np.ndarray]


def shared_data() -> Path:
    return Path(os.environ.get("LENSFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


def val_images(n: int) -> list[Path]:
    """``n`` ants/bees validation JPEGs spread evenly over both classes (all when n is 0)."""
    found = sorted((shared_data() / "hymenoptera_data" / "val").glob("*/*.jpg"))
    if not found:
        raise SystemExit(f"no images under {shared_data()}/hymenoptera_data/val")
    if not n or n >= len(found):
        return found
    return [found[int(i * len(found) / n)] for i in range(n)]


def phone_copies(paths: list[Path], into: Path, quality: int = 92,
                 size: tuple[int, int] = PHONE) -> list[Path]:
    """Phone-size (4032×3024 or ``size``, portrait kept portrait) JPEG copies of ``paths``."""
    from PIL import Image

    into.mkdir(parents=True, exist_ok=True)
    out = []
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        target = into / f"{i:04d}_{path.name}"
        upright = size if rgb.width >= rgb.height else size[::-1]
        rgb.resize(upright, Image.Resampling.BICUBIC).save(target, quality=quality)
        out.append(target)
    return out


def _with_library(library: str) -> Decoder:
    def decode(path: Path, pre: Preprocessing) -> np.ndarray:
        os.environ[DECODER_ENV] = library
        return decode_for_model(path, pre)
    return decode


def _torchvision(path: Path, pre: Preprocessing) -> np.ndarray:
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as F

    image = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB,
                        apply_exif_orientation=True)
    image = F.resize(image, [pre.resize_size], interpolation=pre.mode, antialias=True)
    image = F.center_crop(image, [pre.input_size, pre.input_size])
    return image.permute(1, 2, 0).contiguous().numpy()


def _opencv(path: Path, pre: Preprocessing) -> np.ndarray:
    import cv2
    from PIL import Image

    with Image.open(path) as im:  # header only: the size picks the reduced-decode flag
        scale = pixels._dct_scale(im.size, pre.decode_side() or 1)
    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}[scale]
    image = cv2.cvtColor(cv2.imread(str(path), flag), cv2.COLOR_BGR2RGB)
    h, w = image.shape[:2]
    new_w, new_h = pixels._resized(w, h, pre.resize_size)
    image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    top, left = round((new_h - pre.input_size) / 2), round((new_w - pre.input_size) / 2)
    return np.ascontiguousarray(image[top:top + pre.input_size, left:left + pre.input_size])


def decoders() -> dict[str, Decoder]:
    """Every candidate that imports here."""
    found: dict[str, Decoder] = {"pil": _with_library("pil")}
    if pixels.simplejpeg is not None:
        found["simplejpeg"] = _with_library("auto")
    found["torchvision"] = _torchvision
    try:
        import cv2

        cv2.setNumThreads(1)
        found["opencv"] = _opencv
    except ImportError:
        pass
    return found


def cpu_ms_per_image(decode: Decoder, paths: list[Path], pre: Preprocessing,
                     batch: int = 64) -> float:
    """CPU ms of this thread per image: decode every file, stack batches of ``batch``."""
    started = time.thread_time()
    for i in range(0, len(paths), batch):
        np.stack([decode(p, pre) for p in paths[i:i + batch]])
    return (time.thread_time() - started) * 1000 / len(paths)


def timings(cases: dict[str, list[Path]], pre: Preprocessing, repeat: int) -> dict:
    """{case: {decoder: best CPU ms per image}}, rounds interleaved across decoders."""
    found = decoders()
    best: dict[str, dict[str, float]] = {case: {} for case in cases}
    for _ in range(repeat):
        for case, paths in cases.items():
            for name, decode in found.items():
                ms = cpu_ms_per_image(decode, paths, pre)
                best[case][name] = min(ms, best[case].get(name, float("inf")))
    return best


def imagenet_lite0() -> tuple[torch.nn.Module, Preprocessing]:
    """EfficientNet-Lite0 with its packaged ImageNet classifier (offline)."""
    import timm

    from training.models.packaged_weights import (
        packaged_lite0_state_dict,
        packaged_preprocessing,
    )

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    model.load_state_dict(packaged_lite0_state_dict())
    return model.eval(), packaged_preprocessing()


def probabilities(model, images: np.ndarray, pre: Preprocessing) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        return torch.cat([torch.softmax(model(b), 1) for b in x.split(32)]).numpy()


def fidelity(cases: dict[str, list[Path]]) -> dict:
    """{case: {decoder: top-1 agreement and max |Δp| vs a full-size Pillow decode}}."""
    model, pre = imagenet_lite0()
    full = Preprocessing(**(pre.to_dict() | {"jpeg_decode": "full"}))
    out: dict[str, dict] = {}
    for case, paths in cases.items():
        os.environ[DECODER_ENV] = "pil"
        reference = probabilities(model, np.stack([decode_for_model(p, full) for p in paths]),
                                  pre)
        out[case] = {}
        for name, decode in decoders().items():
            probs = probabilities(model, np.stack([decode(p, pre) for p in paths]), pre)
            out[case][name] = {
                "top1_agreement": round(float(np.mean(probs.argmax(1) == reference.argmax(1))), 4),
                "max_prob_diff": round(float(np.abs(probs - reference).max()), 4)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48,
                        help="validation images per case (0: all 153)")
    parser.add_argument("--repeat", type=int, default=3, help="timing rounds; best counts")
    parser.add_argument("--no-fidelity", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pre = Preprocessing(224, 256)
    before = os.environ.get(DECODER_ENV)
    with tempfile.TemporaryDirectory(prefix="lensflow-decoders-") as tmp:
        small = val_images(args.images)
        cases = {"0.2MP": small, "12MP": phone_copies(small, Path(tmp) / "phone")}
        figures: dict = {"images_per_case": len(small), "cores": len(os.sched_getaffinity(0)),
                         "cpu_ms_per_image": timings(cases, pre, args.repeat)}
        if not args.no_fidelity:
            figures["fidelity_vs_full_decode"] = fidelity(cases)
    if before is None:
        os.environ.pop(DECODER_ENV, None)
    else:
        os.environ[DECODER_ENV] = before
    ms = figures["cpu_ms_per_image"]
    print(f"{'decoder':12s} " + " ".join(f"{c + ' ms':>10s}" for c in ms) + "   12MP/0.2MP")
    for name in ms["0.2MP"]:
        print(f"{name:12s} " + " ".join(f"{ms[c][name]:10.2f}" for c in ms)
              + f"   {ms['12MP'][name] / ms['0.2MP'][name]:10.2f}")
    for case, rows in figures.get("fidelity_vs_full_decode", {}).items():
        for name, row in rows.items():
            print(f"fidelity {case:6s} {name:12s} top-1 agreement {row['top1_agreement']:.4f}  "
                  f"max |dp| {row['max_prob_diff']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
