"""The model bundle: an immutable directory that is the one contract between stages.

Layout and rules are DESIGN.md's: ``<registry>/<name>/<version>/`` holds ``manifest.json`` (with
the sha256 and size of every other file), weights, exports, the parity report and plots. A bundle
is staged in a hidden temporary directory and renamed into place whole (the write-then-rename
commit of Gray & Reuter's *Transaction Processing*, as used by Git's object store), so a reader
never sees half a bundle. ``<registry>/<name>/current`` names the promoted version and is
replaced atomically with ``os.replace``.

Every byte is pinned. A bundle's digest is the sha256 of its ``manifest.json`` bytes, which list
the sha256 of every other file; it is ``Bundle.sha256``, the identity scoring writes into every
output. The digest is stored outside the bundle directory, where editing the manifest does not
edit it: in ``<registry>/<name>/<version>.digest.json`` (written at export) and in ``current``
(``<version> sha256:<digest>``). Loading checks the manifest against both, that it names the model
and version where it sits, every listed file against the manifest, and that no file was added;
any difference is refused in one line (the checks: :mod:`export.bundle_integrity`).

With a signing key a bundle is signed in the OpenSSF model-signing format, ``<version>.sig``
beside it (:mod:`export.bundle_signature`), and ``current`` carries a signed promotion with a
counter (:mod:`export.promotion`); a verify key makes every load check both.

A registry may also be a URL (``s3://bucket/registry``): a bundle is staged and committed locally
as above, then uploaded with its manifest last, and read through a local cache keyed by its digest
(:mod:`export.bundle_remote`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from export.bundle_files import fsync_and_freeze, json_default, library_versions, listed_files
from export.bundle_files import new_version as new_version
from export.bundle_integrity import (
    check_digest,
    check_location,
    read_manifest,
    refuse_unlisted,
    verify_files,
)
from export.bundle_remote import (
    MANIFEST,
    fetch_bundle,
    publish_bundle,
    read_remote_pointer,
    remote_versions,
    resolve_remote,
)
from export.bundle_signature import SIGNATURE_SUFFIX, sign_files, signature_path
from export.bundle_staging import remove_dead_staging, staging_lock
from export.errors import BundleIntegrityError, BundleNotFoundError, ExportError, PromotionError
from export.pins import (
    CURRENT,
    Pin,
    digest_record,
    file_sha256,
    fsync_path,
    read_pointer,
    record_path,
    write_atomically,
    write_record,
)
from export.promotion import check_promotion, promotion_text
from export.signing import SigningKey, signing_key_from_env
from export.storage import basename, is_url, join, parent, ref_text, write_bytes

PARITY = "parity.json"


class BundleWriter:
    """Stage a bundle in ``<registry>/<name>/.tmp-<version>-<rand>/`` and commit it by rename.

    Write files under ``.dir``; ``commit(manifest)`` hashes them, writes ``manifest.json`` and
    renames the directory to ``<registry>/<name>/<version>/``. Leaving the ``with`` block without
    committing (an exception, or no ``commit`` call) removes the staging directory. A registry URL
    is staged in a local temporary registry and uploaded by ``commit``, which returns the URL.
    """

    def __init__(self, registry: str | Path, name: str, version: str | None = None) -> None:
        if not name or "/" in name or name.startswith(".") or name == CURRENT:
            raise ExportError(f"bundle name {name!r}: must be a plain directory name")
        self.remote = join(ref_text(registry), name) if is_url(registry) else None
        self.registry = Path(registry) if self.remote is None else None
        self.name = name
        self.version = version or new_version()
        self.dir: Path | None = None
        self.committed: Path | str | None = None
        if self.registry is not None:
            self._at(self.registry)

    def _at(self, registry: Path) -> None:
        self.registry = registry
        self.model_dir = registry / self.name
        self.path = registry / self.name / self.version

    def __enter__(self) -> BundleWriter:
        if self.remote is not None:
            self._at(Path(tempfile.mkdtemp(prefix="lensflow-export-")))
        for where in (self.registry, self.model_dir):
            if where.exists() and not where.is_dir():
                raise ExportError(f"registry {where}: exists and is not a directory")
        try:
            self.model_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ExportError(f"registry {self.model_dir}: cannot create ({err.strerror})") \
                from None
        if self.path.exists():
            raise ExportError(f"bundle {self.path}: version already exists")
        remove_dead_staging(self.model_dir)
        self.dir = Path(tempfile.mkdtemp(prefix=f".tmp-{self.version}-", dir=self.model_dir))
        # Held while this export lives; the kernel drops it when the process dies, however it
        # dies, which is how the next export tells a dead export's staging from a live one.
        self._lock = os.open(staging_lock(self.dir), os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.committed is None and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        if self.dir is not None:
            staging_lock(self.dir).unlink(missing_ok=True)
            os.close(self._lock)
        if self.remote is not None:
            shutil.rmtree(self.registry, ignore_errors=True)

    def commit(self, manifest: dict, *, signing_key: SigningKey | None = None) -> Path | str:
        """Write ``manifest.json`` over the staged files, record its digest, rename the bundle
        into place and, with ``signing_key``, sign it (model-signing, ``<version>.sig``); a
        registry URL then gets it uploaded, manifest last."""
        if self.dir is None or self.committed is not None:
            raise ExportError(f"bundle {self.path}: commit outside an open BundleWriter")
        if signing_key is not None and not parity_passed_in(self.dir):
            # A signature vouches for the gate's verdict too: a failed bundle stays unsigned.
            raise ExportError(f"bundle {self.path}: {PARITY} does not record a passed parity "
                              "gate; not signed")
        full = {
            **manifest,
            "name": self.name,
            "version": self.version,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "libraries": library_versions(),
            "files": listed_files(self.dir),
        }
        (self.dir / MANIFEST).write_text(json.dumps(full, indent=2, default=json_default) + "\n")
        fsync_and_freeze(self.dir)
        # mkdtemp makes the staging dir owner-only; a committed bundle is for every reader.
        self.dir.chmod(0o755)
        record = digest_record(self.name, self.version, file_sha256(self.dir / MANIFEST))
        # The record first: whoever sees the bundle directory also sees its digest.
        write_record(self.path, record)
        try:
            os.rename(self.dir, self.path)
        except OSError as err:
            record_path(self.path).unlink(missing_ok=True)
            raise ExportError(f"bundle {self.path}: cannot commit ({err.strerror})") from err
        fsync_path(self.model_dir)
        self.committed = self.path
        if signing_key is not None:
            sign_files(self.path, signing_key, signature_path(self.path))
        if self.remote is not None:
            url = join(self.remote, self.version)
            publish_bundle(self.path, url)
            self.committed = url
        return self.committed


def sign_bundle(bundle_path: str | Path, signing_key: SigningKey) -> Path | str:
    """Verify a bundle whose parity passed, then sign it in the model-signing format (replacing
    any signature); returns the signature's path (or URL).

    The bundle's current signature is not checked: this replaces it (an unsigned bundle must be
    signable where a verify key refuses unsigned bundles)."""
    bundle = load_bundle(bundle_path, signature=False)
    if not read_parity_passed(bundle):
        raise ExportError(f"bundle {bundle_path}: {PARITY} does not record a passed parity "
                          "gate; not signed")
    written = sign_files(bundle.path, signing_key, signature_path(bundle.path))
    if bundle.source is not None:
        url = bundle.source + SIGNATURE_SUFFIX
        write_bytes(url, written.read_bytes())
        return url
    return written


@dataclass(frozen=True)
class Bundle:
    """A bundle read from disk; ``sha256`` (of manifest.json's bytes, the digest its record and
    ``current`` pin) is its identity. ``signature``: ``verified``, ``unchecked`` (signed, no
    verify key set) or ``unsigned``. ``source``: the URL a bundle from object storage was
    fetched from (``path`` is then its verified copy in the local cache)."""

    path: Path
    manifest: dict = field(repr=False)
    name: str
    version: str
    sha256: str
    task: str
    signature: str = field(default="unsigned", compare=False)
    source: str | None = field(default=None, compare=False)

    @property
    def ref(self) -> str:
        """How another process or machine names this bundle: its URL, or its absolute path."""
        return self.source or str(self.path.absolute())

    def file(self, relpath: str) -> Path:
        """Path of a file the manifest lists; a file it does not list is an error."""
        if relpath not in self.manifest.get("files", {}):
            raise BundleIntegrityError(f"bundle {self.path}: has no file {relpath!r}")
        return self.path / relpath

    def has_file(self, relpath: str) -> bool:
        return relpath in self.manifest.get("files", {})

    def to_dict(self) -> dict:
        return {"path": self.source or str(self.path), "name": self.name, "version": self.version,
                "sha256": self.sha256, "task": self.task}


def load_bundle(path: str | Path, *, signature: bool = True) -> Bundle:
    """Read a bundle, refusing anything its pins do not vouch for: the manifest against its
    digest record, ``current``'s pin and the signature; every listed file inside the bundle (no
    absolute path, no ``..``, no symlink) and hashing to its entry; no unlisted file.

    Every load goes through these checks (verify, promote, the parity gate, scoring). A URL is
    fetched into the local bundle cache, or found there, and checked there before it is used.
    signature: False only to re-sign a bundle (:func:`sign_bundle`), whose signature it replaces.
    """
    if is_url(path):
        url = ref_text(path)
        at = (basename(parent(url)), basename(url))
        local = fetch_bundle(url, lambda copy: _load_local(copy, signature, True, at))
        # fetch_bundle has just run every check on that copy, hit or download.
        return replace(_load_local(local, signature, False, at), source=url)
    return _load_local(Path(path), signature, hash_files=True)


def _load_local(path: Path, signature: bool, hash_files: bool,
                at: tuple[str, str] | None = None) -> Bundle:
    """at: the (name, version) the bundle must say (default: where it sits)."""
    if not path.is_dir():
        raise BundleNotFoundError(f"bundle {path}: no such directory")
    manifest, raw = read_manifest(path)
    check_location(path, manifest, at)
    digest = hashlib.sha256(raw).hexdigest()
    standing = check_digest(path, manifest, digest, signature=signature)
    if hash_files:
        verify_files(path, manifest["files"])
        refuse_unlisted(path, manifest["files"])
    return Bundle(path=path, manifest=manifest, name=manifest["name"],
                  version=manifest["version"], sha256=digest, task=manifest["task"],
                  signature=standing)


def list_versions(registry: str | Path, name: str) -> list[str]:
    """Committed versions of a model, oldest first (staging directories are not versions)."""
    if is_url(registry):
        return remote_versions(ref_text(registry), name)
    model_dir = Path(registry) / name
    if not model_dir.is_dir():
        return []
    return sorted(p.name for p in model_dir.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file())


def current_version(registry: str | Path, name: str) -> str | None:
    """The promoted version of a model, or None when nothing was promoted yet."""
    if is_url(registry):
        pin = read_remote_pointer(join(ref_text(registry), name))
        return pin[0] if pin else None
    pin = read_pointer(Path(registry) / name / CURRENT)
    return pin[0] if pin else None


def resolve_bundle(ref: str | Path) -> Path | str:
    """Turn a bundle directory, ``REG/NAME`` (its current version) or ``REG/NAME/VERSION`` into
    the bundle directory (a URL for a registry URL); ``REG/NAME`` must still hash to the digest
    ``current`` pins."""
    if is_url(ref):
        return resolve_remote(ref_text(ref))
    path = Path(ref)
    if (path / MANIFEST).is_file():
        return path
    if not path.is_dir():
        raise BundleNotFoundError(f"bundle {path}: no such directory")
    pointer = path / CURRENT
    pin = read_pointer(pointer)
    if pin is None:
        if list_versions(path.parent, path.name):
            raise BundleNotFoundError(
                f"no promoted version of {path.name!r} in {path.parent} — run lensflow promote")
        raise BundleNotFoundError(
            f"bundle {path}: neither a bundle (no manifest.json) nor a model with versions")
    version, pinned = pin.version, pin.digest
    target = path / version
    if not (target / MANIFEST).is_file():
        raise BundleNotFoundError(
            f"{pointer}: names version {version!r}, which is not a bundle in {path}")
    if pinned is None:
        raise BundleIntegrityError(f"{pointer}: names {version} but pins no digest (written "
                                   "before bundles were pinned) — run lensflow promote again")
    got = file_sha256(target / MANIFEST)
    if got != pinned:
        raise BundleIntegrityError(
            f"bundle {target}: {pointer} pins sha256 {pinned[:12]}… but the manifest hashes to "
            f"{got[:12]}… — the bundle changed after promotion")
    check_promotion(pointer, pin, path.name, str(path.resolve()))
    return target


def read_parity_passed(bundle: Bundle) -> bool:
    """Whether the bundle's ``parity.json`` exists and records a passed gate."""
    return bundle.has_file(PARITY) and parity_passed_in(bundle.path)


