"""Scoring an image folder on object storage vs the same folder on local disk, in one run.

(a) ``score_image_folder`` over a local folder into a local output root (rename commit).
(b) the same files uploaded to an S3 bucket, scored from ``s3://`` into an ``s3://`` Delta table
    (each batch's images fetched together, parts uploaded, one Delta commit; the default format
    on a URL — ``benchmarks/table_formats.py`` compares it with the earlier commit record).

Same bundle (a local directory, so only the folder and the output differ), same options. Rounds
alternate (a), (b), ``--repeat`` times, and each keeps its best (the machine may be shared).
Prints images/s of each and the ratio b/a (with the CPU seconds the loopback server spent in
each round), then the commit alone: the seconds to commit a
partition of ``--commit-parts`` parts (footers read, rows checked, made visible) on each.

Without ``--endpoint`` (or ``$AWS_ENDPOINT_URL``) the bucket is on a ``moto`` S3 server started on
loopback (``pip install 'moto[server]'``): HTTP over loopback, no network latency, but a Python
server on the same cores — on a real store, per-request latency is what batching hides.
Usage::

    python benchmarks/object_storage.py --make-bundle             # hymenoptera val, lite0 bundle
    python benchmarks/object_storage.py FOLDER --model REG/NAME --copies 1 --repeat 2
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

from score_images import copy_folder, make_bundle, shared_data  # noqa: E402

from export.bundle import resolve_bundle  # noqa: E402
from scoring.image_scoring import score_image_folder  # noqa: E402
from scoring.partition import commit_partition, open_partition  # noqa: E402


def s3_server() -> tuple[object, str]:
    """A loopback moto server and the credentials it accepts, in the standard variables."""
    from s3_server import start_server

    proc, endpoint = start_server()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    return proc, endpoint


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds a process has used so far (Linux; 0 when unknown)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def commit_seconds(out: str | Path, parts: int, day: date, fmt: str | None = None) -> float:
    """Seconds to commit a partition of ``parts`` parts (one shard each, 1000 rows each), in
    table format ``fmt`` (None: the default for ``out``)."""
    import time

    import pyarrow as pa

    from scoring.options import ScoreOptions

    schema = pa.schema([("user", pa.int64()), ("score", pa.float32())])
    meta = {"model_name": "bench", "model_version": "1", "bundle_sha256": "0" * 64}
    pending = open_partition(out, "commit_bench", day, schema, meta,
                             options=ScoreOptions(table_format=fmt) if fmt else None)
    for shard in range(parts):
        with pending.part_writer(shard) as writer:
            writer.write({"user": list(range(1000)), "score": [0.5] * 1000})
    started = time.perf_counter()
    commit_partition(pending, expected_shards=range(parts))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path,
                        help="image folder (default: hymenoptera_data/val of the shared data)")
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--model", help="REG/NAME[/VERSION] or a bundle dir")
    parser.add_argument("--make-bundle", action="store_true",
                        help="export a tf_efficientnet_lite0 bundle first (offline weights)")
    parser.add_argument("--endpoint", default=os.environ.get("AWS_ENDPOINT_URL"),
                        help="an S3 endpoint to use instead of a loopback moto server")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--commit-parts", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not (args.model or args.make_bundle):
        parser.error("give --model or --make-bundle")
    server = None
    if args.endpoint:
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint
    else:
        server, args.endpoint = s3_server()
    import fsspec

    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            source = args.folder or shared_data() / "hymenoptera_data" / "val"
            local = copy_folder(source, args.copies, tmp / "images")
            model = make_bundle(tmp / "registry") if args.make_bundle else resolve_bundle(
                args.model)
            bucket = f"s3://lensflow-bench-{uuid.uuid4().hex[:8]}"
            fs = fsspec.filesystem("s3")
            fs.mkdir(bucket)
            fs.put(str(local), f"{bucket}/images", recursive=True)
            options = {"batch_size": args.batch_size, "workers": args.workers}
            best = {"local": 0.0, "s3": 0.0}
            runs = []
            for i in range(args.repeat):
                day = date(2026, 1, 1 + i)
                for kind, folder, out in (("local", local, tmp / "out"),
                                          ("s3", f"{bucket}/images", f"{bucket}/out")):
                    server_cpu = cpu_seconds(server and server.pid)
                    summary = score_image_folder(folder, model, out, run_date=day, **options)
                    rate = summary.scored / summary.seconds
                    best[kind] = max(best[kind], rate)
                    runs.append({"kind": kind, "images": summary.scored,
                                 "seconds": summary.seconds, "images_per_s": round(rate, 2),
                                 "server_cpu_s": round(cpu_seconds(server and server.pid)
                                                       - server_cpu, 2)})
            commits = {"local": min(commit_seconds(tmp / "out", args.commit_parts, date(2026, 2, i))
                                    for i in range(1, 4)),
                       "s3": min(commit_seconds(f"{bucket}/out", args.commit_parts,
                                                date(2026, 2, i)) for i in range(1, 4))}
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
    figures = {"images": runs[0]["images"], "local_images_per_s": round(best["local"], 2),
               "s3_images_per_s": round(best["s3"], 2),
               "ratio_s3_over_local": round(best["s3"] / best["local"], 3),
               "commit_parts": args.commit_parts,
               "commit_s_local": round(commits["local"], 3),
               "commit_s_s3": round(commits["s3"], 3),
               "endpoint": "moto on loopback" if server is not None else args.endpoint,
               "runs": runs}
    print(f"{figures['images']} images: local disk {figures['local_images_per_s']} images/s, "
          f"s3:// {figures['s3_images_per_s']} images/s, ratio s3/local "
          f"{figures['ratio_s3_over_local']} ({figures['endpoint']}); commit of "
          f"{args.commit_parts} parts: local {figures['commit_s_local']} s, "
          f"s3:// {figures['commit_s_s3']} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return figures


if __name__ == "__main__":
    main()
