"""Image-folder scoring: the walk, every kind of bad file, the pinned schema, incremental runs."""

from __future__ import annotations

import io
import os
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image
from tiny_image_bundle import make_image_bundle

import scoring.image_rows as image_rows
from export.errors import ManifestError
from export.pixels import Preprocessing as DecodeSpec
from export.pixels import decode_for_model as decode_image
from export.pixels import resize_and_crop
from scoring import bundle_cache
from scoring.errors import BundleRefError, ImageFolderError, ScoringError
from scoring.image_folder import walk_images
from scoring.image_rows import IMAGE_PREDICTIONS_SCHEMA, already_scored
from scoring.image_scoring import open_image_bundle, score_image_folder
from scoring.options import ImageScoreOptions
from scoring.partition import read_partition

DAY = date(2026, 11, 22)
NEXT_DAY = date(2026, 11, 23)
SPEC = DecodeSpec(input_size=32, resize_size=36)


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _good_images(root: Path) -> dict[str, Path]:
    """One file per decodable kind the scorer must accept, keyed by its relative path."""
    (root / "sub" / "deeper").mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}

    def save(rel: str, image: Image.Image, **kw) -> None:
        image.save(root / rel, **kw)
        made[rel] = root / rel

    save("rgb.jpg", Image.fromarray(_noise(40, 50, 1)))
    save("UPPER.JPG", Image.fromarray(_noise(30, 60, 2)))
    save("grey.png", Image.fromarray(_noise(40, 40, 3)[..., 0]))  # L
    save("palette.png", Image.fromarray(_noise(40, 40, 4)).convert("P"))
    save("alpha.png", Image.fromarray(np.dstack([_noise(40, 40, 5), np.full((40, 40), 128,
                                                                           np.uint8)])))
    save("cmyk.jpg", Image.fromarray(_noise(40, 40, 6)).convert("CMYK"))
    save("sixteen.png", Image.fromarray(_noise(40, 40, 7)[..., 0].astype(np.uint16) * 257))
    frames = [Image.fromarray(_noise(40, 40, s)).convert("P") for s in (8, 9)]
    save("sub/anim.gif", frames[0], save_all=True, append_images=frames[1:])
    save("sub/pic.webp", Image.fromarray(_noise(40, 40, 10)))
    save("sub/pic.bmp", Image.fromarray(_noise(40, 40, 11)))
    save("sub/deeper/pic.tif", Image.fromarray(_noise(40, 40, 12)))
    save("sub/deeper/pic.TIFF", Image.fromarray(_noise(40, 40, 13)))
    return made


