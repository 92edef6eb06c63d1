"""Where a bundle's digest is pinned, outside the bundle directory: its record and ``current``.

A bundle's digest is the sha256 of its ``manifest.json`` bytes; the manifest lists the sha256 of
every other file, so the digest pins every byte. Editing the manifest cannot edit these:

- ``<registry>/<name>/<version>.digest.json``, written at export before the bundle is renamed
  into place: ``{"format": 1, "name", "version", "sha256": digest}`` (records signed before the
  model-signing format also hold an Ed25519 ``signature``).
- ``<registry>/<name>/current``, written by promotion: ``<version> sha256:<digest>``, and with a
  signing key a second line, the signed promotion (:mod:`export.promotion`).

Both are written whole (temp file, fsync, ``os.replace``), so a reader sees the old or the new.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from export.errors import BundleIntegrityError, BundleNotFoundError

CURRENT = "current"
RECORD_SUFFIX = ".digest.json"
PIN_PREFIX = "sha256:"
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_listed_path(where: object, rel: object) -> str:
    """A manifest ``files`` entry as a path inside the bundle: relative, in canonical form, no
    ``..`` and not ``manifest.json`` itself; anything else is refused in one line.

    where: the bundle, named in the error.
    """
    parts = PurePosixPath(rel).parts if isinstance(rel, str) and rel else ()
    if (not parts or PurePosixPath(rel).is_absolute() or ".." in parts
            or PurePosixPath(*parts).as_posix() != rel or rel == "manifest.json"):
        raise BundleIntegrityError(f"bundle {where}: manifest lists an invalid path {rel!r} "
                                   "(absolute, with '..', not canonical, or the manifest)")
    return rel


def fsync_path(path: str | Path) -> None:
    """Flush a file or a directory (its entries: renames, new files) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(target: Path, text: str, mode: int = 0o644) -> None:
    """Replace ``target`` with ``text`` whole: temp file beside it, fsync, ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp's 0600 would hide the file from other readers
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(target.parent)


def record_path(bundle_dir: str | Path) -> Path:
    """``<version>.digest.json`` beside a bundle directory."""
    bundle_dir = Path(os.path.abspath(bundle_dir))
    return bundle_dir.with_name(bundle_dir.name + RECORD_SUFFIX)


def digest_record(name: str, version: str, digest: str) -> dict:
    """What ``<version>.digest.json`` holds: the bundle's name, version and digest."""
    return {"format": 1, "name": name, "version": version, "sha256": digest}


def write_record(bundle_dir: Path, record: dict) -> Path:
    """Write a bundle's digest record (read-only) beside it; returns its path."""
    path = record_path(bundle_dir)
    write_atomically(path, json.dumps(record, indent=2) + "\n", mode=0o444)
    return path


def read_record(bundle_dir: Path) -> dict:
    """A bundle's digest record; a missing or unreadable one is a one-line error."""
    where = record_path(bundle_dir)
    try:
        record = json.loads(where.read_bytes())
    except FileNotFoundError:
        raise BundleIntegrityError(
            f"bundle {bundle_dir}: no digest record {where.name} beside it (exported before "
            "bundles were pinned, or copied without it) — re-export it with lensflow export") \
            from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleIntegrityError(f"bundle {bundle_dir}: digest record {where.name} is "
                                   f"unreadable ({err})") from None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise BundleIntegrityError(f"bundle {bundle_dir}: digest record {where.name} has no "
                                   "sha256")
    return record


def pointer_text(version: str, digest: str) -> str:
    """The content of ``current`` naming ``version`` and pinning its digest."""
    return f"{version} {PIN_PREFIX}{digest}\n"


class Pin(NamedTuple):
    """What ``current`` says: the version, its pinned digest (None in a pre-pinning pointer) and
    the signed promotion's DSSE envelope as JSON text (None when unsigned)."""

    version: str
    digest: str | None
    promotion: str | None = None


def read_pointer(pointer: Path) -> Pin | None:
    """What a ``current`` file says; None when there is no pointer."""
    try:
        text = pointer.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise BundleNotFoundError(f"{pointer}: unreadable ({err})") from None
    return parse_pointer(text, pointer)


def parse_pointer(text: str, pointer: object) -> Pin:
    """What the text of a ``current`` pointer named ``pointer`` says."""
    first, _, rest = text.partition("\n")
    promotion = None
    if rest.strip():
        if not rest.startswith("promotion ") or rest.strip().count("\n"):
            raise BundleNotFoundError(f"{pointer}: second line is not a signed promotion")
        promotion = rest.removeprefix("promotion ").strip()
    fields = first.split()
    version = fields[0] if fields else ""
    if not version or "/" in version or version.startswith(".") or len(fields) > 2:
        raise BundleNotFoundError(f"{pointer}: does not hold a version id")
    if len(fields) == 1:
        return Pin(version, None, promotion)
    digest = fields[1].removeprefix(PIN_PREFIX)
    if not fields[1].startswith(PIN_PREFIX) or len(digest) != 64:
        raise BundleNotFoundError(f"{pointer}: second field is not sha256:<64 hex digits>")
    return Pin(version, digest, promotion)
