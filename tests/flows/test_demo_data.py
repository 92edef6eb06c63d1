"""Demo data: drawn shapes, planted ratings, and the verified, atomic archive cache."""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image

from flows.demo_data import (
    ArchiveIntegrityError,
    ArchiveSource,
    fetch_archive,
    make_planted_ratings,
    make_shapes_dataset,
    resolve_demo_data,
)
from training.data.images import from_folder
from training.errors import TrainingError
from training.models import packaged_weights as packaged


def test_shapes_dataset_layout_and_formats(tmp_path):
    root = make_shapes_dataset(tmp_path / "shapes", n_train=4, n_valid=2, size=48)
    data = from_folder(root)
    assert data.classes == ("circle", "square", "triangle")
    assert data.class_counts("train") == {"circle": 4, "square": 4, "triangle": 4}
    assert data.class_counts("valid") == {"circle": 2, "square": 2, "triangle": 2}
    assert not data.skipped
    suffixes = {item.path.suffix for item in data.train}
    assert suffixes == {".jpg", ".png"}
    with Image.open(data.train[0].path) as im:
        assert im.size == (48, 48)


def test_shapes_are_seeded_and_differ_between_images(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", n_train=2, n_valid=0, seed=5)
    b = make_shapes_dataset(tmp_path / "b", n_train=2, n_valid=0, seed=5)
    c = make_shapes_dataset(tmp_path / "c", n_train=2, n_valid=0, seed=6)
    name = Path("train/square/square_0001.png")
    assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / name).read_bytes() != (c / name).read_bytes()
    first = np.asarray(Image.open(a / "train/square/square_0000.jpg"), dtype=np.int16)
    assert np.abs(first - np.asarray(Image.open(a / name), dtype=np.int16)).mean() > 10
    with pytest.raises(TrainingError, match="unknown shape 'hexagon'"):
        make_shapes_dataset(tmp_path / "d", classes=("circle", "hexagon"))


def test_shape_classes_differ_in_shape_not_in_colour(tmp_path):
    """The shape must carry the label: the fraction of the image it fills separates circles
    from triangles of the same size range, and colour statistics do not."""
    root = make_shapes_dataset(tmp_path / "s", n_train=40, n_valid=0, size=64)
    fill, hue = {}, {}
    for kind in ("circle", "triangle"):
        fills, reds = [], []
        for path in sorted((root / "train" / kind).glob("*.png")):
            pixels = np.asarray(Image.open(path), dtype=np.float64)
            background = np.median(np.concatenate([pixels[0], pixels[-1]]), axis=0)
            shape = np.linalg.norm(pixels - background, axis=2) > 60
            ys, xs = np.nonzero(shape)
            box = (np.ptp(ys) + 1) * (np.ptp(xs) + 1)
            fills.append(shape.sum() / box)  # circle ~ pi/4, upright triangle ~ 1/2
            reds.append(pixels[..., 0].mean())
        fill[kind], hue[kind] = np.mean(fills), np.mean(reds)
    assert fill["circle"] > fill["triangle"] + 0.15
    assert abs(hue["circle"] - hue["triangle"]) < 40


