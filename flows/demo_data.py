"""Data for `lensflow demo` and the tests: the two tutorial data sets, or look-alikes made offline.

Online, the demo uses the data of the lessons it follows: the PyTorch transfer-learning
tutorial's ants/bees images and MovieLens 100K (Harper & Konstan, ACM TiiS 2015), downloaded
once, verified by sha256, and unpacked atomically into a cache. Offline, it draws a shapes image
set and plants a low-rank rating matrix (the generative model behind dot-product collaborative
filtering, Koren, Bell & Volinsky, "Matrix factorization techniques for recommender systems",
2009) in the same file layouts, so every later stage runs unchanged.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from training.errors import TrainingError

log = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "cross", "star")
_N_GENRES = 19  # the genre flags of MovieLens 100K's u.item
_ML100K_FIRST_TIMESTAMP = 874724710


class ArchiveIntegrityError(TrainingError):
    """A downloaded archive or a file in it does not have the expected sha256."""


@dataclass(frozen=True)
class ArchiveSource:
    """A zip archive to download into the cache under `name`.

    sha256: of the archive itself, or None where it could not be verified here; member_sha256
    then guards the download: files inside the archive (paths relative to its top folder).
    """

    name: str
    url: str
    sha256: str | None
    member_sha256: Mapping[str, str] = field(default_factory=dict)


# The archive hashes are left as None on purpose: this code was written offline and nobody here
# could hash the real zips. The member hashes were computed from byte-identical copies of the
# archives' files (shared/data, cross-checked against independent copies); a tampered or
# different download fails them and the demo falls back to generated data.
HYMENOPTERA_SHA256: str | None = None  # UNVERIFIED: fill in after hashing the official zip
ML_100K_SHA256: str | None = None  # UNVERIFIED: fill in after hashing the official zip

DEMO_SOURCES: dict[str, ArchiveSource] = {
    "images": ArchiveSource(
        "hymenoptera_data", "https://download.pytorch.org/tutorial/hymenoptera_data.zip",
        HYMENOPTERA_SHA256, {
            "train/ants/0013035.jpg":
                "3238568557b6136ee97388a7ee2737d62fe4f2b1ee554993bff79216341a0951",
            "train/ants/imageNotFound.gif":
                "6b4966252973c581b521f804453c6a0649ea6a2ce7e3e5c7deeb7d80623de231",
            "val/bees/1032546534_06907fe3b3.jpg":
                "e30d30fba3fc0ef504b76cff4184ae017fbde302e59ee1d1012216904fa5dcc1",
        }),
    "ratings": ArchiveSource(
        "ml-100k", "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        ML_100K_SHA256, {
            "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
            "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
        }),
}


# --- generated images -----------------------------------------------------------------------

def _star(cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    angles = turn + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    return list(zip(cx + radii * np.sin(angles), cy - radii * np.cos(angles), strict=True))


def _draw_shape(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One `kind` shape in a random colour, place and size on a noisy background."""
    background = rng.uniform(0, 255, 3)
    while True:  # a colour far enough from the background that the shape is always visible
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - background) > 120:
            break
    noise = rng.normal(0, 12, (size, size, 3))
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    r = rng.uniform(0.2, 0.4) * size
    cx, cy = rng.uniform(r, size - r, 2)
    fill = tuple(int(c) for c in colour)
    draw = ImageDraw.Draw(image)
    tilt = rng.uniform(-15, 15)
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind in ("square", "triangle"):
        draw.regular_polygon((cx, cy, r), 4 if kind == "square" else 3, rotation=tilt, fill=fill)
    elif kind == "cross":
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        draw.polygon(_star(cx, cy, r, np.radians(tilt)), fill=fill)
    return image


