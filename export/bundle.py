"""The model bundle: an immutable directory that is the one contract between stages.

Layout and rules are DESIGN.md's: ``<registry>/<name>/<version>/`` holds ``manifest.json`` (with
the sha256 and size of every other file), weights, exports, the parity report and plots. A bundle
is staged in a hidden temporary directory and renamed into place whole (the write-then-rename
commit of Gray & Reuter's *Transaction Processing*, as used by Git's object store), so a reader
never sees half a bundle. ``<registry>/<name>/current`` names the promoted version and is
replaced atomically with ``os.replace``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import secrets
import shutil
import stat
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path
from types import TracebackType

from export.errors import BundleIntegrityError, BundleNotFoundError, ExportError, PromotionError

MANIFEST = "manifest.json"
CURRENT = "current"
PARITY = "parity.json"
_VERSION_FORMAT = "%Y%m%dT%H%M%S.%fZ"
_CHUNK = 1 << 20

_last_stamp: datetime | None = None
_stamp_lock = threading.Lock()


def new_version(now: datetime | None = None) -> str:
    """A version id that sorts lexically in time order, e.g. ``20261123T104512.123456Z-3f9a``.

    Within one process the timestamp strictly increases (a clash moves it on by 1 µs); the random
    suffix keeps ids from two processes apart even within the same microsecond.
    """
    global _last_stamp
    if now is None:
        with _stamp_lock:
            now = datetime.now(timezone.utc)
            if _last_stamp is not None and now <= _last_stamp:
                now = _last_stamp + timedelta(microseconds=1)
            _last_stamp = now
    elif now.tzinfo is None:
        raise ValueError("new_version: `now` must be timezone-aware (UTC)")
    return f"{now.astimezone(timezone.utc).strftime(_VERSION_FORMAT)}-{secrets.token_hex(2)}"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries that produced or will read the exports."""
    versions = {"python": platform.python_version()}
    for key, dists in {"torch": ["torch"], "onnx": ["onnx"],
                       "onnxruntime": ["onnxruntime", "onnxruntime-gpu"],
                       "safetensors": ["safetensors"]}.items():
        for dist in dists:
            try:
                versions[key] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            versions[key] = "absent"
    return versions


def _listed_files(root: Path) -> dict[str, dict]:
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != MANIFEST:
            files[rel] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    return files


def fsync_path(path: str | Path) -> None:
    """Flush a file or a directory (its entries: renames, new files) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_and_freeze(root: Path) -> None:
    """Flush every file to disk and make it read-only: a committed bundle never changes."""
    for path in root.rglob("*"):
        if path.is_file():
            fsync_path(path)
            path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    for path in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        fsync_path(path)


def _json_default(value: object) -> object:
    """Serialise what training code naturally puts in a manifest: numpy/torch scalars and arrays,
    paths and result dataclasses with ``to_dict``."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise ExportError(f"manifest: a value of type {type(value).__name__} is not JSON-serialisable")


class BundleWriter:
    """Stage a bundle in ``<registry>/<name>/.tmp-<version>-<rand>/`` and commit it by rename.

    Write files under ``.dir``; ``commit(manifest)`` hashes them, writes ``manifest.json`` and
    renames the directory to ``<registry>/<name>/<version>/``. Leaving the ``with`` block without
    committing (an exception, or no ``commit`` call) removes the staging directory.
    """

    def __init__(self, registry: str | Path, name: str, version: str | None = None) -> None:
        if not name or "/" in name or name.startswith(".") or name == CURRENT:
            raise ExportError(f"bundle name {name!r}: must be a plain directory name")
        self.registry = Path(registry)
        self.name = name
        self.version = version or new_version()
        self.model_dir = self.registry / name
        self.path = self.model_dir / self.version
        self.dir: Path | None = None
        self.committed: Path | None = None

    def __enter__(self) -> BundleWriter:
        self.model_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            raise ExportError(f"bundle {self.path}: version already exists")
        self.dir = Path(tempfile.mkdtemp(prefix=f".tmp-{self.version}-", dir=self.model_dir))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.committed is None and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def commit(self, manifest: dict) -> Path:
        """Write ``manifest.json`` over the staged files and rename the bundle into place."""
        if self.dir is None or self.committed is not None:
            raise ExportError(f"bundle {self.path}: commit outside an open BundleWriter")
        full = {
            **manifest,
            "name": self.name,
            "version": self.version,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "libraries": library_versions(),
            "files": _listed_files(self.dir),
        }
        (self.dir / MANIFEST).write_text(json.dumps(full, indent=2, default=_json_default) + "\n")
        _fsync_and_freeze(self.dir)
        # mkdtemp makes the staging dir owner-only; a committed bundle is for every reader.
        self.dir.chmod(0o755)
        try:
            os.rename(self.dir, self.path)
        except OSError as err:
            raise ExportError(f"bundle {self.path}: cannot commit ({err.strerror})") from err
        fsync_path(self.model_dir)
        self.committed = self.path
        return self.path


