"""Where lensflow reads and writes: a local path, or a URL of any fsspec file system.

A reference with a scheme (``s3://bucket/key``, ``gs://``, ``az://``, ``memory://``) is a URL
on an object store; anything else (``runs/x``, ``/data/x``, ``file:///data/x``) is a local path and
keeps every local guarantee (renames, locks, fsync). Object stores have no directories and no
rename: what lensflow writes there becomes visible one whole object at a time (a PUT), which is
what the bundle upload (:func:`export.bundle.publish`) and the Parquet commit record
(:mod:`scoring.object_commit`) are built on.

Credentials never pass through here: each driver reads its own standard settings (for S3 the
``AWS_*`` variables, ``~/.aws``, instance roles; ``AWS_ENDPOINT_URL`` for MinIO/Ceph) and fsspec's
``FSSPEC_<PROTOCOL>_<OPTION>`` variables.
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path

from export.errors import ExportError

#: Objects a writer left without the object that makes them visible (a commit record, a bundle's
#: manifest), once the newest is this old (seconds), belong to a dead writer and may be deleted:
#: no live run or upload takes that long.
ORPHAN_GRACE_S = 6 * 3600

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_LOCAL_SCHEMES = {"file", "local"}
#: The package that brings each protocol, for the one-line error when it is missing.
_DRIVERS = {protocol: f"{package} (pip install 'lensflow[{extra}]')"
            for protocols, package, extra in [(("s3", "s3a"), "s3fs", "s3"),
                                              (("gs", "gcs"), "gcsfs", "gcs"),
                                              (("az", "abfs"), "adlfs", "azure")]
            for protocol in protocols}


class StorageError(ExportError):
    """A URL whose file system cannot be used here (no driver installed, unreachable)."""


def is_url(ref: str | Path) -> bool:
    """Whether ``ref`` names an object on a remote (non-local) file system."""
    if isinstance(ref, Path):
        return False
    match = _SCHEME.match(ref)
    return bool(match) and match.group(1).lower() not in _LOCAL_SCHEMES


def as_local(ref: str | Path) -> Path:
    """A local reference as a path (``file://`` stripped)."""
    text = str(ref)
    match = _SCHEME.match(text)
    return Path(text[match.end():]) if match else Path(text)


def ref_text(ref: str | Path) -> str:
    """A reference as text: a URL as given (no trailing ``/``), a local path as a path."""
    return ref.rstrip("/") if is_url(ref) else str(as_local(ref))


def absolute(ref: str | Path) -> str | Path:
    """A URL as given; a local path made absolute (a worker's working directory is not ours)."""
    return ref_text(ref) if is_url(ref) else as_local(ref).absolute()


#: Environment variables the fsspec drivers read their endpoint and credentials from.
_STORAGE_ENV = ("AWS_", "BOTO_", "GOOGLE_", "GCE_", "AZURE_", "FSSPEC_")


def storage_environment() -> dict[str, str]:
    """This process's object-storage settings (endpoint, credentials) from the environment.

    Decoding processes come from a forkserver started once per process, possibly before these
    were set (a test fixture, a flow that sets them late); they adopt this snapshot, so every
    process of one run reads the same store. Never logged.
    """
    return {k: v for k, v in os.environ.items() if k.startswith(_STORAGE_ENV)}


def adopt_environment(settings: dict[str, str]) -> None:
    """Make ``settings`` (a :func:`storage_environment` snapshot) this process's own."""
    for key, value in settings.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def filesystem(url: str):
    """``(fsspec file system, path inside it)`` of a URL.

    Listing caches are off: another process (a worker, the next run) may have written since.
    """
    import fsspec

    protocol = _SCHEME.match(url).group(1).lower()
    try:
        return fsspec.url_to_fs(url, use_listings_cache=False)
    except ImportError:
        driver = _DRIVERS.get(protocol, f"the fsspec driver for {protocol}://")
        raise StorageError(f"{url}: reading {protocol}:// needs {driver}") from None
    except ValueError as err:
        raise StorageError(f"{url}: {err}") from None


def join(base: str | Path, *parts: str) -> str | Path:
    """``base/part/...``: a URL stays a URL, a path stays a ``Path``."""
    if not is_url(base):
        return as_local(base).joinpath(*parts)
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def parent(ref: str | Path) -> str | Path:
    if not is_url(ref):
        return as_local(ref).parent
    return str(ref).rstrip("/").rsplit("/", 1)[0]


def basename(ref: str | Path) -> str:
    return str(ref).rstrip("/").rsplit("/", 1)[-1] if is_url(ref) else as_local(ref).name


def read_bytes(url: str) -> bytes:
    """An object's bytes; a missing one is ``FileNotFoundError``."""
    fs, path = filesystem(url)
    return fs.cat_file(path)


def write_bytes(url: str, data: bytes) -> None:
    """Write one object whole: a single PUT, so a reader sees the old object or the new one."""
    fs, path = filesystem(url)
    fs.pipe_file(path, data)


def is_file(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.isfile(path)


def local_copy(url: str) -> Path:
    """A file or folder on object storage downloaded into a new temporary folder, keeping its
    name (inputs read whole: a ratings table, a MovieLens folder)."""
    import atexit
    import shutil
    import tempfile

    fs, path = filesystem(url)
    if not fs.exists(path):
        raise FileNotFoundError(url)
    target = Path(tempfile.mkdtemp(prefix="lensflow-input-")) / basename(url)
    atexit.register(shutil.rmtree, target.parent, True)
    if fs.isdir(path):
        fs.get(path.rstrip("/") + "/", str(target), recursive=True)
    else:
        fs.get_file(path, str(target))
    return target


def full_url(fs, path: str) -> str:
    """The URL of a path a listing of ``fs`` returned."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return f"{protocol}://{path}"


def modified_time(info: dict) -> float:
    """POSIX time an entry of a detailed listing was last written (S3, GCS, local, memory)."""
    stamp = info.get("LastModified") or info.get("mtime") or info.get("updated")
    if isinstance(stamp, datetime):
        return stamp.timestamp()
    if isinstance(stamp, str):
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    return float(stamp or 0)


def remove_tree(url: str) -> None:
    """Delete every object under a prefix (or one object); nothing there is not an error."""
    fs, root = filesystem(url)
    try:
        fs.rm(root, recursive=True)
    except FileNotFoundError:
        pass
