"""JPEG decoding: the optional simplejpeg path gives Pillow's pixels bit for bit, whatever the
DCT scale, EXIF orientation or JPEG flavour, and the decode mode travels in the manifest."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from export import pixels
from export.errors import ManifestError
from export.pixels import (
    DECODER_ENV,
    Preprocessing,
    decode_for_model,
    open_rgb,
    resize_and_crop,
)

simplejpeg = pytest.importorskip("simplejpeg")


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth gradient with noise: compresses like a photo, unlike pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


def _decode_both(path, min_side, monkeypatch) -> tuple[np.ndarray, np.ndarray]:
    monkeypatch.setenv(DECODER_ENV, "pil")
    assert pixels.jpeg_library() == "pil"
    reference = np.asarray(open_rgb(path, min_side=min_side))
    monkeypatch.setenv(DECODER_ENV, "auto")
    assert pixels.jpeg_library() == "simplejpeg"
    return np.asarray(open_rgb(path, min_side=min_side)), reference


@pytest.mark.parametrize(("size", "min_side", "save"), [
    ((500, 375), 256, {}),                                  # ~0.2 MP: no DCT scaling
    ((1203, 907), 256, {}),                                 # scale 1/2, odd sides round up
    ((1366, 1024), 128, {"subsampling": "4:2:0"}),          # scale 1/8
    ((1100, 1030), 256, {"subsampling": "4:4:4"}),          # scale 1/4, no chroma subsampling
    ((900, 1300), 256, {"progressive": True}),              # progressive JPEG
])
def test_simplejpeg_gives_pillows_pixels(tmp_path, monkeypatch, size, min_side, save):
    path = tmp_path / "a.jpg"
    _photo(*size).save(path, quality=90, **save)
    fast, reference = _decode_both(path, min_side, monkeypatch)
    assert fast.shape == reference.shape and min(fast.shape[:2]) >= min_side
    assert np.array_equal(fast, reference)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_alike(tmp_path, monkeypatch, orientation):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    _photo(1200, 800).save(path, quality=90, exif=exif)
    fast, reference = _decode_both(path, 256, monkeypatch)
    assert np.array_equal(fast, reference)
    assert (fast.shape[0] > fast.shape[1]) == (orientation in (6, 8))


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_jpegs_simplejpeg_does_not_take_fall_back_to_pillow(tmp_path, monkeypatch, mode):
    path = tmp_path / "other.jpg"
    _photo(800, 600).convert(mode).save(path, quality=90)
    fast, reference = _decode_both(path, 256, monkeypatch)
    assert fast.shape[2] == 3 and np.array_equal(fast, reference)


def test_a_truncated_jpeg_fails_as_pillow_fails(tmp_path, monkeypatch):
    path = tmp_path / "cut.jpg"
    _photo(800, 600).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:2000])
    monkeypatch.setenv(DECODER_ENV, "auto")
    with pytest.raises(OSError):
        open_rgb(path, min_side=256)


@pytest.mark.parametrize(("size", "twice", "once"), [
    ((500, 375), (500, 375), (500, 375)),        # ~0.2 MP: every pixel under both rules
    ((1600, 1200), (800, 600), (400, 300)),      # 1200 // 512 = 2; 1200 // 256 = 4
    ((1200, 1600), (600, 800), (300, 400)),      # portrait: the short side still decides
    ((2732, 2048), (683, 512), (342, 256)),      # 2048 = 8 × 256: exactly 2× / 1× the side
    ((4032, 3024), (1008, 756), (504, 378)),     # a 12 MP phone photo: 1/4 and 1/8
])
@pytest.mark.parametrize("library", ["pil", "auto"])
def test_the_decode_keeps_twice_the_side_and_old_bundles_the_side_itself(
        tmp_path, monkeypatch, size, twice, once, library):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", size, (90, 140, 60)).save(path, quality=80)
    monkeypatch.setenv(DECODER_ENV, library)
    new = Preprocessing(224, 256)
    old = Preprocessing.from_dict({"input_size": 224, "resize_size": 256})  # no jpeg_decode
    assert (new.jpeg_decode, old.jpeg_decode) == ("dct-scaled-2x", "dct-scaled")
    assert open_rgb(path, min_side=new.decode_side()).size == twice
    assert open_rgb(path, min_side=old.decode_side()).size == once


@pytest.mark.parametrize("mode", ["dct-scaled-2x", "dct-scaled"])
def test_both_libraries_give_the_same_model_input_in_each_mode(tmp_path, monkeypatch, mode):
    path = tmp_path / "photo.jpg"
    _photo(1366, 1100).save(path, quality=90)  # 1/4 under dct-scaled-2x, 1/8 under dct-scaled
    pre = Preprocessing(64, 72, jpeg_decode=mode)
    monkeypatch.setenv(DECODER_ENV, "pil")
    reference = decode_for_model(path, pre)
    monkeypatch.setenv(DECODER_ENV, "auto")
    assert np.array_equal(decode_for_model(path, pre), reference)


def test_an_old_manifest_value_decodes_as_it_was_exported(tmp_path):
    # dct-scaled was: the smallest DCT scale keeping max(resize_size, input_size), one resample.
    path = tmp_path / "photo.jpg"
    _photo(1366, 1100).save(path, quality=90)
    old = Preprocessing.from_dict({"input_size": 64, "resize_size": 72,
                                   "jpeg_decode": "dct-scaled"})
    before = np.asarray(resize_and_crop(open_rgb(path, min_side=72), old))
    assert np.array_equal(decode_for_model(path, old), before)
    assert not np.array_equal(decode_for_model(path, Preprocessing(64, 72)), before)


def test_decode_mode_is_in_the_manifest_and_full_decodes_every_pixel(tmp_path, monkeypatch):
    pre = Preprocessing(64, 72)
    assert pre.to_dict()["jpeg_decode"] == "dct-scaled-2x"
    assert Preprocessing.from_dict(pre.to_dict()).jpeg_decode == "dct-scaled-2x"
    assert Preprocessing.from_dict({"input_size": 64, "resize_size": 72}).jpeg_decode \
        == "dct-scaled"  # older manifests: what their training did
    full = Preprocessing.from_dict(pre.to_dict() | {"jpeg_decode": "full"})
    assert full.with_size(32).jpeg_decode == "full" and full.decode_side() is None
    with pytest.raises(ManifestError, match="jpeg_decode"):
        Preprocessing(jpeg_decode="fast")
    path = tmp_path / "big.jpg"
    _photo(800, 600).save(path, quality=90)
    scaled, every = decode_for_model(path, pre), decode_for_model(path, full)
    assert scaled.shape == every.shape == (64, 64, 3)
    # Same picture, not the same pixels: the reduced decode is an approximation of the full one.
    assert 0 < np.abs(scaled.astype(int) - every).mean() < 3
