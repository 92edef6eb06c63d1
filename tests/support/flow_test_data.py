"""Small inputs and read-backs shared by the flow tests (in-process and real-server)."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

import numpy as np
import pyarrow.parquet as pq
from PIL import Image


def make_images(folder: Path, n: int, *, size: int = 40, seed: int = 0) -> Path:
    """``n`` random RGB PNGs of ``size`` pixels square."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:03d}.png")
    return folder


def partition_rows_and_run_ids(partition: Path) -> tuple[int, set[str]]:
    """Row count over the committed parts and the ``lensflow.run_id`` each part carries."""
    parts = sorted(partition.glob("part-*.parquet"))
    rows = sum(pq.read_metadata(p).num_rows for p in parts)
    run_ids = {pq.read_schema(p).metadata[b"lensflow.run_id"].decode() for p in parts}
    return rows, run_ids


def artifacts_by_key(client, flow_run_id: UUID | str) -> dict:
    """Artifacts of one flow run (its tasks' included), newest per key."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    found = client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(str(flow_run_id))])))
    by_key: dict = {}
    for artifact in sorted(found, key=lambda a: a.created):
        by_key[artifact.key] = artifact
    return by_key


def make_tinted_images(root: Path, n: int = 16) -> Path:
    """``n`` small images whose red and/or blue tint is their label set, with a CSV of
    ``fname,labels,tint,is_valid`` (``tint`` a float target) next to them."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = ["fname,labels,tint,is_valid"]
    for i in range(n):
        pixels = np.full((40, 48, 3), 40, np.uint8)
        labels = []
        if i % 2:
            pixels[..., 0] = 200
            labels.append("red")
        if i % 3 == 0:
            pixels[..., 2] = 200
            labels.append("blue")
        Image.fromarray(pixels).save(root / "img" / f"{i:02d}.png")
        lines.append(f"{i:02d}.png,{' '.join(labels)},{pixels[..., 0].mean() / 255:.4f},"
                     f"{int(i >= n - 5)}")
    (root / "tints.csv").write_text("\n".join(lines) + "\n")
    return root
