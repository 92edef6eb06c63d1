"""An image folder as model input: a deterministic walk, then decoding in DataLoader workers.

The walk lists image files recursively in sorted relative-path order, skips hidden names (a
leading ``.``), follows directory symlinks but never a loop (real paths of visited directories
are remembered). Decoding reproduces the
validation transform of the ImageNet reference scripts that training uses — upright (EXIF) RGB,
shorter side resized to ``resize_size``, centre crop ``input_size`` — and stops at uint8 HWC: the
exported graph normalises. A file that cannot be decoded (decompression bomb, empty, truncated,
not an image) becomes an error string for its row; the collate keeps such rows aside so one bad
file never stops a batch.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from scoring.errors import BundleRefError, ImageFolderError

_PIL_FILTERS = {
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
    InterpolationMode.BOX: Image.Resampling.BOX,
    InterpolationMode.HAMMING: Image.Resampling.HAMMING,
}
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class ImageFile:
    """One image file found by the walk; ``relpath`` uses ``/`` whatever the OS."""

    path: Path
    relpath: str
    size: int
    mtime_ns: int


def walk_images(folder: str | Path) -> list[ImageFile]:
    """Every image file under ``folder`` (any depth, suffix in any case), sorted by relpath."""
    root = Path(folder)
    if not root.exists():
        raise ImageFolderError(f"{root}: no such folder")
    if not root.is_dir():
        raise ImageFolderError(f"{root}: not a folder")
    found: list[ImageFile] = []
    seen_dirs = {os.path.realpath(root)}
    pending = [(root, "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:  # unreadable sub-folder: nothing in it can be scored
            continue
        for entry in entries:
            if entry.name.startswith("."):  # .thumbnails/, macOS ._photo.jpg forks, ...
                continue
            rel = f"{prefix}{_printable(entry.name)}"
            if entry.is_dir():  # follows symlinks, hence the loop guard
                real = os.path.realpath(entry.path)
                if real not in seen_dirs:
                    seen_dirs.add(real)
                    pending.append((Path(entry.path), f"{rel}/"))
            elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                st = entry.stat()
                found.append(ImageFile(Path(entry.path), rel, st.st_size, st.st_mtime_ns))
    return sorted(found, key=lambda f: f.relpath)


def _printable(name: str) -> str:
    """A file name as valid UTF-8 text for Parquet; undecodable bytes become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@dataclass(frozen=True)
class DecodeSpec:
    """How a file becomes the model's uint8 input (the manifest's ``preprocessing``)."""

    input_size: int
    resize_size: int
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation.lower() not in {m.value for m in _PIL_FILTERS}:
            known = ", ".join(m.value for m in _PIL_FILTERS)
            raise BundleRefError(f"preprocessing.interpolation: unknown resize filter "
                                 f"{self.interpolation!r} (known: {known})")
        if min(self.input_size, self.resize_size) < 1:
            raise BundleRefError(f"preprocessing: input_size {self.input_size} and resize_size "
                                 f"{self.resize_size} must be positive")

    @classmethod
    def from_manifest(cls, preprocessing: dict) -> DecodeSpec:
        return cls(int(preprocessing["input_size"]), int(preprocessing["resize_size"]),
                   str(preprocessing.get("interpolation", "bilinear")))


def decode_image(path: Path, spec: DecodeSpec) -> np.ndarray:
    """uint8 (input_size, input_size, 3) RGB; raises on anything that is not a sound image."""
    with warnings.catch_warnings():
        # Over MAX_IMAGE_PIXELS Pillow only warns; a nightly job should refuse, not swap.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            if im.format == "JPEG":
                side = max(spec.resize_size, spec.input_size)
                im.draft("RGB", (side, side))  # DCT-domain downscale: far less to decode
            im.seek(0)
            im.load()
            upright_im = upright(im)
    return np.asarray(resize_and_crop(to_rgb(upright_im), spec), dtype=np.uint8)


def upright(im: Image.Image) -> Image.Image:
    """``im`` as its EXIF orientation says it should be seen (training decodes with it too)."""
    try:
        if im.getexif().get(0x0112, 1) == 1:  # most files: skip exif_transpose's full copy
            return im
        return ImageOps.exif_transpose(im)
    except Exception:  # a malformed EXIF block: keep the pixels as stored
        return im


def resize_and_crop(im: Image.Image, spec: DecodeSpec) -> Image.Image:
    """torchvision's ``Resize(resize_size)`` then ``CenterCrop(input_size)``, in one resample.

    Pillow resamples only the source box under the crop (its filter still reads the pixels
    around the box), so the result matches resizing the whole image and cropping, for less work.
    """
    width, height = im.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(spec.resize_size * long / short)  # torchvision's rule for the long side
    new_w, new_h = ((spec.resize_size, new_long) if width <= height
                    else (new_long, spec.resize_size))
    crop, mode = spec.input_size, InterpolationMode(spec.interpolation.lower())
    if mode == InterpolationMode.NEAREST or crop > min(new_w, new_h):
        # Nearest picks pixels by rounding, which the box form shifts; a crop larger than the
        # resized image needs torchvision's padding. Both take the two-step path.
        resized = F.resize(im, [spec.resize_size], interpolation=mode, antialias=True)
        return F.center_crop(resized, [crop, crop])
    left, top = int(round((new_w - crop) / 2.0)), int(round((new_h - crop) / 2.0))
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    return im.resize((crop, crop), _PIL_FILTERS[mode], box=box)


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB from any mode Pillow opens: transparency over white, 16-bit scaled, CMYK converted.

    Training decodes with it too, so a model is trained on the pixels it is later scored on.
    """
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        # Pillow clips 16/32-bit values to 255 on convert("RGB"), which turns most pixels white.
        values = np.asarray(im, dtype=np.float64)
        top = values.max(initial=0.0)
        if top > 255:
            values = values * (255.0 / (65535.0 if top <= 65535 else top))
        return Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def describe_error(err: BaseException) -> str:
    """One line: exception class and message."""
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


class DecodedImages(Dataset):
    """Yields ``(index, image or None, error or None)`` for each file, decoded by ``spec``."""

    def __init__(self, files: Sequence[ImageFile], spec: DecodeSpec):
        self.files = files
        self.spec = spec

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str | None]:
        try:
            return i, decode_image(self.files[i].path, self.spec), None
        except Exception as err:  # any decoder failure belongs to this row, not to the run
            return i, None, describe_error(err)


@dataclass(frozen=True)
class DecodedBatch:
    """Decoded images of one batch, and the rows that failed, each by file index."""

    indices: np.ndarray  # int64 (n,)
    images: torch.Tensor  # uint8 (n, H, W, 3); a tensor so workers pass it through shared memory
    failed: tuple[tuple[int, str], ...]


def collate_decoded(items: list[tuple[int, np.ndarray | None, str | None]]) -> DecodedBatch:
    """Stack the decoded images; keep failed rows aside with their error."""
    good = [(i, image) for i, image, error in items if error is None]
    failed = tuple((i, error) for i, _, error in items if error is not None)
    if good:
        images = torch.from_numpy(np.stack([image for _, image in good]))
    else:
        images = torch.empty((0, 0, 0, 3), dtype=torch.uint8)
    return DecodedBatch(np.array([i for i, _ in good], dtype=np.int64), images, failed)
