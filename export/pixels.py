"""Pixels: how an image file becomes what a model sees, written once for training and scoring.

``Preprocessing`` is the input recipe of an image model (size, resize, mean/std, filter). It
travels from the backbone's own recipe through the training transforms into the bundle
manifest, where the exported graph bakes the normalisation in. The functions below decode any
file Pillow opens to an upright (EXIF-rotated) RGB image, resize the shorter side and take the
centre crop as the ImageNet reference scripts do, and map point coordinates between original
pixels and the [-1, 1] frame of that crop. Training, export's parity sample and scoring all call
these, so a model is trained on the pixels it is later scored on.

JPEGs are decoded by libjpeg-turbo at the smallest power-of-two DCT scale that keeps twice the
side the model needs (``jpeg_decode="dct-scaled-2x"``, recorded in the manifest's preprocessing;
``"dct-scaled"`` keeps the side itself, ``"full"`` decodes every pixel first;
``benchmarks/decode_rules.py`` measures what each does to a model's answers). With the optional
``simplejpeg`` installed, that decode goes through it: the same library at the same scale, so the
same pixels bit for bit, with less per-image work (``benchmarks/decoders.py`` measures both);
without it Pillow's ``draft`` does it. ``LENSFLOW_JPEG_DECODER=pil`` forces Pillow.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from export.errors import ManifestError

try:  # optional: the same libjpeg-turbo pixels as Pillow's draft, with less work around them
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: File suffixes read as images (any case); everything else in a folder is ignored.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
#: EXIF orientations that turn the image a quarter (width and height swap when made upright).
_QUARTER_TURNS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112
#: Resize filters by torchvision's ``InterpolationMode`` value. Keyed by name so that scoring,
#: which resamples with Pillow, never imports torchvision (seconds of start-up per process).
_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
RESIZE_FILTERS = tuple(_PIL_FILTERS)
#: How a JPEG is decoded before the resize → how many times the side the transform needs the
#: decode keeps: libjpeg-turbo's scaled IDCT at the smallest power-of-two scale that keeps twice
#: the side (``dct-scaled-2x``) or the side itself (``dct-scaled``: bundles written before
#: ``dct-scaled-2x``, decoded as they were trained); ``full`` decodes every pixel first.
JPEG_DECODES = {"dct-scaled-2x": 2, "dct-scaled": 1, "full": None}
#: Environment variable that picks the JPEG library: auto (simplejpeg when installed) | pil.
DECODER_ENV = "LENSFLOW_JPEG_DECODER"
#: EXIF orientation → the transpose that makes the image upright (as ImageOps.exif_transpose).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


@dataclass(frozen=True)
class Preprocessing:
    """Input recipe of an image model.

    input_size: side of the square crop the model sees.
    resize_size: shorter side an image is resized to before the centre crop at validation.
    mean, std: per-channel normalisation of RGB values scaled to [0, 1].
    interpolation: resize filter name (``bilinear`` | ``bicubic`` | ``nearest`` | ...).
    jpeg_decode: ``dct-scaled-2x`` | ``dct-scaled`` (JPEGs decoded at reduced scale, see
    :data:`JPEG_DECODES`) | ``full``.
    """

    input_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    jpeg_decode: str = "dct-scaled-2x"

    def __post_init__(self) -> None:
        if self.jpeg_decode not in JPEG_DECODES:
            raise ManifestError(f"preprocessing.jpeg_decode: {self.jpeg_decode!r} is not one of "
                                f"{', '.join(JPEG_DECODES)}")
        if self.interpolation.lower() not in RESIZE_FILTERS:
            raise ManifestError(f"preprocessing.interpolation: unknown resize filter "
                                f"{self.interpolation!r} (known: {', '.join(RESIZE_FILTERS)})")
        if min(self.input_size, self.resize_size) < 1:
            raise ManifestError(f"preprocessing: input_size {self.input_size} and resize_size "
                                f"{self.resize_size} must be positive")

    @property
    def mode(self):
        """The torchvision ``InterpolationMode`` of ``interpolation`` (training's transforms)."""
        from torchvision.transforms.v2 import InterpolationMode

        return InterpolationMode(self.interpolation.lower())

    def to_dict(self) -> dict:
        return asdict(self) | {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """From a manifest's ``preprocessing``; mean/std default to ImageNet's."""
        try:
            return cls(
                input_size=int(d["input_size"]),
                resize_size=int(d["resize_size"]),
                mean=tuple(float(v) for v in d.get("mean", IMAGENET_MEAN)),
                std=tuple(float(v) for v in d.get("std", IMAGENET_STD)),
                interpolation=str(d.get("interpolation", "bilinear")),
                # Bundles written before the field existed were decoded DCT-scaled already.
                jpeg_decode=str(d.get("jpeg_decode", "dct-scaled")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ManifestError(f"preprocessing: {err!r} in {d!r}") from None

    def with_size(self, input_size: int) -> Preprocessing:
        """The same recipe at another input size, keeping the resize/crop ratio."""
        ratio = self.resize_size / self.input_size
        return Preprocessing(input_size, round(input_size * ratio), self.mean, self.std,
                             self.interpolation, self.jpeg_decode)

    def with_crop_pct(self, crop_pct: float) -> Preprocessing:
        """The same recipe whose centre crop keeps ``crop_pct`` of the resized shorter side:
        ``resize_size = floor(input_size / crop_pct)``, exactly as timm's eval transform computes
        it (``110 / 0.55`` is 199.99… in floating point: 199, as there)."""
        return replace(self, resize_size=math.floor(self.input_size / crop_pct))

    def decode_side(self, need: int | None = None) -> int | None:
        """Shortest side a JPEG is decoded to (at reduced DCT scale) for a transform that needs
        ``need`` pixels (default: the validation resize's); None when ``jpeg_decode`` is
        ``full``. Training and scoring both ask here, so both decode alike."""
        keep = JPEG_DECODES[self.jpeg_decode]
        if keep is None:
            return None
        return keep * (need or max(self.resize_size, self.input_size))


def is_image_name(name: str) -> bool:
    """Whether a file name has an image suffix (any case)."""
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def upright(im: Image.Image) -> Image.Image:
    """``im`` as its EXIF orientation says it should be seen."""
    try:
        if im.getexif().get(_EXIF_ORIENTATION, 1) == 1:  # most files: skip exif_transpose's copy
            return im
        return ImageOps.exif_transpose(im)
    except Exception:  # a malformed EXIF block: keep the pixels as stored
        return im


def upright_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the image once EXIF-rotated, from its header alone."""
    with Image.open(path) as im:
        w, h = im.size
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    return (h, w) if orientation in _QUARTER_TURNS else (w, h)


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB from any mode Pillow opens: transparency over white, 16-bit scaled, CMYK converted."""
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


def open_rgb(path: str | Path, *, min_side: int | None = None,
             fast_idct: bool = False) -> Image.Image:
    """Decode an image file to an upright RGB image (first frame of an animation).

    min_side: shortest side the caller needs; JPEGs are decoded at the smallest DCT scale that
    keeps it, which is several times faster for camera-sized photos; ``fast_idct``: with
    libjpeg-turbo's faster, less exact inverse DCT (simplejpeg only). Raises what Pillow raises
    for a file that is not a sound image, and refuses decompression bombs instead of warning.
    """
    with Image.open(path) as im:
        _refuse_bomb(im)
        if min_side and im.format == "JPEG":
            fast = _scaled_jpeg(im, min_side, fast_idct)
            if fast is not None:
                return fast
            im.draft("RGB", (min_side, min_side))
        im.seek(0)
        im.load()
        return to_rgb(upright(im))


def _refuse_bomb(im: Image.Image) -> None:
    """Over ``MAX_IMAGE_PIXELS`` Pillow only warns; a nightly job should refuse, not swap.

    Checked here rather than by turning the warning into an error: ``warnings.catch_warnings``
    swaps process-wide filters, so decoding threads that enter and leave it at once restore each
    other's filters and let a bomb through (CI caught one). Pillow itself still raises
    DecompressionBombError above twice the limit, before this runs.
    """
    limit = Image.MAX_IMAGE_PIXELS
    pixels = im.width * im.height
    if limit is not None and pixels > limit:
        raise Image.DecompressionBombWarning(
            f"Image size ({pixels} pixels) exceeds limit of {limit} pixels, could be "
            "decompression bomb DOS attack.")


def jpeg_library() -> str:
    """The library that decodes JPEGs here: ``simplejpeg`` when installed (unless
    ``$LENSFLOW_JPEG_DECODER`` is ``pil``), else ``pil``."""
    if simplejpeg is None or os.environ.get(DECODER_ENV, "auto").lower() == "pil":
        return "pil"
    return "simplejpeg"


def _dct_scale(size: tuple[int, int], min_side: int) -> int:
    """Pillow ``draft``'s scale: the largest of 8, 4, 2, 1 that keeps ``min_side`` pixels."""
    scale = min(size) // min_side
    return next((a for a in (8, 4, 2) if scale >= a), 1)


def _scaled_jpeg(im: Image.Image, min_side: int, fast_idct: bool = False) -> Image.Image | None:
    """The upright RGB pixels Pillow's ``draft`` + ``load`` would give, decoded by simplejpeg;
    None when it is not installed or not asked for, or for a JPEG it does not take (CMYK,
    grayscale, a decoder error): the caller then decodes with Pillow."""
    if im.mode != "RGB" or jpeg_library() != "simplejpeg":
        return None
    scale = _dct_scale(im.size, min_side)
    width, height = (-(-im.width // scale), -(-im.height // scale))
    try:
        im.fp.seek(0)
        data = im.fp.read()
        # Exactly Pillow's scale: simplejpeg takes the smallest libjpeg-turbo scale at least
        # this big. At 1/8 the IDCT reads DC coefficients only, so the fast IDCT and chroma
        # upsampling give the same pixels for less work (tests/export/test_pixels_decode.py).
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=height,
                                        min_width=width, fastdct=fast_idct or scale == 8,
                                        fastupsample=scale == 8)
    except (ValueError, OSError, RuntimeError):
        return None
    if pixels.shape[:2] != (height, width):
        return None
    rgb = Image.fromarray(pixels)
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block: keep the pixels as stored, as upright() does
        orientation = 1
    return rgb.transpose(_UPRIGHT[orientation]) if orientation in _UPRIGHT else rgb


def resize_and_crop(im: Image.Image, pre: Preprocessing) -> Image.Image:
    """torchvision's ``Resize(resize_size)`` then ``CenterCrop(input_size)``, in one resample.

    Pillow resamples only the source box under the crop (its filter still reads the pixels
    around the box), so the result matches resizing the whole image and cropping, for less work.
    """
    width, height = im.size
    new_w, new_h = _resized(width, height, pre.resize_size)
    crop, name = pre.input_size, pre.interpolation.lower()
    if name == "nearest" or crop > min(new_w, new_h):
        # Nearest picks pixels by rounding, which the box form shifts; a crop larger than the
        # resized image needs torchvision's padding. Both take the two-step path.
        from torchvision.transforms.v2 import functional as F

        resized = F.resize(im, [pre.resize_size], interpolation=pre.mode, antialias=True)
        return F.center_crop(resized, [crop, crop])
    left, top = int(round((new_w - crop) / 2.0)), int(round((new_h - crop) / 2.0))
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    return im.resize((crop, crop), _PIL_FILTERS[name], box=box)


def decode_for_model(path: str | Path, pre: Preprocessing) -> np.ndarray:
    """uint8 (input_size, input_size, 3) RGB, the exported graph's input for one file."""
    im = open_rgb(path, min_side=pre.decode_side())
    return np.asarray(resize_and_crop(im, pre), dtype=np.uint8)


def _resized(w: int, h: int, resize_size: int) -> tuple[int, int]:
    """Size after resizing the shorter side to ``resize_size`` (torchvision's long-side rule)."""
    if min(w, h) == resize_size:
        return w, h
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resize_size * long / short)
    return (resize_size, new_long) if w <= h else (new_long, resize_size)


def crop_geometry(size: tuple[int, int], pre: Preprocessing) -> tuple[float, float, int, int]:
    """(scale_x, scale_y, left, top) of resize-shorter-side then centre-crop, as torchvision
    v2 ``Resize(resize_size)`` + ``CenterCrop(input_size)`` move key points."""
    w, h = size
    new_w, new_h = _resized(w, h, pre.resize_size)
    left = int(round((new_w - pre.input_size) / 2.0))
    top = int(round((new_h - pre.input_size) / 2.0))
    return new_w / w, new_h / h, left, top


def to_model_frame(pixels: Sequence[float], size: tuple[int, int],
                   pre: Preprocessing) -> list[float]:
    """Points in original pixels → [-1, 1] coordinates in the validation crop."""
    sx, sy, left, top = crop_geometry(size, pre)
    xy = np.asarray(pixels, dtype=np.float64).reshape(-1, 2) * [sx, sy] - [left, top]
    return (xy / pre.input_size * 2 - 1).reshape(-1).tolist()


def from_model_frame(coords: Sequence[float], size: tuple[int, int],
                     pre: Preprocessing) -> list[float]:
    """[-1, 1] coordinates in the validation crop → points in original pixels."""
    sx, sy, left, top = crop_geometry(size, pre)
    xy = (np.asarray(coords, dtype=np.float64).reshape(-1, 2) + 1) / 2 * pre.input_size
    return ((xy + [left, top]) / [sx, sy]).reshape(-1).tolist()


def decode_batch_cuda(paths: Sequence[str | Path], pre: Preprocessing,
                      device: str = "cuda") -> tuple[object, list[int], list[tuple[int, str]]]:
    """Decode JPEGs on the GPU (nvJPEG, one batched call) and resize and crop them there.

    Returns (uint8 (n, input_size, input_size, 3) tensor on ``device``, indices of the paths it
    holds, [(index, error)] of paths it could not decode). The decode is full-size (nvJPEG has
    no DCT scaling) and the resize is torch's antialiased one on the GPU, so its pixels are close
    to, not equal to, the CPU path's; ``benchmarks/gpu_check.sh`` measures the difference.
    EXIF orientation is read from each header on the CPU and applied on the GPU. Files that are
    not baseline/progressive JPEGs (or that nvJPEG refuses) are decoded on the CPU as usual.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    datas, orientations, indices, failed, cpu = [], [], [], [], []
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                if im.format != "JPEG" or im.mode != "RGB":
                    cpu.append(i)
                    continue
                orientations.append(im.getexif().get(_EXIF_ORIENTATION, 1))
            datas.append(torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8))
            indices.append(i)
        except Exception:  # an unreadable header: the CPU path below names the error
            cpu.append(i)
    crops = []
    if datas:
        try:
            decoded = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the batched call: decode on the CPU instead
            cpu += indices
            decoded, indices, orientations = [], [], []
        for image, orientation in zip(decoded, orientations, strict=True):
            crops.append(_resize_and_crop_tensor(_upright_tensor(image, orientation), pre))
    for i in sorted(cpu):
        try:
            crops.append(torch.from_numpy(decode_for_model(paths[i], pre).copy())
                         .permute(2, 0, 1).to(device))
            indices.append(i)
        except Exception as err:  # the row's error, as on the CPU path
            failed.append((i, f"{type(err).__name__}: {' '.join(str(err).split())}"))
    size = pre.input_size
    batch = (torch.stack(crops).permute(0, 2, 3, 1).contiguous() if crops
             else torch.empty((0, size, size, 3), dtype=torch.uint8, device=device))
    return batch, indices, failed


def _upright_tensor(image, orientation: int):
    """A CHW tensor turned as EXIF ``orientation`` says (the transposes of :data:`_UPRIGHT`)."""
    if orientation in (2, 4):
        return image.flip(-1 if orientation == 2 else -2)
    if orientation == 3:
        return image.flip(-1).flip(-2)
    if orientation in (5, 7):  # transpose / transverse
        image = image.transpose(-1, -2)
        return image if orientation == 5 else image.flip(-1).flip(-2)
    if orientation in (6, 8):
        return image.rot90(-1 if orientation == 6 else 1, dims=(-2, -1))
    return image


def _resize_and_crop_tensor(image, pre: Preprocessing):
    """torchvision v2 ``Resize(resize_size)`` + ``CenterCrop(input_size)`` of a uint8 CHW tensor
    (antialiased, on whatever device it lives)."""
    from torchvision.transforms.v2 import functional as F

    resized = F.resize(image, [pre.resize_size], interpolation=pre.mode, antialias=True)
    return F.center_crop(resized, [pre.input_size, pre.input_size])
