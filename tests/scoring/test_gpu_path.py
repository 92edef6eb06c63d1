"""The GPU scoring path: batched JPEG decoding with the resize where the decode ran, and ONNX
Runtime's CUDA provider reading that batch in place. The decode runs on the CPU here too (the
same code, device="cpu"), so it is checked on every machine; the CUDA tests skip without one."""

from __future__ import annotations

import threading
from datetime import date

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_image_bundle import make_image_bundle

from export.bundle import load_bundle
from export.pixels import (
    _UPRIGHT,
    Preprocessing,
    _upright_tensor,
    decode_batch_cuda,
    decode_for_model,
)
from export.runtime import onnx_cuda_available, open_bundle_graph
from scoring.image_batches import gpu_decoded_batches, prefetched
from scoring.image_folder import walk_images
from scoring.image_scoring import score_image_folder
from scoring.partition import read_partition

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PRE = Preprocessing(32, 36)


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x * y) % 255], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("orientation", sorted(_UPRIGHT))
def test_tensor_orientation_matches_pillows_transpose(orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(stored).transpose(_UPRIGHT[orientation]))
    turned = _upright_tensor(torch.from_numpy(stored).permute(2, 0, 1), orientation)
    assert np.array_equal(turned.permute(1, 2, 0).numpy(), expected)


def test_batch_decode_is_close_to_the_cpu_path_and_keeps_bad_files_aside(tmp_path):
    paths = []
    for i, (size, orientation) in enumerate([((120, 90), 1), ((90, 120), 6), ((200, 150), 3)]):
        exif = Image.Exif()
        exif[0x0112] = orientation
        paths.append(tmp_path / f"{i}.jpg")
        _photo(*size, seed=i).save(paths[-1], quality=95, exif=exif)
    paths.append(tmp_path / "3.png")
    _photo(60, 80).save(paths[-1])
    paths.append(tmp_path / "4.jpg")
    paths[-1].write_bytes(b"not a jpeg")
    images, indices, failed = decode_batch_cuda(paths, PRE, device="cpu")
    assert images.shape == (4, 32, 32, 3) and images.dtype == torch.uint8
    assert sorted(indices) == [0, 1, 2, 3] and [i for i, _ in failed] == [4]
    for row, i in enumerate(indices):
        reference = decode_for_model(paths[i], PRE).astype(int)
        # Same picture, same orientation; torch's and Pillow's antialiased resizes differ a bit.
        assert np.abs(images[row].numpy() - reference).mean() < 4


def test_gpu_batches_keep_file_order_and_global_indices(tmp_path):
    for i in range(5):
        _photo(64, 48, seed=i).save(tmp_path / f"{i}.jpg", quality=95)
    (tmp_path / "2.jpg").write_bytes(b"broken")
    files = walk_images(tmp_path)
    batches = list(gpu_decoded_batches(files, PRE, batch_size=3, device="cpu"))
    assert [b.indices.tolist() for b in batches] == [[0, 1], [3, 4]]
    assert [i for b in batches for i, _ in b.failed] == [2]
    expected = decode_for_model(files[3].path, PRE).astype(int)
    assert np.abs(batches[1].images[0].numpy() - expected).mean() < 4


def test_prefetched_keeps_order_and_runs_ahead_of_the_consumer():
    made = []
    third_made = threading.Event()

    def produce():
        for i in range(6):
            made.append(i)
            if i == 2:
                third_made.set()
            yield i

    items = prefetched(produce(), ahead=2)
    assert next(items) == 0
    # While the consumer holds item 0, the thread goes on and makes 1 and 2.
    assert third_made.wait(timeout=10)
    assert [0, *items] == list(range(6)) == made


def test_prefetched_raises_the_producers_error_where_it_happened():
    def produce():
        yield "a"
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetched(produce(), ahead=2):
            got.append(item)
    assert got == ["a"]


def test_a_consumer_that_stops_early_stops_the_prefetch_thread():
    made = []

    def endless():
        while True:
            made.append(len(made))
            yield made[-1]

    items = prefetched(endless(), ahead=2)
    assert next(items) == 0
    items.close()
    assert not [t for t in threading.enumerate() if t.name == "lensflow-prefetch"]
    assert len(made) <= 4  # one taken, at most two waiting, one being offered


@cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not onnx_cuda_available(),
                    reason="needs onnxruntime's CUDA provider")
def test_io_binding_gives_the_host_path_outputs(tmp_path):
    bundle = load_bundle(make_image_bundle(tmp_path))
    rt = open_bundle_graph(bundle, "onnx", "cuda")
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    host = rt.run(images)
    bound = rt.run(torch.from_numpy(images).cuda())
    np.testing.assert_allclose(bound["scores"], host["scores"], rtol=1e-5, atol=1e-6)


@cuda
def test_gpu_decode_scores_like_cpu_decode(tmp_path):
    bundle = make_image_bundle(tmp_path / "reg")
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(12):
        _photo(160, 120, seed=i).save(folder / f"{i:02d}.jpg", quality=95)
    rows = {}
    for gpu in (False, True):
        out = tmp_path / f"out{gpu}"
        summary = score_image_folder(folder, bundle, out, gpu_decode=gpu, workers=0)
        run_date = date.fromisoformat(summary.partition.rsplit("=", 1)[1])
        table = read_partition(out, "image_predictions", run_date)
        rows[gpu] = table.to_pydict()
    assert rows[True]["path"] == rows[False]["path"]
    assert np.mean(np.array(rows[True]["pred_label"]) == np.array(rows[False]["pred_label"])) \
        >= 0.9
