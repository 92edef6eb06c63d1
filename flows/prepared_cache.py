"""The data-prep cache: a prepared split stored as plain JSON, never as pickle.

Prefect's result persistence would store the prepared split with a serializer named in each
stored record, and reads whichever serializer a record names — pickle included — so whoever can
write the cache directory could run code on the next cache hit. This cache is a JSON file per
key (``<cache dir>/prepared-data/<key>.json``, key from ``flows.cache_keys``): the prepared-data
dataclasses are written field by field, and read back only into an allow-list of those classes
(looked up by name in a table, never imported by a name found in the file). A file that is not
such JSON, or names anything else, is a cache miss: prep runs again and replaces it. A hit
returns a Prefect state named ``Cached``, as Prefect's own cache would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from flows.cache_keys import prepared_data_key, result_cache_dir

FORMAT = 1
EXPIRES_AFTER = timedelta(days=30)
SUBDIR = "prepared-data"


class NotCacheable(TypeError):
    """A value holds something the JSON cache does not encode (then it is simply not cached)."""


def _classes() -> dict[str, type]:
    """The prepared-data dataclasses the cache may rebuild, by qualified name."""
    from training.data.images import ImageData, ImageItem, SkippedFile
    from training.data.multilabel import MultiLabelData
    from training.data.points import PointItem
    from training.data.regression import RegressionData

    classes = (ImageData, ImageItem, SkippedFile, MultiLabelData, RegressionData, PointItem)
    return {f"{c.__module__}.{c.__qualname__}": c for c in classes}


def encode(value: Any, classes: dict[str, type] | None = None) -> Any:
    """JSON-ready form of a prepared split: allow-listed dataclasses, paths, tuples, dicts with
    string keys, lists and JSON scalars. Anything else raises :class:`NotCacheable`."""
    classes = _classes() if classes is None else classes
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return {"$path": str(value)}
    if isinstance(value, tuple):
        return {"$tuple": [encode(v, classes) for v in value]}
    if isinstance(value, list):
        return [encode(v, classes) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"$dict": {k: encode(v, classes) for k, v in value.items()}}
    name = f"{type(value).__module__}.{type(value).__qualname__}"
    if dataclasses.is_dataclass(value) and classes.get(name) is type(value):
        return {"$type": name, "fields": {f.name: encode(getattr(value, f.name), classes)
                                          for f in dataclasses.fields(value)}}
    raise NotCacheable(f"prepared data: a {type(value).__name__} is not JSON-cacheable")


def decode(obj: Any, classes: dict[str, type] | None = None) -> Any:
    """Inverse of :func:`encode`; raises ``ValueError`` on anything it did not write."""
    classes = _classes() if classes is None else classes
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [decode(v, classes) for v in obj]
    if not isinstance(obj, dict) or len(obj) not in (1, 2):
        raise ValueError(f"unexpected {type(obj).__name__} in cached prepared data")
    if set(obj) == {"$path"} and isinstance(obj["$path"], str):
        return Path(obj["$path"])
    if set(obj) == {"$tuple"} and isinstance(obj["$tuple"], list):
        return tuple(decode(v, classes) for v in obj["$tuple"])
    if set(obj) == {"$dict"} and isinstance(obj["$dict"], dict):
        return {k: decode(v, classes) for k, v in obj["$dict"].items()}
    if set(obj) == {"$type", "fields"} and isinstance(obj["fields"], dict):
        cls = classes.get(obj["$type"])
        if cls is None:
            raise ValueError(f"cached prepared data names an unknown type {obj['$type']!r}")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        if set(obj["fields"]) != names:
            raise ValueError(f"cached {obj['$type']} has other fields than {sorted(names)}")
        return cls(**{k: decode(v, classes) for k, v in obj["fields"].items()})
    raise ValueError(f"unexpected keys {sorted(obj)} in cached prepared data")


def cache_file(key: str) -> Path:
    """``<cache dir>/prepared-data/<key>.json``."""
    return result_cache_dir() / SUBDIR / f"{key}.json"


def read_prepared(key: str) -> tuple[Any, str] | None:
    """``(prepared data, file)`` on a hit; None on a miss (no file, expired, or anything but
    what :func:`write_prepared` wrote)."""
    path = cache_file(key)
    try:
        stored = json.loads(path.read_bytes())
        if not isinstance(stored, dict) or stored.get("format") != FORMAT \
                or stored.get("key") != key:
            return None
        expires = datetime.fromisoformat(stored["expires_at"])
        if expires <= datetime.now(timezone.utc):
            return None
        return decode(stored["value"]), str(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        return None  # not ours, or damaged: prepare afresh and replace it


def write_prepared(key: str, prepared: Any) -> Path | None:
    """Store a prepared split under ``key`` (atomically); None when it is not JSON-cacheable."""
    try:
        value = encode(prepared)
    except NotCacheable:
        return None
    path = cache_file(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    expires = datetime.now(timezone.utc) + EXPIRES_AFTER
    text = json.dumps({"format": FORMAT, "key": key, "expires_at": expires.isoformat(),
                       "value": value})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def prepared_or_cached(parameters: dict, prepare: Callable[[], Any], log: Any = None) -> Any:
    """The cached split for ``parameters`` as a Prefect ``Cached`` state, else ``prepare()``'s
    result, stored for next time. Call from inside the data-prep task.

    parameters: ``data`` (and ``csv``) are fingerprinted; the rest is part of the key as is.
    log: a logger told the prepared split's summary.
    """
    from prefect.states import Completed

    key = prepared_data_key(None, parameters)
    hit = read_prepared(key)
    if hit is not None:
        prepared, where = hit
        if log is not None and hasattr(prepared, "summary"):
            log.info("%s (cached in %s)", prepared.summary(), where)
        return Completed(name="Cached", data=prepared, message=f"prepared data from {where}")
    prepared = prepare()
    if log is not None and hasattr(prepared, "summary"):
        log.info(prepared.summary())
    write_prepared(key, prepared)
    return prepared
