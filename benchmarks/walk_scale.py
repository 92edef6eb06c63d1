"""The walk of a huge image folder and the incremental lookup, at scale: time and peak memory.

Generates ``--files`` empty ``.jpg`` files (default 1,000,000, in folders of 1,000) in a temp
dir, then measures

1. ``walk_folder``: seconds, and peak Python memory (tracemalloc, a second pass) and the
   process's peak RSS growth;
2. ``already_scored`` (what ``--incremental`` asks) over ``--nights`` past partitions of this
   model — two full runs (one of another model version between them), then nights of ``--new``
   files each, as incremental nights write, and ``--new`` files that arrived today: all keys
   (no ``files``), and bounded by the walked files (``files=``), which stops at the newer full
   run because no older partition can hold an unresolved key.

Prints one JSON line of figures. Usage::

    python benchmarks/walk_scale.py                   # 1M files
    python benchmarks/walk_scale.py --files 200000 --nights 7
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import tracemalloc
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scoring.image_folder import walk_folder  # noqa: E402
from scoring.image_rows import IMAGE_PREDICTIONS_SCHEMA, already_scored  # noqa: E402

PER_FOLDER = 1000
TABLE = "image_predictions"


def make_files(root: Path, n: int) -> float:
    """``n`` empty .jpg files in folders of PER_FOLDER; seconds taken."""
    started = time.perf_counter()
    for start in range(0, n, PER_FOLDER):
        folder = root / f"d{start // PER_FOLDER:05d}"
        folder.mkdir()
        for i in range(start, min(n, start + PER_FOLDER)):
            os.close(os.open(folder / f"img{i:07d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
    return time.perf_counter() - started


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _partition(out: Path, day: date, files, model: tuple[str, str], scored_at: datetime) -> None:
    """A committed partition holding one successful row per file, as the scorer writes it."""
    folder = out / TABLE / f"run_date={day.isoformat()}"
    folder.mkdir(parents=True)
    n = len(files)
    columns = {f.name: pa.nulls(n, f.type) for f in IMAGE_PREDICTIONS_SCHEMA}
    columns |= {
        "path": pa.array([f.relpath for f in files], pa.string()),
        "file_size": pa.array([f.size for f in files], pa.int64()),
        "mtime": pa.array([f.mtime_ns // 1000 for f in files], pa.int64()).cast(
            IMAGE_PREDICTIONS_SCHEMA.field("mtime").type),
        "pred_label": pa.array(["ant"] * n), "pred_score": pa.array([0.9] * n, pa.float32()),
        "model_name": pa.array([model[0]] * n), "model_version": pa.array([model[1]] * n),
        "bundle_sha256": pa.array(["0" * 64] * n),
        "scored_at": pa.array([scored_at] * n, IMAGE_PREDICTIONS_SCHEMA.field("scored_at").type),
    }
    meta = {"model_name": model[0], "model_version": model[1]}
    table = pa.table(columns, schema=IMAGE_PREDICTIONS_SCHEMA.with_metadata(meta))
    pq.write_table(table, folder / "part-00000-00000.parquet")
    (folder / "_SUCCESS").write_text("")


def measure(n: int, nights: int, new: int, keep: bool) -> dict:
    root = Path(tempfile.mkdtemp(prefix="walk_scale_"))
    try:
        images, out = root / "images", root / "out"
        images.mkdir()
        figures: dict = {"files": n, "make_files_s": round(make_files(images, n), 2)}

        rss0 = _rss_mb()
        started = time.perf_counter()
        walk = walk_folder(images)
        figures["walk_s"] = round(time.perf_counter() - started, 2)
        figures["walk_rss_growth_mb"] = round(_rss_mb() - rss0, 1)
        assert len(walk.files) == n and not walk.skipped
        files = list(walk.files)
        del walk
        tracemalloc.start()
        walk_folder(images)
        figures["walk_peak_traced_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()

        # History, oldest first: a full run, a run of another model version, a second full
        # run, then ``nights`` incremental nights of ``new`` files each; today ``new`` more
        # files arrived (modified after every past run).
        now = datetime.now(timezone.utc)
        base = files[: n - new * (nights + 1)]
        nightly = [files[len(base) + k * new: len(base) + (k + 1) * new] for k in range(nights)]
        for f in files[n - new:]:
            os.utime(f.path, ns=(f.mtime_ns, f.mtime_ns + 86_400 * 10**9))
        today_files = list(walk_folder(images).files)
        model, day = ("tiny", "v1"), date(2026, 1, 1)
        history = [(base, model), (base, ("tiny", "v0")), (base, model),
                   *((batch, model) for batch in nightly)]
        for k, (batch, by) in enumerate(history):
            _partition(out, day + timedelta(days=k), batch, by, now + timedelta(hours=k + 1))
        bundle = SimpleNamespace(name=model[0], version=model[1])
        today = day + timedelta(days=len(history))
        for label, kwargs in (("all_keys", {}), ("bounded", {"files": today_files})):
            rss0 = _rss_mb()
            started = time.perf_counter()
            done = already_scored(out, TABLE, bundle, exclude_date=today, **kwargs)
            figures[f"lookup_{label}_s"] = round(time.perf_counter() - started, 3)
            figures[f"lookup_{label}_rss_growth_mb"] = round(_rss_mb() - rss0, 1)
            assert len(done) == n - new, (label, len(done))
            del done
        figures["partitions"] = len(history)
        figures["peak_rss_mb"] = round(_rss_mb(), 1)
        return figures
    finally:
        if keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1_000_000, help="empty .jpg files to walk")
    parser.add_argument("--nights", type=int, default=7, help="past partitions of this model")
    parser.add_argument("--new", type=int, default=1000, help="files new each later night")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.files, args.nights, args.new, args.keep)))


if __name__ == "__main__":
    main()
