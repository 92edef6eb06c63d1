"""Edit a committed bundle as anyone who can write the registry could, to test what refuses it.

``edited_manifest`` rewrites ``manifest.json`` (read-only once committed); ``reseal`` then makes
the digest record agree with it, so only ``current``'s pin, a signature or the parity gate can
tell.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import stat
from collections.abc import Iterator
from pathlib import Path


def record_of(bundle: Path) -> Path:
    """The bundle's digest record, ``<version>.digest.json`` beside it."""
    return bundle.parent / f"{bundle.name}.digest.json"


def signature_of(bundle: Path) -> Path:
    """The bundle's model-signing signature, ``<version>.sig`` beside it."""
    return bundle.parent / f"{bundle.name}.sig"


@contextlib.contextmanager
def edited_manifest(bundle: Path) -> Iterator[dict]:
    """The bundle's manifest as a dict, written back (the record left as it was) on exit."""
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    yield manifest
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    path.write_text(json.dumps(manifest, indent=2))


def reseal(bundle: Path) -> None:
    """Rewrite the digest record for the bundle's manifest as it is now."""
    record = json.loads(record_of(bundle).read_text())
    record["sha256"] = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    record_of(bundle).chmod(stat.S_IRUSR | stat.S_IWUSR)
    record_of(bundle).write_text(json.dumps(record))
