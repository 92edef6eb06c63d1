"""The checks :func:`export.bundle.load_bundle` runs before it hands out a bundle.

A bundle is what its pins vouch for, or it is refused in one line: ``manifest.json`` must hash to
the digest its record (``<version>.digest.json``) and ``current`` pin, and carry a valid signature
when one is required (:mod:`export.bundle_signature`); it must name the model and version where it
sits (``REG/NAME/VERSION``); every file it lists must hash to its entry, and no file it does not
list may have been added.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from export.bundle_remote import MANIFEST
from export.bundle_signature import check_bundle_signature, signature_path
from export.errors import BundleIntegrityError, BundleNotFoundError
from export.pins import (
    CURRENT,
    check_listed_path,
    file_sha256,
    read_pointer,
    read_record,
    record_path,
)

#: Threads that hash a bundle's files (a few large files: graphs, weights).
_HASH_THREADS = 4


def read_manifest(path: Path) -> tuple[dict, bytes]:
    """The bundle's manifest and its raw bytes (what its digest is of), with the keys loading
    needs checked."""
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


def verify_files(path: Path, files: dict) -> None:
    """Every file the manifest lists is a plain file inside the bundle (no ``..``, no absolute
    path, no symlink on the way) and hashes to its entry.

    The files are hashed on a few threads (hashlib releases the GIL): a scorer pays this on
    every run, and a bundle's graphs and weights are hundreds of MB.
    """
    root = Path(os.path.realpath(path))
    targets = []
    for rel in files:
        check_listed_path(path, rel)
        target = path / rel
        # Any symlink on the way makes the real path differ from the spelled one.
        if Path(os.path.realpath(target)) != root / rel:
            raise BundleIntegrityError(f"bundle {path}: {rel} is a symlink (or lies under one); "
                                       "a bundle holds plain files only")
        if not target.is_file():
            raise BundleIntegrityError(f"bundle {path}: {rel} is missing")
        targets.append((rel, target))
    workers = min(len(targets), os.cpu_count() or 1, _HASH_THREADS)
    if workers > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="bundle-hash") as pool:
            hashes = list(pool.map(lambda item: file_sha256(item[1]), targets))
    else:
        hashes = [file_sha256(target) for _, target in targets]
    for (rel, _), got in zip(targets, hashes, strict=True):
        entry = files[rel]
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        if got != expected:
            raise BundleIntegrityError(
                f"bundle {path}: {rel} sha256 mismatch (expected {expected}, got {got})")


def refuse_unlisted(path: Path, files: dict) -> None:
    """A file (or link) the manifest does not list was added after export: refuse it."""
    for dirpath, dirnames, filenames in os.walk(path):
        here = Path(dirpath)
        links = [d for d in dirnames if (here / d).is_symlink()]
        for name in sorted(filenames + links):
            rel = (here / name).relative_to(path).as_posix()
            if rel != MANIFEST and rel not in files:
                raise BundleIntegrityError(
                    f"bundle {path}: {rel} is not listed in manifest.json (added after export)")


def _pinned_by_current(path: Path) -> tuple[Path, str] | None:
    """``(pointer, digest)`` when the model's ``current`` names this bundle and pins a digest."""
    try:
        pin = read_pointer(path.parent / CURRENT)
    except BundleNotFoundError:
        return None  # resolving the model reports a broken pointer; this bundle may be fine
    if pin is None or pin[0] != path.name or pin[1] is None:
        return None
    return path.parent / CURRENT, pin[1]


def check_location(path: Path, manifest: dict, expect: tuple[str, str] | None = None) -> None:
    """The manifest names the model and version where the bundle sits (``REG/NAME/VERSION``, or
    ``expect``: the ``(name, version)`` of the URL a cached copy was fetched from)."""
    name, version = expect or (path.parent.name, path.name)
    if manifest["name"] != name:
        raise BundleIntegrityError(
            f"bundle {path}: manifest.json is model {manifest['name']!r}, but it sits under "
            f"{name!r} — another model's bundle copied here")
    if manifest["version"] != version:
        raise BundleIntegrityError(
            f"bundle {path}: manifest.json is version {manifest['version']!r}, but it sits at "
            f"{version!r}")


def _read_signature(path: Path) -> bytes | None:
    try:
        return signature_path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise BundleIntegrityError(f"bundle {path}: {signature_path(path).name} unreadable "
                                   f"({err.strerror})") from None


def check_digest(path: Path, manifest: dict, digest: str, *, signature: bool = True) -> str:
    """The manifest's digest against its record, ``current``'s pin and (with ``signature``) the
    signature; returns the signature's standing (``unchecked`` when it was not checked)."""
    record = read_record(path)
    if record["sha256"] != digest:
        raise BundleIntegrityError(
            f"bundle {path}: manifest.json changed after export (sha256 {digest[:12]}…, "
            f"{record_path(path).name} records {record['sha256'][:12]}…)")
    if (record.get("name"), record.get("version")) != (manifest["name"], manifest["version"]):
        raise BundleIntegrityError(f"bundle {path}: {record_path(path).name} is the record of "
                                   f"{record.get('name')}/{record.get('version')}")
    pinned = _pinned_by_current(path)
    if pinned is not None and pinned[1] != digest:
        raise BundleIntegrityError(
            f"bundle {path}: {pinned[0]} pins sha256 {pinned[1][:12]}… but the manifest hashes "
            f"to {digest[:12]}… — the bundle changed after promotion")
    if not signature:
        return "unchecked"
    return check_bundle_signature(path, _read_signature(path), manifest, digest, record)
