"""The toy ``scores`` table of the partition tests (a user and a score per row) in any layout,
and a tiny recommender bundle for the tests that score one into a registry on object storage."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pyarrow as pa

from scoring.partition import (
    CommittedPartition,
    PendingPartition,
    commit_partition,
    open_partition,
)

DAY, OTHER_DAY = date(2026, 11, 22), date(2026, 11, 23)
SCHEMA = pa.schema([("user", pa.int64()), ("score", pa.float32())])
META = {"model_name": "m", "model_version": "v1", "bundle_sha256": "ab" * 32}


def write_users(out, start: int, n: int, options, day: date = DAY, shards: int = 1,
                rows_per_file: int = 3, **kw) -> tuple[PendingPartition, CommittedPartition]:
    """A committed run of ``scores`` for ``day`` under ``out`` (``options``: its table format):
    shard ``s`` writes the ``n`` users from ``start + s * n`` on, each scored ``user / 2``."""
    pending = open_partition(out, "scores", day, SCHEMA, META, rows_per_file=rows_per_file,
                             options=options, **kw)
    for shard in range(shards):
        with pending.part_writer(shard) as w:
            users = list(range(start + shard * n, start + (shard + 1) * n))
            w.write({"user": users, "score": [u / 2 for u in users]})
    return pending, commit_partition(pending, expected_shards=range(shards))


def string_id_recommender(registry: str | Path) -> Path:
    """A tiny collaborative-filtering bundle with string user ids, exported (ONNX, TorchScript,
    parity: seconds) to ``registry``/movies; returns the bundle's path."""
    from tiny_export_models import TinyCollab, collab_manifest

    from export.convert import export_bundle

    model = TinyCollab().eval()
    return export_bundle(model, collab_manifest(model) | {"id_type": "string"}, registry,
                         "movies", pt2=False).bundle_path
