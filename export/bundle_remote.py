"""A model registry on object storage: bundles uploaded whole, fetched into a verified cache.

An object store has no rename, so a bundle cannot appear at once. It appears when its
``manifest.json`` does: :func:`publish_bundle` uploads every other file first, then the digest
record and the signature, then the manifest, each one PUT. Readers (:func:`resolve_remote`, the
registry listing) take a version for a bundle only when its manifest is there, so they see a
whole bundle or none. ``current`` is one small object replaced by one PUT, which readers see old
or new.

Nothing is loaded from the store directly. :func:`fetch_bundle` copies a bundle into the local
cache ``$LENSFLOW_BUNDLE_CACHE`` (default ``~/.cache/lensflow/bundles``) under its digest, the
sha256 of the manifest bytes it read from the store, verifies every file against that manifest
before the copy is renamed into place, and from then on serves the copy: a worker downloads a
bundle once, and every process of a machine shares it. The cache is not trusted by its path:
each use re-reads the store's manifest, checks that the cached manifest hashes to that digest and
re-runs every check on the copy; a copy that fails is moved aside and fetched again.

An upload that dies before its manifest leaves objects no reader looks at; the next publish of
the same model deletes them once they are :data:`~export.storage.ORPHAN_GRACE_S` old
(:func:`clear_dead_uploads`), as scoring runs delete the parts of dead runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from export.bundle_signature import SIGNATURE_SUFFIX
from export.errors import BundleIntegrityError, BundleNotFoundError, ExportError
from export.pins import (
    CURRENT,
    RECORD_SUFFIX,
    Pin,
    check_listed_path,
    file_sha256,
    parse_pointer,
)
from export.promotion import check_promotion
from export.storage import (
    ORPHAN_GRACE_S,
    basename,
    filesystem,
    full_url,
    join,
    modified_time,
    parent,
    read_bytes,
    remove_tree,
)

MANIFEST = "manifest.json"
CACHE_ENV = "LENSFLOW_BUNDLE_CACHE"

_log = logging.getLogger(__name__)

#: Bundles this process downloaded, by URL (a test checks a worker downloads once).
downloads: Counter[str] = Counter()


def cache_dir() -> Path:
    """Where fetched bundles live: ``$LENSFLOW_BUNDLE_CACHE`` or ``~/.cache/lensflow/bundles``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lensflow" / "bundles")


def publish_bundle(local: Path, url: str) -> None:
    """Upload a committed local bundle to ``url``: files, digest record and signature,
    ``manifest.json`` last."""
    fs, root = filesystem(url)
    if fs.isfile(f"{root}/{MANIFEST}"):
        raise ExportError(f"bundle {url}: version already exists")
    files = sorted(p for p in local.rglob("*")
                   if p.is_file() and p.relative_to(local).as_posix() != MANIFEST)
    if files:  # one call: the driver uploads them concurrently
        fs.put([str(p) for p in files],
                [f"{root}/{p.relative_to(local).as_posix()}" for p in files])
    record = local.with_name(local.name + RECORD_SUFFIX)
    fs.pipe_file(root + RECORD_SUFFIX, record.read_bytes())
    signature = local.with_name(local.name + SIGNATURE_SUFFIX)
    if signature.is_file():
        fs.pipe_file(root + SIGNATURE_SUFFIX, signature.read_bytes())
    fs.pipe_file(f"{root}/{MANIFEST}", (local / MANIFEST).read_bytes())
    # Best effort: a role that may upload but not delete, or an unreadable `current`, leaves
    # the dead uploads where they are, and this export stands.
    try:
        clear_dead_uploads(parent(url), grace_s=ORPHAN_GRACE_S)
    except (OSError, ExportError) as err:
        _log.warning("%s: dead uploads not cleared (%s)", parent(url), err)