@pytest.mark.slow
def test_shapes_are_learnable_from_pretrained_features(tmp_path):
    """A linear head on packaged EfficientNet-Lite0 features separates the shapes."""
    from training.data.image_loaders import build_image_loaders

    state = packaged.packaged_lite0_state_dict()
    torch.set_num_threads(2)
    data = from_folder(make_shapes_dataset(tmp_path / "s"))
    loaders = build_image_loaders(data, packaged.packaged_preprocessing().with_size(96),
                                  workers=0)
    body = timm.create_model(packaged.PACKAGED_ARCH, pretrained=False)
    body.load_state_dict(state)
    body.reset_classifier(0)
    body.eval()
    with torch.no_grad():
        feats, labels = zip(*[(body(x), y) for x, y in loaders.train_plain], strict=True)
        vfeats, vlabels = zip(*[(body(x), y) for x, y in loaders.valid], strict=True)
    x, y, xv, yv = torch.cat(feats), torch.cat(labels), torch.cat(vfeats), torch.cat(vlabels)
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], 3)
    opt = torch.optim.Adam(head.parameters(), 1e-2)
    for _ in range(3):  # three epochs of batch 16
        for batch in torch.randperm(len(x)).split(16):
            loss = torch.nn.functional.cross_entropy(head(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    accuracy = (head(xv).argmax(1) == yv).float().mean().item()
    assert accuracy >= 0.9


def read_ratings(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "u.data", sep="\t", names=["user", "item", "rating", "ts"])


def test_planted_ratings_are_in_movielens_format(tmp_path):
    out = make_planted_ratings(tmp_path / "r", n_users=50, n_items=80, density=0.2, seed=1)
    ratings = read_ratings(out)
    assert ratings.dtypes.map(lambda d: d.kind).tolist() == ["i", "i", "i", "i"]
    assert set(ratings["rating"]) <= {1, 2, 3, 4, 5} and ratings["rating"].nunique() >= 4
    assert set(ratings["user"]) == set(range(1, 51)) and set(ratings["item"]) == set(range(1, 81))
    assert not ratings.duplicated(["user", "item"]).any()
    assert 0.15 < len(ratings) / (50 * 80) < 0.25
    raw = (out / "u.item").read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")  # latin-1, like the real file
    rows = [line.split("|") for line in raw.decode("latin-1").splitlines()]
    assert len(rows) == 80 and {len(r) for r in rows} == {24}
    assert [int(r[0]) for r in rows] == list(range(1, 81))
    assert read_ratings(make_planted_ratings(tmp_path / "again", n_users=50, n_items=80,
                                             density=0.2, seed=1)).equals(ratings)


def test_planted_factors_explain_the_ratings(tmp_path):
    out = make_planted_ratings(tmp_path / "r")
    ratings = read_ratings(out)
    truth = np.load(out / "planted_factors.npz")
    u, i = ratings["user"].to_numpy() - 1, ratings["item"].to_numpy() - 1
    planted = (truth["global_mean"] + truth["user_bias"][u] + truth["item_bias"][i]
               + np.einsum("nk,nk->n", truth["user_factors"][u], truth["item_factors"][i]))
    r = ratings["rating"].to_numpy()
    rmse_planted = np.sqrt(np.mean((np.clip(planted, 1, 5) - r) ** 2))
    rmse_mean = np.sqrt(np.mean((r.mean() - r) ** 2))
    assert rmse_planted < 0.5 * rmse_mean
    biases_only = truth["global_mean"] + truth["user_bias"][u] + truth["item_bias"][i]
    rmse_biases = np.sqrt(np.mean((np.clip(biases_only, 1, 5) - r) ** 2))
    assert rmse_planted < 0.8 * rmse_biases  # the factors matter, not just the biases


# --- downloads from a local HTTP server -----------------------------------------------------

@dataclass
class LocalServer:
    url: str
    files: dict[str, bytes]
    hits: list[str] = field(default_factory=list)
    stop: Callable[[], None] = lambda: None


@pytest.fixture
def server(monkeypatch) -> Iterator[LocalServer]:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    files: dict[str, bytes] = {}
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the name http.server dispatches to
            hits.append(self.path)
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    stopped = []

    def stop():
        if not stopped:
            httpd.shutdown()
            httpd.server_close()
            thread.join()
            stopped.append(True)

    yield LocalServer(f"http://127.0.0.1:{httpd.server_address[1]}", files, hits, stop)
    stop()


def make_zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buffer.getvalue()


ARCHIVE = make_zip({"tiny/train/a/one.txt": b"first", "tiny/train/b/two.txt": b"second",
                    "__MACOSX/tiny/._one.txt": b"resource fork"})
ARCHIVE_SHA = hashlib.sha256(ARCHIVE).hexdigest()


def cache_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_good_archive_is_unpacked_cached_and_reused_offline(server, tmp_path):
    server.files["/tiny.zip"] = ARCHIVE
    cache = tmp_path / "cache"
    target = fetch_archive(f"{server.url}/tiny.zip", ARCHIVE_SHA, cache, name="tiny")
    assert target == cache / "tiny"
    assert (target / "train/a/one.txt").read_bytes() == b"first"  # top folder unwrapped
    assert cache_entries(cache) == ["tiny"]  # no temp file, no staging folder, no __MACOSX
    server.stop()
    again = fetch_archive(f"{server.url}/tiny.zip", ARCHIVE_SHA, cache, name="tiny")
    assert again == target and server.hits == ["/tiny.zip"]


def test_corrupted_archive_is_refused_and_leaves_nothing(server, tmp_path):
    server.files["/tiny.zip"] = ARCHIVE[:-10] + b"0123456789"
    cache = tmp_path / "cache"
    url = f"{server.url}/tiny.zip"
    with pytest.raises(ArchiveIntegrityError) as caught:
        fetch_archive(url, ARCHIVE_SHA, cache, name="tiny")
    message = str(caught.value)
    actual = hashlib.sha256(server.files["/tiny.zip"]).hexdigest()
    assert url in message and ARCHIVE_SHA in message and actual in message
    assert cache_entries(cache) == []


def test_member_hashes_guard_an_archive_without_its_own_hash(server, tmp_path):
    server.files["/tiny.zip"] = ARCHIVE
    cache = tmp_path / "cache"
    good = {"train/a/one.txt": hashlib.sha256(b"first").hexdigest()}
    bad = {"train/b/two.txt": hashlib.sha256(b"tampered").hexdigest()}
    with pytest.raises(ArchiveIntegrityError, match=r"train/b/two\.txt sha256 mismatch"):
        fetch_archive(f"{server.url}/tiny.zip", None, cache, name="tiny", member_sha256=bad)
    assert cache_entries(cache) == []
    target = fetch_archive(f"{server.url}/tiny.zip", None, cache, name="tiny",
                           member_sha256=good)
    assert (target / "train/b/two.txt").exists()
    with pytest.raises(ValueError, match="no sha256"):
        fetch_archive(f"{server.url}/tiny.zip", None, cache, name="other")


def test_not_a_zip_and_unreachable_server_are_clear_errors(server, tmp_path):
    server.files["/page.zip"] = b"<html>not found</html>"
    sha = hashlib.sha256(server.files["/page.zip"]).hexdigest()
    with pytest.raises(TrainingError, match="page.zip: not a zip archive"):
        fetch_archive(f"{server.url}/page.zip", sha, tmp_path / "c", name="page")
    assert cache_entries(tmp_path / "c") == []
    server.stop()
    with pytest.raises(TrainingError, match="download failed"):
        fetch_archive(f"{server.url}/page.zip", sha, tmp_path / "c", name="page", timeout=2)


# --- choosing the demo data -----------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("LENSFLOW_DATA", raising=False)
    monkeypatch.delenv("LENSFLOW_OFFLINE", raising=False)
    return monkeypatch


def test_lensflow_data_wins(clean_env, tmp_path):
    (tmp_path / "hymenoptera_data").mkdir()
    (tmp_path / "ml-100k").mkdir()
    clean_env.setenv("LENSFLOW_DATA", str(tmp_path))
    demo = resolve_demo_data(tmp_path / "cache", offline=False)
    assert demo.source == "LENSFLOW_DATA"
    assert demo.images == tmp_path / "hymenoptera_data" and demo.ratings == tmp_path / "ml-100k"
    (tmp_path / "ml-100k").rmdir()
    with pytest.raises(TrainingError, match="LENSFLOW_DATA=.*ml-100k"):
        resolve_demo_data(tmp_path / "cache")


def test_offline_generates_once_and_reuses(clean_env, tmp_path):
    clean_env.setenv("LENSFLOW_OFFLINE", "1")
    demo = resolve_demo_data(tmp_path / "cache")
    assert demo.source == "generated"
    assert from_folder(demo.images).class_counts("valid") == {
        "circle": 8, "square": 8, "triangle": 8}
    assert len(read_ratings(demo.ratings)) > 1000
    stamp = (demo.ratings / "u.data").stat().st_mtime_ns
    assert resolve_demo_data(tmp_path / "cache") == demo
    assert (demo.ratings / "u.data").stat().st_mtime_ns == stamp
    assert not [p for p in (tmp_path / "cache" / "generated").iterdir() if p.name.startswith(".")]


def local_sources(server: LocalServer) -> dict[str, ArchiveSource]:
    return {
        "images": ArchiveSource("imgs", f"{server.url}/imgs.zip", ARCHIVE_SHA),
        "ratings": ArchiveSource("rates", f"{server.url}/rates.zip", ARCHIVE_SHA),
    }


def test_online_downloads_then_uses_the_cache(clean_env, server, tmp_path):
    server.files["/imgs.zip"] = server.files["/rates.zip"] = ARCHIVE
    demo = resolve_demo_data(tmp_path / "cache", offline=False, sources=local_sources(server))
    assert demo.source == "download"
    assert (demo.images / "train/a/one.txt").exists() and demo.ratings.name == "rates"
    server.stop()
    cached = resolve_demo_data(tmp_path / "cache", offline=True, sources=local_sources(server))
    assert cached.source == "cache" and cached.images == demo.images


def test_failed_download_falls_back_to_generated_data(clean_env, server, tmp_path, caplog):
    server.files["/rates.zip"] = ARCHIVE  # images are missing (404)
    with caplog.at_level(logging.WARNING, logger="flows.demo_data"):
        demo = resolve_demo_data(tmp_path / "cache", offline=False, sources=local_sources(server))
    assert demo.source == "generated"
    assert server.hits == ["/imgs.zip"]  # a failed download is not retried for the ratings
    assert "imgs.zip: download failed" in caplog.text


def test_bad_hash_falls_back_for_that_archive_only(clean_env, server, tmp_path):
    server.files["/imgs.zip"] = b"tampered"
    server.files["/rates.zip"] = ARCHIVE
    demo = resolve_demo_data(tmp_path / "cache", offline=False, sources=local_sources(server))
    assert demo.source == "images: generated, ratings: download"
    assert not (tmp_path / "cache" / "imgs").exists()
