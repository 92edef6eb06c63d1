"""The ``delta`` table format against ``parquet``, on local disk and on the S3 test server, in one
run: the same scoring runs written both ways.

(a) Image scoring: one folder (default: hymenoptera_data/val of the shared data) scored with a
    tf_efficientnet_lite0 bundle into ``image_predictions``; images/s end to end, commit included.
(b) The full recommendation table: a random-factor DotProductBias recommender (``--users`` ×
    ``--items`` rows) into ``recommendations_full``; rows/s end to end.
(c) The commit alone: seconds to commit a partition of ``--commit-parts`` parts of 1000 rows
    (footers read, rows checked, made visible: a rename, a commit record, or a Delta commit).

On the S3 server ``parquet`` is the legacy commit-record layout (the only ``parquet`` there is
on a URL). Rounds alternate the four (place, format) pairs ``--repeat`` times, the two formats'
order swapped every round; each pair keeps its best (the machine may be shared). Goals: delta
≥ 0.95× parquet for (a), ≥ 0.8× for (b).

    python benchmarks/table_formats.py [--repeat 2] [--users 1000] [--items 2000] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import uuid
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tests" / "support")]

from object_storage import commit_seconds, s3_server  # noqa: E402
from score_images import copy_folder, make_bundle, shared_data  # noqa: E402

from scoring.image_scoring import score_image_folder  # noqa: E402
from scoring.recommendations import score_recommendations  # noqa: E402

FORMATS = ("parquet", "delta")


def _order(i: int) -> tuple[str, ...]:
    """The formats in round ``i``'s order: alternated, so neither always runs second."""
    return FORMATS if i % 2 == 0 else FORMATS[::-1]


def _best(rounds: list[dict], key: str) -> dict[tuple[str, str], float]:
    best: dict[tuple[str, str], float] = {}
    for r in rounds:
        best[(r["place"], r["format"])] = max(best.get((r["place"], r["format"]), 0.0), r[key])
    return best


def image_rounds(places: dict, folder_of: dict, model, repeat: int, batch_size: int
                 ) -> list[dict]:
    rounds = []
    for i in range(repeat):
        for place, root in places.items():
            for fmt in _order(i):
                summary = score_image_folder(folder_of[place], model, f"{root}/{fmt}-images",
                                             run_date=date(2026, 1, 1 + i), table_format=fmt,
                                             batch_size=batch_size)
                rounds.append({"place": place, "format": fmt, "images": summary.scored,
                               "seconds": summary.seconds,
                               "images_per_s": round(summary.scored / summary.seconds, 2)})
    return rounds


def rec_rounds(places: dict, bundle, repeat: int) -> list[dict]:
    rounds = []
    for i in range(repeat):
        for place, root in places.items():
            for fmt in _order(i):
                summary = score_recommendations(bundle, f"{root}/{fmt}-recs", top_k=0,
                                                full_table=True, run_date=date(2026, 1, 1 + i),
                                                table_format=fmt)
                rounds.append({"place": place, "format": fmt, "rows": summary.full_rows,
                               "seconds": summary.seconds,
                               "rows_per_s": round(summary.full_rows / summary.seconds)})
    return rounds


def report(images: list[dict], recs: list[dict], commits: dict) -> dict:
    img, rec = _best(images, "images_per_s"), _best(recs, "rows_per_s")
    figures = {"images": images[0]["images"], "full_rows": recs[0]["rows"], "places": {}}
    for place in ("local", "s3"):
        ratio_img = img[(place, "delta")] / img[(place, "parquet")]
        ratio_rec = rec[(place, "delta")] / rec[(place, "parquet")]
        figures["places"][place] = {
            "images_per_s": {f: img[(place, f)] for f in FORMATS},
            "image_ratio": round(ratio_img, 3),
            "full_rows_per_s": {f: rec[(place, f)] for f in FORMATS},
            "full_ratio": round(ratio_rec, 3),
            "commit_s": {f: round(commits[(place, f)], 3) for f in FORMATS}}
        print(f"{place}: images/s parquet {img[(place, 'parquet')]} delta "
              f"{img[(place, 'delta')]} (×{ratio_img:.3f}, goal 0.95 "
              f"{'met' if ratio_img >= 0.95 else 'NOT met'}); full table rows/s parquet "
              f"{rec[(place, 'parquet')]:,} delta {rec[(place, 'delta')]:,} (×{ratio_rec:.3f}, "
              f"goal 0.8 {'met' if ratio_rec >= 0.8 else 'NOT met'}); commit parquet "
              f"{commits[(place, 'parquet')]:.3f} s delta {commits[(place, 'delta')]:.3f} s")
    figures["rounds"] = {"images": images, "recs": recs}
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path,
                        help="image folder (default: hymenoptera_data/val of the shared data)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--commit-parts", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    import fsspec
    from recommendations import make_bundle as make_rec_bundle

    server, _ = s3_server()
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            local = copy_folder(args.folder or shared_data() / "hymenoptera_data" / "val", 1,
                                tmp / "images")
            model, _ = make_bundle(tmp / "registry")
            rec_bundle, _ = make_rec_bundle(tmp / "rec-registry", args.users, args.items)
            bucket = f"s3://lensflow-bench-{uuid.uuid4().hex[:8]}"
            fsspec.filesystem("s3").mkdir(bucket)
            fsspec.filesystem("s3").put(str(local), f"{bucket}/images", recursive=True)
            places = {"local": str(tmp / "out"), "s3": f"{bucket}/out"}
            folders = {"local": local, "s3": f"{bucket}/images"}
            images = image_rounds(places, folders, model, args.repeat, args.batch_size)
            recs = rec_rounds(places, rec_bundle, args.repeat)
            commits = {(place, fmt): min(commit_seconds(root, args.commit_parts,
                                                        date(2026, 2, i), fmt)
                                         for i in range(1, 4))
                       for place, root in places.items() for fmt in FORMATS}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
    figures = report(images, recs, commits)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return figures


if __name__ == "__main__":
    main()