@dataclass(frozen=True)
class Bundle:
    """A bundle read from disk; ``sha256`` (of manifest.json's bytes) is its identity."""

    path: Path
    manifest: dict = field(repr=False)
    name: str
    version: str
    sha256: str
    task: str

    def file(self, relpath: str) -> Path:
        """Path of a file the manifest lists; a file it does not list is an error."""
        if relpath not in self.manifest.get("files", {}):
            raise BundleIntegrityError(f"bundle {self.path}: has no file {relpath!r}")
        return self.path / relpath

    def has_file(self, relpath: str) -> bool:
        return relpath in self.manifest.get("files", {})

    def to_dict(self) -> dict:
        return {"path": str(self.path), "name": self.name, "version": self.version,
                "sha256": self.sha256, "task": self.task}


def _read_manifest(path: Path) -> tuple[dict, bytes]:
    manifest_path = path / MANIFEST
    try:
        raw = manifest_path.read_bytes()
    except FileNotFoundError:
        raise BundleIntegrityError(f"bundle {path}: manifest.json is missing") from None
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleIntegrityError(f"bundle {path}: manifest.json is not valid JSON ({err})") \
            from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BundleIntegrityError(f"bundle {path}: manifest.json has no 'files' table")
    for key in ("name", "version", "task"):
        if not isinstance(manifest.get(key), str):
            raise BundleIntegrityError(f"bundle {path}: manifest.json has no '{key}'")
    return manifest, raw


def _verify_files(path: Path, files: dict) -> None:
    root = path.resolve()
    for rel, entry in files.items():
        target = (path / rel).resolve()
        if rel == MANIFEST or root not in target.parents:
            raise BundleIntegrityError(f"bundle {path}: manifest lists an invalid path {rel!r}")
        if not target.is_file():
            raise BundleIntegrityError(f"bundle {path}: {rel} is missing")
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        got = file_sha256(target)
        if got != expected:
            raise BundleIntegrityError(
                f"bundle {path}: {rel} sha256 mismatch (expected {expected}, got {got})")


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Read a bundle directory; with ``verify`` every listed file's sha256 is checked."""
    path = Path(path)
    if not path.is_dir():
        raise BundleNotFoundError(f"bundle {path}: no such directory")
    manifest, raw = _read_manifest(path)
    if verify:
        _verify_files(path, manifest["files"])
    return Bundle(path=path, manifest=manifest, name=manifest["name"],
                  version=manifest["version"], sha256=hashlib.sha256(raw).hexdigest(),
                  task=manifest["task"])


def list_versions(registry: str | Path, name: str) -> list[str]:
    """Committed versions of a model, oldest first (staging directories are not versions)."""
    model_dir = Path(registry) / name
    if not model_dir.is_dir():
        return []
    return sorted(p.name for p in model_dir.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file())


def current_version(registry: str | Path, name: str) -> str | None:
    """The promoted version of a model, or None when nothing was promoted yet."""
    pointer = Path(registry) / name / CURRENT
    try:
        version = pointer.read_text().strip()
    except FileNotFoundError:
        return None
    if not version or "/" in version or version.startswith("."):
        raise BundleNotFoundError(f"{pointer}: does not hold a version id")
    return version


def resolve_bundle(ref: str | Path) -> Path:
    """Turn a bundle directory, ``REG/NAME`` (its current version) or ``REG/NAME/VERSION`` into
    the bundle directory."""
    path = Path(ref)
    if (path / MANIFEST).is_file():
        return path
    if not path.is_dir():
        raise BundleNotFoundError(f"bundle {path}: no such directory")
    version = current_version(path.parent, path.name)
    if version is None:
        if list_versions(path.parent, path.name):
            raise BundleNotFoundError(
                f"no promoted version of {path.name!r} in {path.parent} — run lensflow promote")
        raise BundleNotFoundError(
            f"bundle {path}: neither a bundle (no manifest.json) nor a model with versions")
    target = path / version
    if not (target / MANIFEST).is_file():
        raise BundleNotFoundError(
            f"{path / CURRENT}: names version {version!r}, which is not a bundle in {path}")
    return target


def read_parity_passed(bundle: Bundle) -> bool:
    """Whether the bundle's ``parity.json`` exists and records a passed gate."""
    if not bundle.has_file(PARITY):
        return False
    try:
        report = json.loads(bundle.file(PARITY).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(report, dict) and report.get("passed") is True


def _write_atomically(target: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the pointer from other readers
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(target.parent)


def promote(bundle_path: str | Path) -> Path:
    """Make a verified bundle whose parity passed the current version; returns the pointer path."""
    bundle = load_bundle(bundle_path, verify=True)
    path = Path(bundle_path)
    if path.name != bundle.version:
        raise PromotionError(
            f"bundle {path}: directory name differs from manifest version {bundle.version!r}")
    if not bundle.has_file(PARITY):
        raise PromotionError(f"bundle {path}: no parity.json — run lensflow verify first")
    if not read_parity_passed(bundle):
        raise PromotionError(f"bundle {path}: parity.json records a failed parity gate")
    pointer = path.parent / CURRENT
    _write_atomically(pointer, bundle.version + "\n")
    return pointer
