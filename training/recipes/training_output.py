"""What every recipe writes beside its weights: strict JSON files and ``lineage.json``.

A training output holds ``model.json``, ``weights.safetensors``, ``metrics.json``,
``history.json``, ``plots/``, a validation sample and ``lineage.json`` — how the model was made:
the options, a fingerprint of the data and the code version. Export copies the lineage into the
bundle's manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
from collections.abc import Iterable
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from export.pins import file_sha256

LINEAGE_FILE = "lineage.json"
OptionsT = TypeVar("OptionsT", bound=BaseModel)


def write_json(path: Path, obj) -> None:
    """Strict JSON: a metric that is undefined (NaN, e.g. a class with no samples) is null."""
    path.write_text(json.dumps(_finite(obj), indent=2, default=str, allow_nan=False) + "\n")


def read_json(path: Path):
    """The JSON in ``path``, or None when there is no such file."""
    return json.loads(path.read_text()) if path.exists() else None


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_lineage(out_dir: Path, task: str, options: BaseModel, data: dict, **choices) -> dict:
    """Write ``lineage.json``: the task, the options used, the data fingerprint, the code, and
    ``choices`` the run made itself (``lr_choice``: each stage's LR and why)."""
    lineage = {"task": task, "options": options.model_dump(), "data": data,
               "code": code_version(), **choices}
    write_json(out_dir / LINEAGE_FILE, lineage)
    return lineage


def fingerprint_path(path: str | Path, *, source: str | None = None) -> dict:
    """sha256 of a file's contents, or of a folder's sorted relative paths, sizes and mtimes.

    source: the URL ``path`` was downloaded from, which the fingerprint names instead; a
    downloaded folder is fingerprinted by its files' contents, since its copy's mtimes are the
    download's.
    """
    path = Path(path)
    if path.is_file():
        return {"sha256": file_sha256(path), "files": 1, "basis": "contents",
                "path": source or str(path)}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if source is None:
        return _stat_fingerprint(path, ((p, "") for p in files))
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(path).as_posix()}\t{file_sha256(file)}\n".encode())
    return {"sha256": digest.hexdigest(), "files": len(files), "basis": "paths, contents",
            "path": source}


def fingerprint_items(root: Path, items: Iterable[tuple[Path, object]]) -> dict:
    """sha256 over each ``(file, label)``'s relative path, size, mtime and label."""
    return _stat_fingerprint(Path(root), items)


def _stat_fingerprint(root: Path, entries: Iterable[tuple[Path, object]]) -> dict:
    digest = hashlib.sha256()
    lines = sorted(_stat_line(root, path, label) for path, label in entries)
    for line in lines:
        digest.update(line.encode() + b"\n")
    return {"sha256": digest.hexdigest(), "files": len(lines),
            "basis": "paths, sizes, mtimes", "path": str(root)}


def _stat_line(root: Path, path: Path, label) -> str:
    stat = os.stat(path)
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        rel = path.as_posix()
    return f"{rel}\t{stat.st_size}\t{stat.st_mtime_ns}\t{label}"


@lru_cache(maxsize=1)
def code_version() -> dict:
    """The installed lensflow version and the git commit of the source tree (None outside git)."""
    try:
        version = metadata.version("lensflow")
    except metadata.PackageNotFoundError:
        version = None
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10, check=True)
        commit = done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"lensflow": version, "git_commit": commit}


def with_overrides(cls: type[OptionsT], options: BaseModel | None, overrides: dict) -> OptionsT:
    """The options a recipe runs with: ``options`` (default: ``cls()``) with ``overrides``
    applied and validated, so ``recipe(data, out, epochs=1, lr=1e-3)`` still reads well."""
    if options is None:
        return cls(**overrides)
    if not isinstance(options, cls):  # e.g. ImageTrainOptions handed to the multi-label recipe
        options = cls(**options.model_dump())
    return options.updated(**overrides) if overrides else options