def _bad_images(root: Path) -> dict[str, str]:
    """Broken files with the exception class each row's error must name."""
    (root / "bad").mkdir(parents=True, exist_ok=True)
    (root / "bad/empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(_noise(40, 40, 20)).save(buf, "JPEG")
    (root / "bad/truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "bad/text.png").write_text("not an image at all\n")
    Image.fromarray(_noise(70, 70, 21)).save(root / "bad/bomb.png")  # 4900 px
    Image.fromarray(_noise(50, 50, 22)).save(root / "bad/bomb_warning.png")  # 2500 px
    return {"bad/empty.jpg": "UnidentifiedImageError", "bad/truncated.jpg": "OSError",
            "bad/text.png": "UnidentifiedImageError", "bad/bomb.png": "DecompressionBombError",
            "bad/bomb_warning.png": "DecompressionBombWarning"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    reg = tmp_path_factory.mktemp("registry")
    make_image_bundle(reg)
    make_image_bundle(reg, task="multi_label", name="tags")
    make_image_bundle(reg, task="regression", name="points")
    return reg


@pytest.fixture
def small_bomb_limit(monkeypatch):
    # Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that.
    # The good images have at most 2000 px.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2100)


def test_walk_is_sorted_recursive_filtered_and_survives_symlink_loops(tmp_path):
    made = _good_images(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub" / "photo.jpg.bak").write_text("x")
    os.symlink(tmp_path, tmp_path / "sub" / "loop")  # a directory cycle
    (tmp_path / ".thumbnails").mkdir()
    Image.fromarray(_noise(8, 8, 0)).save(tmp_path / ".thumbnails" / "rgb.jpg")
    (tmp_path / "sub" / "._rgb.jpg").write_bytes(b"\0\5\26\7")  # a macOS resource fork
    found = [f.relpath for f in walk_images(tmp_path)]
    assert found == sorted(made)
    assert all(f.size == (tmp_path / f.relpath).stat().st_size for f in walk_images(tmp_path))


def test_a_file_name_that_is_not_utf8_is_scored_under_a_printable_path(tmp_path, registry):
    (tmp_path / "in").mkdir()
    raw = os.path.join(os.fsencode(tmp_path / "in"), b"caf\xe9.png")
    Image.fromarray(_noise(40, 40, 0)).save(raw.decode("utf-8", "surrogateescape"))
    summary = score_image_folder(tmp_path / "in", registry / "tiny", tmp_path / "out",
                                 run_date=DAY, workers=0)
    assert summary.scored == 1
    assert read_partition(tmp_path / "out", "image_predictions", DAY)["path"].to_pylist() == [
        "caf\ufffd.png"]


def test_decode_handles_modes_and_geometry(tmp_path):
    made = _good_images(tmp_path)
    for rel, path in made.items():
        image = decode_image(path, SPEC)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8, rel
    # Half-transparent over white is lighter than the opaque colours underneath.
    alpha = decode_image(made["alpha.png"], SPEC).astype(int)
    assert alpha.min() >= 127
    # 16-bit grey is scaled down, not clipped to white.
    assert 60 < decode_image(made["sixteen.png"], SPEC).mean() < 195
    # Centre crop of a wide image keeps its middle: left half red, right half blue.
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, :32, 0], wide[:, 32:, 2] = 255, 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    out = decode_image(tmp_path / "wide.png", SPEC)
    assert out[:, 0, 0].min() > 200 and out[:, -1, 2].min() > 200


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_resize_and_crop_matches_torchvision_validation_transform(interpolation):
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    spec = DecodeSpec(input_size=24, resize_size=28, interpolation=interpolation)
    for seed, (h, w) in enumerate([(40, 57), (57, 40), (31, 90), (20, 20), (100, 61)]):
        image = Image.fromarray(_noise(h, w, seed))
        ours = np.asarray(resize_and_crop(image, spec)).astype(int)
        resized = F.resize(image, [28], interpolation=InterpolationMode(interpolation),
                           antialias=True)
        reference = np.asarray(F.center_crop(resized, [24, 24])).astype(int)
        assert ours.shape == reference.shape == (24, 24, 3)
        # One resample of the crop box instead of two steps: equal up to fixed-point rounding
        # (bicubic's overshoot is clipped between passes, so a few pixels of noise move more).
        diff = np.abs(ours - reference)
        if interpolation == "nearest":
            assert diff.max() == 0
        else:
            assert diff.mean() < 0.3 and (diff > 1).mean() < 0.01 and diff.max() <= 8


def test_unknown_interpolation_is_a_manifest_error():
    with pytest.raises(ManifestError, match="interpolation"):
        DecodeSpec(input_size=32, resize_size=36, interpolation="spline")


def test_decode_applies_exif_orientation(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:10, :, 0] = 255  # top half red
    stored[10:, :, 2] = 255  # bottom half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display: the stored top becomes the right side
    Image.fromarray(stored).save(tmp_path / "rotated.png", exif=exif)
    out = decode_image(tmp_path / "rotated.png", SPEC)
    assert out[:, -1, 0].min() > 200 and out[:, 0, 2].min() > 200


def test_every_bad_file_kind_gets_an_error_row_and_the_run_goes_on(
        tmp_path, registry, small_bomb_limit):
    made = _good_images(tmp_path / "in")
    bad = _bad_images(tmp_path / "in")
    summary = score_image_folder(tmp_path / "in", registry / "tiny", tmp_path / "out",
                                 run_date=DAY, batch_size=4, workers=0)
    assert (summary.files, summary.scored, summary.failed) == (len(made) + len(bad), len(made),
                                                               len(bad))
    table = read_partition(tmp_path / "out", "image_predictions", DAY).to_pylist()
    assert [r["path"] for r in table] == sorted([*made, *bad])
    for row in table:
        if row["path"] in bad:
            assert row["error"].startswith(bad[row["path"]] + ":") and "\n" not in row["error"]
            assert row["pred_label"] is None and row["topk_labels"] is None
        else:
            assert row["error"] is None and row["pred_label"] in row["topk_labels"]


def test_schema_is_pinned(tmp_path, registry):
    _good_images(tmp_path / "in")
    summary = score_image_folder(tmp_path / "in", registry / "tiny", tmp_path / "out",
                                 run_date=DAY, workers=0)
    parts = sorted(Path(summary.partition).glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-00000-0000.parquet"]
    schema = pq.read_schema(parts[0])
    ts = pa.timestamp("us", tz="UTC")
    strings, floats = pa.list_(pa.string()), pa.list_(pa.float32())
    expected = [("path", pa.string()), ("file_size", pa.int64()), ("mtime", ts),
                ("pred_label", pa.string()), ("pred_score", pa.float32()),
                ("topk_labels", strings), ("topk_scores", floats), ("labels", strings),
                ("probabilities", floats), ("outputs", floats), ("error", pa.string()),
                ("model_name", pa.string()), ("model_version", pa.string()),
                ("bundle_sha256", pa.string()), ("scored_at", ts)]
    assert [(f.name, f.type) for f in schema] == expected
    assert schema.metadata[b"lensflow.model_name"] == b"tiny"
    assert schema.metadata[b"lensflow.run_id"] == summary.run_id.encode()
    assert schema.metadata[b"lensflow.runtime"] == summary.runtime.encode() == b"onnx/cpu"
    assert IMAGE_PREDICTIONS_SCHEMA.names == [name for name, _ in expected]


def test_single_label_rows_are_ranked_probabilities(tmp_path, registry):
    _good_images(tmp_path / "in")
    score_image_folder(tmp_path / "in", registry / "tiny", tmp_path / "out", run_date=DAY,
                       top_k=3, workers=0)
    for row in read_partition(tmp_path / "out", "image_predictions", DAY).to_pylist():
        assert len(row["topk_labels"]) == 3 and row["topk_labels"][0] == row["pred_label"]
        assert row["topk_scores"] == sorted(row["topk_scores"], reverse=True)
        assert row["topk_scores"][0] == pytest.approx(row["pred_score"])
        assert row["labels"] is None and row["probabilities"] is None and row["outputs"] is None
        assert row["file_size"] == (tmp_path / "in" / row["path"]).stat().st_size


def test_multi_label_and_regression_fill_their_own_columns(tmp_path, registry):
    _good_images(tmp_path / "in")
    score_image_folder(tmp_path / "in", registry / "tags", tmp_path / "out", run_date=DAY,
                       workers=0)
    for row in read_partition(tmp_path / "out", "image_predictions", DAY).to_pylist():
        probs = dict(zip(["ant", "bee", "cat", "dog", "eel", "fox"], row["probabilities"],
                         strict=True))
        assert row["labels"] == [c for c, p in probs.items() if p > 0.5]
        assert row["pred_label"] is None and row["outputs"] is None
    score_image_folder(tmp_path / "in", registry / "points", tmp_path / "out", run_date=DAY,
                       workers=0)
    rows = read_partition(tmp_path / "out", "image_predictions", DAY).to_pylist()
    assert all(len(r["outputs"]) == 2 and r["pred_label"] is None for r in rows)
    assert all(r["topk_labels"] is None and r["labels"] is None for r in rows)


def test_shards_in_this_process_write_the_rows_of_the_single_shard_run(tmp_path, registry):
    _good_images(tmp_path / "in")
    options = ImageScoreOptions(batch_size=4, workers=0)
    single = score_image_folder(tmp_path / "in", registry / "tiny", tmp_path / "one", options,
                                run_date=DAY)
    ran: list[int] = []

    def in_turn(score_shard, jobs, progress):
        ran.extend(job.shard for job in jobs)
        return [score_shard(job, progress) for job in jobs]

    sharded = score_image_folder(tmp_path / "in", registry / "tiny", tmp_path / "three", options,
                                 run_date=DAY, shards=3, run_shards=in_turn)
    assert len(ran) == 3 and (sharded.rows, sharded.scored) == (single.rows, single.scored)
    assert len(list(Path(sharded.partition).glob("part-*.parquet"))) == 3
    columns = [c for c in IMAGE_PREDICTIONS_SCHEMA.names if c != "scored_at"]
    one = read_partition(tmp_path / "one", "image_predictions", DAY).select(columns)
    three = read_partition(tmp_path / "three", "image_predictions", DAY).select(columns)
    assert three.sort_by("path").equals(one.sort_by("path"))


def test_onnx_and_torchscript_score_alike_and_workers_keep_order(tmp_path, registry):
    _good_images(tmp_path / "in")
    score_image_folder(tmp_path / "in", registry / "tiny", tmp_path / "a", run_date=DAY,
                       runtime="onnx", workers=0, batch_size=5)
    score_image_folder(tmp_path / "in", registry / "tiny", tmp_path / "b", run_date=DAY,
                       runtime="torchscript", workers=1, batch_size=3)
    cols = ["path", "pred_label", "topk_labels"]
    a = read_partition(tmp_path / "a", "image_predictions", DAY)
    b = read_partition(tmp_path / "b", "image_predictions", DAY)
    assert a.select(cols).equals(b.select(cols))
    np.testing.assert_allclose(a["pred_score"].to_numpy(), b["pred_score"].to_numpy(),
                               rtol=1e-4, atol=1e-6)


@pytest.fixture
def thread_exit_hook_that_fails_in_children():
    """What Prefect's log and event services leave in a flow process: a thread-exit hook that
    raises in any forked copy of the process (and is harmless in the process itself)."""
    parent = os.getpid()

    def hook():
        if os.getpid() != parent:
            raise AssertionError("a service's state does not survive a fork")

    threading._register_atexit(hook)
    yield
    hooks = threading._threading_atexits  # registered as functools.partial(hook)
    hooks[:] = [h for h in hooks if getattr(h, "func", h) is not hook]


def test_decoding_workers_start_clean_in_a_process_with_service_threads(
        tmp_path, registry, thread_exit_hook_that_fails_in_children):
    # Forked workers ran the hook as they exited, died with code 1, and the DataLoader aborted
    # the nightly run (first seen in CI, after flow tests had started Prefect's services).
    _good_images(tmp_path / "in")
    summary = score_image_folder(tmp_path / "in", registry / "tiny", tmp_path / "out",
                                 run_date=DAY, workers=2, batch_size=2)
    assert summary.scored == summary.files > 0


def test_incremental_skips_unchanged_successes_only(tmp_path, registry, small_bomb_limit):
    folder, out = tmp_path / "in", tmp_path / "out"
    made = _good_images(folder)
    _bad_images(folder)
    first = score_image_folder(folder, registry / "tiny", out, run_date=DAY, workers=0)
    # Same date again: its own partition is being replaced, so nothing counts as scored.
    again = score_image_folder(folder, registry / "tiny", out, run_date=DAY, workers=0,
                               incremental=True)
    assert again.skipped_incremental == 0 and again.rows == first.rows
    Image.fromarray(_noise(40, 40, 30)).save(folder / "new.png")
    stat = made["rgb.jpg"].stat()
    os.utime(made["rgb.jpg"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    progress: list[dict] = []
    nxt = score_image_folder(folder, registry / "tiny", out, run_date=NEXT_DAY, workers=0,
                             incremental=True, progress=progress.append)
    assert nxt.skipped_incremental == len(made) - 1
    rows = read_partition(out, "image_predictions", NEXT_DAY).to_pylist()
    # The new file, the touched file and the five failures (retried) are scored again.
    assert sorted(r["path"] for r in rows if r["error"] is None) == ["new.png", "rgb.jpg"]
    assert len(rows) == 7 and nxt.rows == 7
    assert progress[0] == {"event": "start", "total": 7} and progress[-1] == {"event": "end"}
    assert sum(e.get("n", 0) for e in progress) == 7
    # Both dates are readable as one Hive dataset.
    assert ds.dataset(out / "image_predictions", partitioning="hive").count_rows() == 17 + 7


def test_incremental_lookup_stops_at_the_partition_that_resolves_every_old_file(
        tmp_path, registry, monkeypatch):
    folder, out = tmp_path / "in", tmp_path / "out"
    made = _good_images(folder)
    for day in (date(2026, 11, 20), DAY):  # two full runs
        score_image_folder(folder, registry / "tiny", out, run_date=day, workers=0)
    Image.fromarray(_noise(40, 40, 30)).save(folder / "new.png")
    later = time.time_ns() + 86_400 * 10**9  # modified after every past run
    os.utime(folder / "new.png", ns=(later, later))
    files = walk_images(folder)
    bundle = open_image_bundle(registry / "tiny")
    reads: list[list[str]] = []
    dataset = image_rows.ds.dataset
    monkeypatch.setattr(image_rows.ds, "dataset",
                        lambda parts, **kw: reads.append(parts) or dataset(parts, **kw))
    done = already_scored(out, "image_predictions", bundle, exclude_date=NEXT_DAY, files=files)
    assert sorted(path for path, _, _ in done) == sorted(made)
    # The newer full run resolved every old file and new.png is newer than any row: the older
    # run is never read.
    assert len(reads) == 1 and all("run_date=2026-11-22" in p for p in reads[0])
    everything = already_scored(out, "image_predictions", bundle, exclude_date=NEXT_DAY)
    assert everything == done and len(reads) == 3  # every partition, one by one


def test_another_model_version_is_not_skipped(tmp_path, registry):
    _good_images(tmp_path / "in")
    score_image_folder(tmp_path / "in", registry / "tiny", tmp_path / "out", run_date=DAY,
                       workers=0)
    newer = make_image_bundle(registry, seed=1, promoted=False)
    summary = score_image_folder(tmp_path / "in", newer, tmp_path / "out", run_date=NEXT_DAY,
                                 workers=0, incremental=True)
    assert summary.skipped_incremental == 0 and summary.scored == summary.files


def test_user_mistakes_are_one_line_errors(tmp_path, registry):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    _good_images(tmp_path / "in")
    cases = [
        (tmp_path / "missing", registry / "tiny", ImageFolderError, "no such folder"),
        (tmp_path / "empty" / "notes.txt", registry / "tiny", ImageFolderError, "not a folder"),
        (tmp_path / "empty", registry / "tiny", ImageFolderError, "no image files"),
        (tmp_path / "in", registry / "nope", BundleRefError, "nope"),
        (tmp_path / "in", tmp_path / "in", BundleRefError, "neither a bundle"),
        (tmp_path / "in", _collab_bundle(tmp_path / "reg"), BundleRefError, "not an image task"),
    ]
    for folder, ref, kind, words in cases:
        with pytest.raises(kind, match=words) as caught:
            score_image_folder(folder, ref, tmp_path / "out", workers=0)
        assert "\n" not in str(caught.value)
    for bad, words in (({"batch_size": 0}, "batch_size: Input should be greater than 0"),
                       ({"top_k": 0}, "top_k"), ({"runtime": "tensorrt"}, "runtime"),
                       ({"batchsize": 8}, "batchsize: Extra inputs are not permitted")):
        with pytest.raises(ScoringError, match=words) as caught:
            score_image_folder(tmp_path / "in", registry / "tiny", tmp_path / "out", **bad)
        assert "\n" not in str(caught.value)
    assert not (tmp_path / "out" / "image_predictions").exists() or not any(
        (tmp_path / "out" / "image_predictions").glob("run_date=*"))


def _collab_bundle(registry: Path) -> Path:
    from export.bundle import BundleWriter

    with BundleWriter(registry, "recs") as writer:
        (writer.dir / "model.onnx").write_bytes(b"placeholder")
        return writer.commit({"task": "collab", "users": ["u"], "items": ["i"]})


def test_scoring_hashes_every_file_first_and_the_graph_again_as_it_loads(tmp_path):
    from scoring.image_scoring import finish_image_run, plan_image_run, score_image_shard
    from scoring.shards import run_plan

    bundle = Path(make_image_bundle(tmp_path / "reg", promoted=False))
    _good_images(tmp_path / "in")

    # A changed file no image row depends on is still refused before anything runs: every
    # load hashes every file the manifest lists (issue 27, one load path).
    parity = bundle / "parity.json"
    original = parity.read_bytes()
    parity.chmod(0o644)
    parity.write_bytes(original + b" ")
    with pytest.raises(ScoringError, match="parity.json sha256 mismatch") as caught:
        score_image_folder(tmp_path / "in", bundle, tmp_path / "out", run_date=DAY, workers=0)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out" / "image_predictions").exists()
    parity.write_bytes(original)

    # The graph swapped after the plan checked the bundle, for each runtime: the runtime hashes
    # the bytes it loads, refuses in one line naming the graph, and no partition is written.
    for runtime, graph in (("onnx", "model.onnx"), ("torchscript", "model.ts")):
        bundle_cache.clear()  # as in the next night's process: nothing loaded yet
        plan = plan_image_run(tmp_path / "in", bundle, tmp_path / runtime,
                              ImageScoreOptions(workers=0, runtime=runtime), run_date=DAY)
        original = (bundle / graph).read_bytes()
        (bundle / graph).chmod(0o644)
        (bundle / graph).write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(ScoringError, match=rf"{graph}: sha256 differs") as caught:
            run_plan(plan, score_image_shard, finish_image_run)
        assert "\n" not in str(caught.value)
        assert not (tmp_path / runtime / "image_predictions" / f"run_date={DAY}").exists()
        (bundle / graph).write_bytes(original)