def clear_dead_uploads(model_url: str, *, grace_s: float = ORPHAN_GRACE_S) -> list[str]:
    """Delete the versions of a model whose upload died before its manifest (their files and
    digest record), once their newest object is ``grace_s`` old; returns the versions removed.

    A version with a manifest, and the one ``current`` names, are never touched; an upload
    younger than ``grace_s`` may still be running elsewhere.
    """
    fs, root = filesystem(model_url)
    newest: dict[str, float] = {}
    whole: set[str] = set()
    for path, info in fs.find(root, detail=True).items():
        rel = PurePosixPath(path).relative_to(root).parts
        if len(rel) == 1 and rel[0].endswith((RECORD_SUFFIX, SIGNATURE_SUFFIX)):
            version = rel[0].removesuffix(RECORD_SUFFIX).removesuffix(SIGNATURE_SUFFIX)
        elif len(rel) >= 2:
            version = rel[0]
            if rel[1:] == (MANIFEST,):
                whole.add(version)
        else:  # current, or anything else at the model's top
            continue
        newest[version] = max(newest.get(version, 0.0), modified_time(info))
    pin = read_remote_pointer(model_url)
    keep = whole | ({pin[0]} if pin else set())
    now, removed = time.time(), []
    for version in sorted(set(newest) - keep):
        if now - newest[version] < grace_s:
            continue
        remove_tree(f"{full_url(fs, root)}/{version}")
        remove_tree(f"{full_url(fs, root)}/{version}{RECORD_SUFFIX}")
        remove_tree(f"{full_url(fs, root)}/{version}{SIGNATURE_SUFFIX}")
        removed.append(version)
    return removed


def read_remote_pointer(model_url: str) -> Pin | None:
    """What ``<model>/current`` says; None when nothing was promoted."""
    pointer = join(model_url, CURRENT)
    try:
        text = read_bytes(pointer).decode()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise BundleNotFoundError(f"{pointer}: unreadable ({err})") from None
    return parse_pointer(text, pointer)


def remote_versions(registry: str, model: str) -> list[str]:
    """Versions of a model with a manifest (uploads in progress are not versions), oldest first."""
    fs, root = filesystem(join(registry, model))
    return sorted(PurePosixPath(p).parent.name for p in fs.glob(f"{root}/*/{MANIFEST}"))


def resolve_remote(url: str) -> str:
    """A bundle URL, or ``REG/NAME`` resolved through its ``current`` pin, as a bundle URL."""
    fs, root = filesystem(url)
    if fs.isfile(f"{root}/{MANIFEST}"):
        return url
    pin = read_remote_pointer(url)
    if pin is None:
        if remote_versions(parent(url), basename(url)):
            raise BundleNotFoundError(f"no promoted version of {basename(url)!r} in {parent(url)} "
                                      "— run lensflow promote")
        raise BundleNotFoundError(
            f"bundle {url}: neither a bundle (no manifest.json) nor a model with versions")
    version, pinned = pin.version, pin.digest
    target = join(url, version)
    pointer = join(url, CURRENT)
    try:
        got = hashlib.sha256(read_bytes(join(target, MANIFEST))).hexdigest()
    except FileNotFoundError:
        raise BundleNotFoundError(f"{pointer}: names version {version!r}, which is not a bundle "
                                  f"in {url}") from None
    if pinned is None:
        raise BundleIntegrityError(f"{pointer}: names {version} but pins no digest — run "
                                   "lensflow promote again")
    if got != pinned:
        raise BundleIntegrityError(
            f"bundle {target}: {pointer} pins sha256 {pinned[:12]}… but the manifest hashes to "
            f"{got[:12]}… — the bundle changed after promotion")
    check_promotion(pointer, pin, basename(url), url)
    return target


def fetch_bundle(url: str, verify: Callable[[Path], object]) -> Path:
    """The local copy of the bundle at ``url`` in the cache, keyed by its manifest's digest,
    checked by ``verify`` (every hash, no unlisted file) before it is returned: a download
    before it enters the cache, a copy already there each time it is used.
    """
    try:
        raw = read_bytes(join(url, MANIFEST))
    except FileNotFoundError:
        raise BundleNotFoundError(f"bundle {url}: no manifest.json there") from None
    digest = hashlib.sha256(raw).hexdigest()
    _check_pin(url, digest)
    version = basename(url)
    cached = cache_dir() / digest
    copy = _checked_copy(url, cached / version, digest, verify)
    if copy is not None:
        return copy
    cache_dir().mkdir(parents=True, exist_ok=True)
    # Worker processes of one machine that start together wait for the first one's download
    # instead of each fetching the same bundle; the others then check that copy like any other.
    with _download_lock(cache_dir() / f".{digest[:16]}.lock"):
        copy = _checked_copy(url, cached / version, digest, verify)
        if copy is not None:
            return copy
        return _download(url, raw, cached, version, verify)


