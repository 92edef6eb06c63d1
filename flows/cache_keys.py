"""Cache keys for data preparation: the dataset's fingerprint plus the split parameters.

Preparing an image set opens every file once to find corrupt ones, which on a large set costs
minutes; re-running a training with other hyper-parameters should not pay it again. The key is
a sha256 over every file's relative path, size and mtime (what ``make`` and ``rsync`` trust to
say a file changed, without reading it) and the parameters that shape the split, so adding,
removing or touching one image, or changing ``valid_pct``/``seed``, prepares afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

#: Where cached data prep lives; shared by every run on this machine, worker or not.
CACHE_DIR_ENV = "LENSFLOW_CACHE_DIR"


def result_cache_dir() -> Path:
    """Absolute cache directory (``$LENSFLOW_CACHE_DIR`` or ``~/.cache/lensflow``); prepared
    splits are JSON files in its ``prepared-data/`` (the pickled Prefect results earlier
    versions kept in ``~/.cache/lensflow/prefect-results`` are never read)."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured).expanduser().resolve()
    return Path.home() / ".cache" / "lensflow"


def dataset_fingerprint(path: str | Path) -> str:
    """sha256 over (relative path, size, mtime_ns) of every file under ``path`` (or of the file)."""
    root = Path(path).expanduser().resolve()
    digest = hashlib.sha256(str(root).encode())
    if root.is_file():
        stat = root.stat()
        digest.update(f"\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
        return digest.hexdigest()
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            full = Path(dirpath) / name
            try:
                stat = full.stat()
            except FileNotFoundError:  # removed while we walked: the next key will differ
                continue
            entries.append(f"{full.relative_to(root).as_posix()}\0{stat.st_size}\0"
                           f"{stat.st_mtime_ns}")
    for entry in sorted(entries):
        digest.update(b"\n" + entry.encode())
    return digest.hexdigest()


def prepared_data_key(context, parameters: Mapping) -> str:
    """Key of a prepared split: fingerprints of ``data`` (and ``csv``) plus the other parameters
    (``context`` is unused; the signature is Prefect's ``cache_key_fn``'s)."""
    others = {k: v for k, v in parameters.items() if k not in ("data", "csv")}
    # The prep code is part of the key: a changed data layout must not be served stale.
    from training import data as data_package

    code = sorted(str(f) for f in Path(data_package.__file__).parent.glob("*.py"))
    parts = [dataset_fingerprint(parameters["data"]), *map(dataset_fingerprint, code)]
    if parameters.get("csv"):
        parts.append(dataset_fingerprint(parameters["csv"]))
    parts.append(json.dumps(others, sort_keys=True, default=str))
    return "prepared-data-" + hashlib.sha256("\n".join(parts).encode()).hexdigest()