def parity_passed_in(directory: Path) -> bool:
    """Whether ``directory/parity.json`` (a bundle's, or one being staged) records a pass."""
    try:
        report = json.loads((directory / PARITY).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(report, dict) and report.get("passed") is True


def promote(bundle_path: str | Path, *, signing_key: SigningKey | None = None,
            rollback: bool = False) -> Path | str:
    """Make a verified bundle whose parity passed the current version, pinning its digest and,
    with a signing key (default ``$LENSFLOW_SIGNING_KEY``), signing the promotion; returns the
    pointer path (one object written whole in a registry URL).

    rollback: the bundle is older than the current version, and that is meant (see
    :mod:`export.promotion`).
    """
    bundle = load_bundle(bundle_path)
    path = bundle_path if is_url(bundle_path) else Path(bundle_path)
    if basename(path) != bundle.version:
        raise PromotionError(
            f"bundle {path}: directory name differs from manifest version {bundle.version!r}")
    if not bundle.has_file(PARITY):
        raise PromotionError(f"bundle {path}: no parity.json — run lensflow verify first")
    if not read_parity_passed(bundle):
        raise PromotionError(f"bundle {path}: parity.json records a failed parity gate")
    key = signing_key or signing_key_from_env()
    if is_url(path):
        pointer = join(parent(ref_text(path)), CURRENT)
        text = promotion_text(pointer, _previous_pin(pointer), bundle, key, rollback)
        write_bytes(pointer, text.encode())
        return pointer
    pointer = path.parent / CURRENT
    write_atomically(pointer, promotion_text(pointer, _previous_pin(pointer), bundle, key,
                                             rollback))
    return pointer


def _previous_pin(pointer: Path | str) -> Pin | None:
    """What ``current`` says now; None when there is none or it cannot be read (promotion
    replaces it)."""
    try:
        return read_remote_pointer(parent(pointer)) if is_url(pointer) else read_pointer(pointer)
    except BundleNotFoundError:
        return None
