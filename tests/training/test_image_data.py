"""Image data prep: folder and CSV layouts, odd files, splits, and the loaders' batches."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from paths import SHARED_DATA
from PIL import Image

from export.pixels import Preprocessing
from training.data.image_loaders import ImageItemsDataset, build_image_loaders
from training.data.images import ImageItem, from_csv, from_folder, unreadable_reason
from training.data.transforms import load_rgb, valid_transform
from training.errors import TrainingError

SMALL = Preprocessing(input_size=24, resize_size=28)


def write_images(folder: Path, n: int, *, start: int = 0, ext: str = "png", seed: int = 0,
                 colour: tuple[int, int, int] | None = None) -> list[Path]:
    """`n` 32x32 noise (or flat `colour`) images named img_<i>.<ext>."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(start, start + n):
        if colour is None:
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        else:
            pixels = np.full((32, 32, 3), colour, dtype=np.uint8)
        path = folder / f"img_{i:03d}.{ext}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def write_odd_files(folder: Path) -> dict[str, Path]:
    """The awkward files of real folders: broken ones and unusual image modes."""
    folder.mkdir(parents=True, exist_ok=True)
    odd = {name: folder / name for name in (
        "empty.jpg", "cut.jpg", "notes.jpg", "palette.gif", "cmyk.jpg", "alpha.png", "deep.png")}
    odd["empty.jpg"].write_bytes(b"")
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "whole.jpg", quality=90)
    whole = (folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    odd["cut.jpg"].write_bytes(whole[: len(whole) // 2])
    odd["notes.jpg"].write_text("not a picture\n")
    first = Image.new("P", (32, 32), 1)
    first.putpalette([0, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * 759)
    second = first.copy()
    second.paste(2, (0, 0, 32, 32))
    first.save(odd["palette.gif"], save_all=True, append_images=[second], duration=100)
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(odd["cmyk.jpg"])
    alpha = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    alpha.paste((0, 0, 255, 255), (0, 0, 16, 32))
    alpha.save(odd["alpha.png"])
    Image.fromarray(np.full((32, 32), 30000, dtype=np.uint16)).save(odd["deep.png"])
    return odd


@pytest.fixture
def odd_folder(tmp_path: Path) -> Path:
    root = tmp_path / "bugs"
    write_images(root / "train" / "ants", 3, ext="jpg")
    write_odd_files(root / "train" / "ants")
    (root / "train" / "ants" / "readme.txt").write_text("ignored: not an image extension")
    (root / "train" / "ants" / ".hidden.jpg").write_bytes(b"")
    write_images(root / "train" / "bees", 3, seed=2)
    Image.new("RGB", (32, 32), "yellow").save(root / "train" / "bees" / "UPPER.JPG")
    write_images(root / "val" / "ants", 2, seed=3)
    write_images(root / "val" / "bees", 2, seed=4)
    return root


def test_folder_layout_skips_broken_files_and_names_them_in_one_line(odd_folder):
    data = from_folder(odd_folder)
    assert data.classes == ("ants", "bees")
    assert data.class_counts("train") == {"ants": 3 + 4, "bees": 4}
    assert data.class_counts("valid") == {"ants": 2, "bees": 2}
    reasons = {s.path.name: s.reason for s in data.skipped}
    assert set(reasons) == {"empty.jpg", "cut.jpg", "notes.jpg"}
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["notes.jpg"] == "not an image"
    assert "truncated" in reasons["cut.jpg"]
    names = {item.path.name for item in data.train}
    assert {"palette.gif", "cmyk.jpg", "alpha.png", "deep.png", "UPPER.JPG"} <= names
    assert not names & {"readme.txt", ".hidden.jpg"}
    summary = data.summary()
    assert "\n" not in summary
    for name in reasons:
        assert f"train/ants/{name}" in summary
    assert "train 11 (ants 7, bees 4)" in summary and "skipped 3" in summary
    assert data.to_dict()["counts"]["valid"] == {"ants": 2, "bees": 2}


def test_odd_modes_decode_to_upright_rgb(tmp_path):
    odd = write_odd_files(tmp_path)
    for name in ("palette.gif", "cmyk.jpg", "alpha.png", "deep.png"):
        assert load_rgb(odd[name]).mode == "RGB", name
    assert load_rgb(odd["palette.gif"]).getpixel((5, 5)) == (0, 0, 255)  # first frame, not last
    cmyk = load_rgb(odd["cmyk.jpg"]).getpixel((5, 5))
    assert cmyk[0] > 200 and cmyk[1] < 50 and cmyk[2] < 50
    alpha = load_rgb(odd["alpha.png"])
    assert alpha.getpixel((4, 4)) == (0, 0, 255) and alpha.getpixel((28, 4)) == (255, 255, 255)
    gray = load_rgb(odd["deep.png"]).getpixel((5, 5))  # 30000 of 65535, not clipped to white
    assert gray[0] == gray[2] and abs(gray[0] - 30000 / 65535 * 255) < 2


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    Image.new("RGB", (40, 20), "red").save(path, exif=exif)
    assert load_rgb(path).size == (20, 40)


def test_unreadable_reason_accepts_good_images(tmp_path):
    for path in write_images(tmp_path, 1, ext="jpg") + write_images(tmp_path, 1, ext="webp"):
        assert unreadable_reason(path) is None


def test_jpeg_with_bytes_after_its_end_marker_is_kept(tmp_path):
    padded, trailer = write_images(tmp_path, 2, ext="jpg")
    padded.write_bytes(padded.read_bytes() + b"\x00" * 100)
    trailer.write_bytes(trailer.read_bytes() + b"camera maker notes")
    assert unreadable_reason(padded) is None and unreadable_reason(trailer) is None
    whole = padded.read_bytes()
    padded.write_bytes(whole[: len(whole) * 2 // 3])
    assert "truncated" in unreadable_reason(padded)


def test_empty_class_is_refused(tmp_path):
    root = tmp_path / "d"
    write_images(root / "train" / "ants", 2)
    (root / "train" / "bees").mkdir(parents=True)
    (root / "train" / "bees" / "broken.jpg").write_bytes(b"")
    write_images(root / "val" / "bees", 2)
    with pytest.raises(TrainingError, match=r"class 'bees' has no training images in .*train/bees"):
        from_folder(root)


def test_validation_only_class_is_refused(tmp_path):
    root = tmp_path / "d"
    write_images(root / "train" / "ants", 2)
    write_images(root / "valid" / "wasps", 2)
    with pytest.raises(TrainingError, match=r"class 'wasps' is only in .*valid/wasps"):
        from_folder(root)


def test_test_split_and_missing_validation_folder(tmp_path):
    root = tmp_path / "d"
    for name in ("a", "b"):
        write_images(root / "train" / name, 10)
        write_images(root / "test" / name, 3)
    data = from_folder(root, valid_pct=0.2)
    assert data.class_counts("valid") == {"a": 2, "b": 2}
    assert data.class_counts("test") == {"a": 3, "b": 3}
    assert data.class_counts("train") == {"a": 8, "b": 8}


def test_single_folder_split_is_stratified_and_seeded(tmp_path):
    for name, n in (("cat", 10), ("dog", 20), ("owl", 2)):
        write_images(tmp_path / name, n)
    first = from_folder(tmp_path, valid_pct=0.2, seed=7)
    assert first.class_counts("valid") == {"cat": 2, "dog": 4, "owl": 1}
    assert first.class_counts("train") == {"cat": 8, "dog": 16, "owl": 1}
    assert from_folder(tmp_path, valid_pct=0.2, seed=7) == first
    other = from_folder(tmp_path, valid_pct=0.2, seed=8)
    assert {i.path for i in other.valid} != {i.path for i in first.valid}
    train, valid = {i.path for i in first.train}, {i.path for i in first.valid}
    assert not train & valid and len(train | valid) == 32


def test_bad_valid_pct_and_missing_folder(tmp_path):
    with pytest.raises(TrainingError, match="valid_pct"):
        from_folder(tmp_path, valid_pct=1.0)
    with pytest.raises(TrainingError, match="does not exist"):
        from_folder(tmp_path / "nowhere")
    with pytest.raises(TrainingError, match="no class folders"):
        from_folder(tmp_path)


def test_csv_layout_with_is_valid_column(tmp_path):
    images = tmp_path / "images"
    paths = write_images(images, 8)
    outside = write_images(tmp_path / "elsewhere", 1, start=100)[0]
    (images / "bad.png").write_bytes(b"")
    rows = ["fname,label,is_valid"]
    rows += [f"{p.name},{'10' if i % 2 else '2'},{'True' if i >= 6 else 'false'}"
             for i, p in enumerate(paths)]
    rows += [f"{outside},2,0", "bad.png,10,0"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    data = from_csv(tmp_path / "labels.csv", images)
    assert data.source == "csv"
    assert data.classes == ("2", "10")  # numeric labels in numeric order
    assert data.class_counts("train") == {"2": 4, "10": 3}
    assert data.class_counts("valid") == {"2": 1, "10": 1}
    assert outside in {i.path for i in data.train}
    assert [s.path.name for s in data.skipped] == ["bad.png"]


def test_csv_without_is_valid_splits_by_pct(tmp_path):
    paths = write_images(tmp_path, 10)
    rows = ["file,kind"] + [f"{p.name},{'x' if i < 5 else 'y'}" for i, p in enumerate(paths)]
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    data = from_csv(tmp_path / "l.csv", tmp_path, fname_col="file", label_col="kind",
                    valid_pct=0.4)
    assert data.class_counts("valid") == {"x": 2, "y": 2}


@pytest.mark.parametrize("rows, message", [
    (["name,label", "img_000.png,a"], r"labels\.csv line 1: no column 'fname'"),
    (["fname,label", "img_000.png,a", "gone.png,b"], r"labels\.csv line 3: file 'gone\.png'"),
    (["fname,label,is_valid", "img_000.png,a,maybe"], r"labels\.csv line 2: is_valid .*'maybe'"),
    (["fname,label,is_valid", "img_000.png,a,0", "img_001.png,b,1"],
     r"labels\.csv line 3: class 'b' is only in validation"),
    (["fname,label", "img_000.png,"], r"labels\.csv line 2: empty label"),
])
def test_csv_errors_name_file_and_line(tmp_path, rows, message):
    write_images(tmp_path, 2)
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(TrainingError, match=message):
        from_csv(tmp_path / "labels.csv", tmp_path)


@pytest.fixture
def flat_colour_data(tmp_path) -> Path:
    """Class 'red' is pure red, class 'blue' pure blue: normalised values are known exactly."""
    write_images(tmp_path / "train" / "blue", 6, colour=(0, 0, 255))
    write_images(tmp_path / "train" / "red", 6, start=10, colour=(255, 0, 0))
    write_images(tmp_path / "val" / "blue", 2, start=20, colour=(0, 0, 255))
    write_images(tmp_path / "val" / "red", 3, start=30, colour=(255, 0, 0))
    return tmp_path


def test_loader_batches_have_shape_dtype_and_normalisation(flat_colour_data):
    data = from_folder(flat_colour_data)
    loaders = build_image_loaders(data, SMALL, bs=4, workers=0)
    assert loaders.classes == ("blue", "red")
    x, y = next(iter(loaders.train))
    assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.long
    assert len(loaders.train) == 3  # 12 images in batches of 4, nothing ragged to drop
    xv, yv = torch.cat([b[0] for b in loaders.valid]), torch.cat([b[1] for b in loaders.valid])
    assert xv.shape == (5, 3, 24, 24)
    mean, std = torch.tensor(SMALL.mean), torch.tensor(SMALL.std)
    for image, label in zip(xv, yv, strict=True):
        rgb = torch.tensor([0.0, 0.0, 1.0] if label == 0 else [1.0, 0.0, 0.0])
        expected = ((rgb - mean) / std)[:, None, None].expand(3, 24, 24)
        assert torch.allclose(image, expected, atol=1e-5)


def test_train_plain_keeps_order_and_shuffling_is_seeded(flat_colour_data):
    data = from_folder(flat_colour_data)
    plain = build_image_loaders(data, SMALL, bs=5, workers=0).train_plain
    assert torch.cat([y for _, y in plain]).tolist() == [item.label for item in data.train]

    def first_epoch(seed: int) -> list[int]:
        loaders = build_image_loaders(data, SMALL, bs=12, workers=0, seed=seed)
        return torch.cat([y for _, y in loaders.train]).tolist()

    assert first_epoch(1) == first_epoch(1)
    assert any(first_epoch(1) != first_epoch(s) for s in (2, 3, 4))


def test_ragged_last_batch_is_dropped_only_for_training(flat_colour_data):
    data = from_folder(flat_colour_data)  # 12 train, 5 valid
    loaders = build_image_loaders(data, SMALL, bs=5, workers=0)
    assert [len(y) for _, y in loaders.train] == [5, 5]
    assert [len(y) for _, y in loaders.valid] == [5]
    assert [len(y) for _, y in loaders.train_plain] == [5, 5, 2]


def test_loaders_with_worker_processes(flat_colour_data):
    data = from_folder(flat_colour_data)
    loaders = build_image_loaders(data, SMALL, bs=4, workers=1)
    assert loaders.train.persistent_workers and not loaders.train_plain.persistent_workers
    assert sum(len(y) for _, y in loaders.valid) == 5


def test_float_tuple_targets_become_float_tensors(tmp_path):
    path = write_images(tmp_path, 1)[0]
    ds = ImageItemsDataset([ImageItem(path, (0.25, -0.5))], valid_transform(SMALL))
    image, target = ds[0]
    assert image.shape == (3, 24, 24)
    assert target.dtype == torch.float32 and target.tolist() == [0.25, -0.5]


HYMENOPTERA = SHARED_DATA / "hymenoptera_data"


@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason="shared/data/hymenoptera_data not present")
def test_hymenoptera_preps_quickly_and_keeps_the_palette_gif():
    start = time.perf_counter()
    data = from_folder(HYMENOPTERA)
    seconds = time.perf_counter() - start
    assert data.classes == ("ants", "bees")
    assert (len(data.train), len(data.valid), len(data.skipped)) == (245, 153, 0)
    assert seconds < 5, f"prep of 398 files took {seconds:.2f} s"
    gif = next(i for i in data.train if i.path.name == "imageNotFound.gif")
    assert data.classes[gif.label] == "ants"
    x, _ = ImageItemsDataset([gif], valid_transform(Preprocessing()))[0]
    assert x.shape == (3, 224, 224) and torch.isfinite(x).all()