def make_shapes_dataset(
    root: Path | str,
    *,
    classes: tuple[str, ...] = ("circle", "square", "triangle"),
    n_train: int = 24,
    n_valid: int = 8,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write `root/train/<class>/` and `root/valid/<class>/` with drawn shapes; return `root`.

    n_train, n_valid: images per class. Even-numbered images are JPEG, odd ones PNG.
    """
    unknown = [c for c in classes if c not in SHAPES]
    if unknown:
        raise TrainingError(f"classes: unknown shape {unknown[0]!r} (known: {', '.join(SHAPES)})")
    root = Path(root)
    for split_no, (split, n) in enumerate((("train", n_train), ("valid", n_valid))):
        for class_no, kind in enumerate(classes):
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                # Seeded per image, so adding a class or images leaves the others unchanged.
                rng = np.random.default_rng([seed, split_no, class_no, i])
                image = _draw_shape(kind, size, rng)
                if i % 2:
                    image.save(folder / f"{kind}_{i:04d}.png")
                else:
                    image.save(folder / f"{kind}_{i:04d}.jpg", quality=92)
    return root


# --- generated ratings ----------------------------------------------------------------------

def make_planted_ratings(
    dir: Path | str,
    *,
    n_users: int = 200,
    n_items: int = 300,
    n_factors: int = 8,
    density: float = 0.1,
    seed: int = 0,
) -> Path:
    """Ratings from planted factors and biases, in MovieLens 100K's `u.data`/`u.item` format.

    rating = round(3.5 + b_user + b_item + u·v + noise), clipped to 1..5. The planted truth is
    saved in `planted_factors.npz` so a test can check that a model recovers it.
    """
    if not 0 < density <= 1:
        raise TrainingError(f"density must be in (0, 1], got {density}")
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # Factor scale chosen so u·v has a standard deviation near 0.8 stars for any n_factors.
    scale = (0.8 / np.sqrt(n_factors)) ** 0.5
    users = rng.normal(0, scale, (n_users, n_factors))
    items = rng.normal(0, scale, (n_items, n_factors))
    user_bias, item_bias = rng.normal(0, 0.35, n_users), rng.normal(0, 0.45, n_items)
    rated = rng.random((n_users, n_items)) < density
    rated[np.arange(n_users), rng.integers(0, n_items, n_users)] = True  # nobody without ratings
    rated[rng.integers(0, n_users, n_items), np.arange(n_items)] = True  # no unrated item
    u, i = np.nonzero(rated)
    order = rng.permutation(len(u))  # u.data is not sorted either
    u, i = u[order], i[order]
    mean = 3.5 + user_bias[u] + item_bias[i] + np.einsum("nk,nk->n", users[u], items[i])
    ratings = np.clip(np.rint(mean + rng.normal(0, 0.3, len(u))), 1, 5).astype(int)
    stamps = _ML100K_FIRST_TIMESTAMP + rng.integers(0, 18_000_000, len(u))
    with open(out / "u.data", "w", encoding="ascii") as f:
        f.writelines(f"{a + 1}\t{b + 1}\t{r}\t{t}\n"
                     for a, b, r, t in zip(u, i, ratings, stamps, strict=True))
    genres = rng.random((n_items, _N_GENRES)) < 0.12
    with open(out / "u.item", "w", encoding="latin-1") as f:
        for k in range(n_items):
            # Some titles carry a latin-1 letter, as the real u.item does ("Café"), so a loader
            # that reads it as UTF-8 fails here rather than only on the real file.
            title = f"{'Café' if k % 7 == 0 else 'Film'} {k + 1} (1998)"
            flags = "|".join(str(int(g)) for g in genres[k])
            f.write(f"{k + 1}|{title}|01-Jan-1998||http://example.invalid/{k + 1}|{flags}\n")
    (out / "u.info").write_text(f"{n_users} users\n{n_items} items\n{len(u)} ratings\n")
    np.savez(out / "planted_factors.npz", user_factors=users, item_factors=items,
             user_bias=user_bias, item_bias=item_bias, global_mean=np.float64(3.5))
    return out


# --- download, verify, cache ----------------------------------------------------------------

def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, dest: Path, timeout: float) -> str:
    """Stream `url` into `dest`; return its sha256."""
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "lensflow"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as f:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                f.write(chunk)
    except (OSError, ValueError, http.client.HTTPException) as err:  # URLError is an OSError
        raise TrainingError(f"{url}: download failed ({getattr(err, 'reason', err)})") from None
    return digest.hexdigest()


def _extract(archive: Path, staging: Path, url: str) -> Path:
    """Unzip into `staging`; return the content folder (the single top folder, if there is one).

    zipfile drops absolute paths and `..` from member names, so nothing lands outside staging.
    """
    try:
        with zipfile.ZipFile(archive) as z:
            members = [m for m in z.namelist() if not m.startswith("__MACOSX/")]
            z.extractall(staging, members)
    except zipfile.BadZipFile:
        raise TrainingError(f"{url}: not a zip archive") from None
    tops = {m.split("/", 1)[0] for m in members}
    if len(tops) == 1 and (staging / next(iter(tops))).is_dir():
        return staging / next(iter(tops))
    return staging


def fetch_archive(
    url: str,
    sha256: str | None,
    cache_dir: Path | str,
    *,
    name: str,
    member_sha256: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> Path:
    """`cache_dir/name`: the zip at `url`, verified and unpacked once, then reused offline.

    The archive streams to a temporary file, is checked against `sha256` (and the files inside
    against `member_sha256`), unpacks into a temporary folder beside the target and is renamed
    into place, so a half-downloaded or half-extracted cache is never visible.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / name
    if target.is_dir():
        return target
    if sha256 is None and not member_sha256:
        raise ValueError(f"{url}: refusing a download with no sha256 to check it against")
    cache_dir.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{name}-", suffix=".download")
    os.close(handle)
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{name}-", suffix=".extracting"))
    try:
        actual = _download(url, Path(tmp), timeout)
        if sha256 is not None and actual != sha256.lower():
            raise ArchiveIntegrityError(
                f"{url}: sha256 mismatch, expected {sha256.lower()}, got {actual}")
        content = _extract(Path(tmp), staging, url)
        for member, expected in (member_sha256 or {}).items():
            path = content / member
            got = _sha256_of(path) if path.is_file() else "missing"
            if got != expected.lower():
                raise ArchiveIntegrityError(
                    f"{url}: {member} sha256 mismatch, expected {expected.lower()}, got {got}")
        try:
            os.rename(content, target)
        except OSError:
            if not target.is_dir():  # else a concurrent fetch finished first: use its copy
                raise
    finally:
        Path(tmp).unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    return target


# --- choosing the demo data -----------------------------------------------------------------

@dataclass(frozen=True)
class DemoData:
    """Where the demo's images and ratings live, and where they came from."""

    images: Path
    ratings: Path
    source: str  # "LENSFLOW_DATA" | "cache" | "download" | "generated", or one per data set

    def to_dict(self) -> dict:
        return {"images": str(self.images), "ratings": str(self.ratings), "source": self.source}


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/lensflow`, else `~/.cache/lensflow`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lensflow"


def _generated(cache_dir: Path, name: str, make) -> Path:
    """`cache_dir/generated/name`, made once by `make(folder)` and renamed into place."""
    target = cache_dir / "generated" / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        make(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def resolve_demo_data(
    cache_dir: Path | str | None = None,
    *,
    offline: bool | None = None,
    sources: Mapping[str, ArchiveSource] | None = None,
    timeout: float = 10.0,
) -> DemoData:
    """The demo's data: `$LENSFLOW_DATA`, else the cached or downloaded tutorial archives,
    else generated look-alikes under the cache dir.

    offline: never touch the network; None reads `$LENSFLOW_OFFLINE`.
    sources: archives for "images" and "ratings" (default `DEMO_SOURCES`).
    """
    shared = os.environ.get("LENSFLOW_DATA")
    if shared:
        images, ratings = Path(shared) / "hymenoptera_data", Path(shared) / "ml-100k"
        for folder in (images, ratings):
            if not folder.is_dir():
                raise TrainingError(f"LENSFLOW_DATA={shared}: no folder {folder}")
        return DemoData(images, ratings, "LENSFLOW_DATA")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    offline = _env_flag("LENSFLOW_OFFLINE") if offline is None else offline
    sources = DEMO_SOURCES if sources is None else sources
    generators = {
        "images": ("shapes-v1", lambda d: make_shapes_dataset(d)),
        "ratings": ("planted-ratings-v1", lambda d: make_planted_ratings(d)),
    }
    found: dict[str, tuple[Path, str]] = {}
    for kind, (generated_name, make) in generators.items():
        source = sources[kind]
        if (cache / source.name).is_dir():
            found[kind] = (cache / source.name, "cache")
            continue
        if not offline:
            try:
                path = fetch_archive(source.url, source.sha256, cache, name=source.name,
                                     member_sha256=source.member_sha256, timeout=timeout)
                found[kind] = (path, "download")
                continue
            except TrainingError as err:
                log.warning("demo data: %s; using generated data instead", err)
                # A hash mismatch is about that one archive; a failed connection is about
                # the network, and the next download would only wait for the same timeout.
                offline = not isinstance(err, ArchiveIntegrityError)
        found[kind] = (_generated(cache, generated_name, make), "generated")
    (images, image_source), (ratings, rating_source) = found["images"], found["ratings"]
    if image_source == rating_source:
        return DemoData(images, ratings, image_source)
    return DemoData(images, ratings, f"images: {image_source}, ratings: {rating_source}")