def _checked_copy(url: str, copy: Path, digest: str, verify: Callable[[Path], object]
                  ) -> Path | None:
    """``copy`` when the cache holds it and it checks out; None when it must be fetched (a bad
    copy is discarded first)."""
    if not (copy / MANIFEST).is_file():
        return None
    problem = _cached_copy_problem(copy, digest, verify)
    if problem is None:
        return copy
    # Whoever can write the cache must not choose what runs: drop the copy, fetch again.
    _log.warning("warning: bundle %s: the cached copy %s is not the bundle (%s); fetching "
                 "it again", url, copy.parent, problem)
    _discard(url, copy.parent, problem)
    return None


@contextlib.contextmanager
def _download_lock(path: Path):
    """An exclusive lock on ``path`` between the processes of this machine (none where the
    platform has no ``fcntl``: concurrent fetches then each download, and one copy wins)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download(url: str, raw: bytes, cached: Path, version: str,
              verify: Callable[[Path], object]) -> Path:
    """Fetch the bundle into a staging folder, verify it, and rename it into ``cached``."""
    files = _listed(url, raw)
    staging = Path(tempfile.mkdtemp(prefix=f".{cached.name[:16]}-", dir=cache_dir()))
    try:
        local = staging / version
        local.mkdir()
        fs, root = filesystem(url)
        if files:
            fs.get([f"{root}/{rel}" for rel in files], [str(local / rel) for rel in files])
        (local / MANIFEST).write_bytes(raw)
        for suffix in (RECORD_SUFFIX, SIGNATURE_SUFFIX):
            try:
                beside = fs.cat_file(root + suffix)
            except FileNotFoundError:
                continue  # the local check names a missing record, or an unsigned bundle
            staging.joinpath(version + suffix).write_bytes(beside)
        verify(local)
        try:
            os.rename(staging, cached)
        except OSError:  # another process of this machine fetched it first: use theirs, checked
            verify(cached / version)
        downloads[url] += 1
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cached / version


def _cached_copy_problem(copy: Path, digest: str, verify: Callable[[Path], object]) -> str | None:
    """What is wrong with a cached copy of the bundle whose manifest hashes to ``digest``: its
    manifest is another one, or ``verify`` refuses it (a file, the record); None when sound."""
    got = file_sha256(copy / MANIFEST)
    if got != digest:
        return f"its manifest hashes to {got[:12]}…, the store's to {digest[:12]}…"
    try:
        verify(copy)
    except BundleIntegrityError as err:
        return str(err)
    return None


def _discard(url: str, cached: Path, problem: str) -> None:
    """Move a bad cached copy out of its digest's place (one rename), then delete it."""
    aside = cached.with_name(f".stale-{cached.name[:16]}-{os.getpid()}-{time.time_ns()}")
    try:
        os.rename(cached, aside)
    except FileNotFoundError:
        return  # another process of this machine discarded it first
    except OSError as err:
        raise BundleIntegrityError(
            f"bundle {url}: the cached copy {cached} is not the bundle ({problem}) and cannot "
            f"be removed ({err.strerror}); delete it") from None
    shutil.rmtree(aside, ignore_errors=True)


def _check_pin(url: str, digest: str) -> None:
    """A bundle the model's ``current`` names must hash to what ``current`` pins."""
    try:
        pin = read_remote_pointer(parent(url))
    except BundleNotFoundError:
        return
    if pin is not None and pin[0] == basename(url) and pin[1] is not None and pin[1] != digest:
        raise BundleIntegrityError(
            f"bundle {url}: {join(parent(url), CURRENT)} pins sha256 {pin[1][:12]}… but the "
            f"manifest hashes to {digest[:12]}… — the bundle changed after promotion")


def _listed(url: str, raw: bytes) -> list[str]:
    """The files the manifest lists, refusing any path that would leave the bundle."""
    try:
        files = json.loads(raw).get("files")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise BundleIntegrityError(f"bundle {url}: manifest.json is not valid JSON ({err})") \
            from None
    if not isinstance(files, dict):
        raise BundleIntegrityError(f"bundle {url}: manifest.json has no 'files' table")
    return sorted(check_listed_path(url, rel) for rel in files)
