"""Verified bundles and loaded runtimes kept per process, so a worker loads a model once per run.

A Dask worker process runs many shards of one run (and many runs over its life). Verifying a
bundle reads and hashes every file it lists (:func:`export.bundle.load_bundle`), and an
ONNX Runtime session plans its graph when it opens: both are paid once per process and bundle
here, keyed by the bundle's directory and its digest
(``Bundle.sha256``: the sha256 of ``manifest.json``, which ``load_bundle`` has checked against the
digest record beside the bundle, ``current``'s pin and any signature; the flow pins it when it
plans the run and every output row carries it). A worker that
finds a different manifest than the one the run pinned refuses to score with it rather than mix
two model versions in one partition. The few most recently used bundles are kept (a long-lived
worker serving successive nightly versions does not grow without bound).

Thread-safe: a worker with several threads may open the same bundle from two shards at once;
the loads are serialised so it is still read once.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from export.bundle import Bundle, read_parity_passed
from scoring.errors import BundleRefError

T = TypeVar("T")
#: Bundles (with their runtimes and derived tables) kept per process.
MAX_BUNDLES = 4

_lock = threading.RLock()
_bundles: OrderedDict[tuple[str, str], dict[Any, Any]] = OrderedDict()
_loads: Counter[str] = Counter()
_uses: Counter[str] = Counter()


def where() -> str:
    """``host:pid`` of this process, for messages and shard results."""
    import os

    return f"{socket.gethostname()}:{os.getpid()}"


def cached_bundle(path: str | Path, sha256: str, opener: Callable[[str], Bundle]) -> Bundle:
    """The bundle at ``path`` whose manifest hashes to ``sha256``, verified once per process.

    opener: the scorer's own ``open_*_bundle`` (verifies the bundle, checks the task).
    """
    key = (str(path), sha256)
    with _lock:
        entry = _bundles.get(key)
        if entry is None:
            try:
                bundle = opener(str(path))
            except BundleRefError as err:
                raise BundleRefError(f"{err} (on {where()}: every worker must see the bundle "
                                     f"at the same path)") from None
            if bundle.sha256 != sha256:
                raise BundleRefError(
                    f"bundle {path}: manifest sha256 {bundle.sha256[:12]} on {where()} is not "
                    f"the {sha256[:12]} this run pinned (the bundle changed or another copy)")
            _loads[f"bundle {path}"] += 1
            entry = _bundles[key] = {"bundle": bundle}
            while len(_bundles) > MAX_BUNDLES:
                _bundles.popitem(last=False)
        _bundles.move_to_end(key)
        _uses[f"bundle {path}"] += 1
        return entry["bundle"]


def keep(bundle: Bundle) -> Bundle:
    """Cache a bundle this process has just verified (the planner), so shards run here reuse it."""
    key = (bundle.ref, bundle.sha256)
    with _lock:
        if key not in _bundles:
            _loads[f"bundle {key[0]}"] += 1
            _bundles[key] = {"bundle": bundle}
            while len(_bundles) > MAX_BUNDLES:
                _bundles.popitem(last=False)
    return bundle


def parity_metadata(bundle: Bundle, model_ref: object, allow_failed: bool) -> dict[str, str]:
    """Refuse a bundle whose parity gate failed unless ``allow_failed``; the partition metadata
    that records both, so a row scored with such a bundle never looks like any other."""
    passed = read_parity_passed(bundle)
    if not passed and not allow_failed:
        raise BundleRefError(
            f"model {model_ref}: {bundle.name}/{bundle.version}: its parity gate failed (or it "
            "has no parity.json) — not scored; --allow-failed-parity (allow_failed_parity) "
            "scores with it anyway")
    return {"parity_passed": str(passed).lower(), "allow_failed_parity": str(allow_failed).lower()}


def cached_for(bundle: Bundle, what: tuple, factory: Callable[[], T]) -> T:
    """A value derived from a cached bundle (a runtime, its vocabularies), built once per process.

    what: names the value, e.g. ``("runtime", "onnx", "cpu", "model", 1)``.
    """
    key = (bundle.ref, bundle.sha256)
    with _lock:
        entry = _bundles.setdefault(key, {"bundle": bundle})
        if what not in entry:
            entry[what] = factory()
            _loads[f"{what[0]} {bundle.path}"] += 1
        return entry[what]


def load_counts() -> dict[str, int]:
    """How many times this process loaded each bundle and built each derived value."""
    with _lock:
        return dict(_loads)


def use_counts() -> dict[str, int]:
    """How many times this process asked for each bundle (a shard asks once)."""
    with _lock:
        return dict(_uses)


def clear() -> None:
    """Forget every cached bundle and count (tests; a worker that must re-verify)."""
    with _lock:
        _bundles.clear()
        _loads.clear()
        _uses.clear()
