"""Scale-out scoring on a local Dask cluster: rows/s with 1 vs 2 (or more) worker processes.

For each worker count a ``distributed.LocalCluster`` (one thread per worker, processes) runs the
same sharded runs the flows run with ``dask_address`` — ``plan_*_run`` here, one
``score_*_shard`` per shard on the workers, ``finish_*_run`` commits — without Prefect in the
way, so the figures are the scoring's own:

- images: the shared hymenoptera folder (× ``--copies``) through a tf_efficientnet_lite0 bundle
  (packaged ImageNet weights); JPEG decode and the graph both on the worker.
- recommendations: a random-factor dot-product model of ml-100k's shape (943 users × 1,682
  items, 50 factors; ``--rec-users`` for more), top-10 plus the full table (1.6 M rows),
  mostly Arrow building and Parquet writing.

Each count runs one cold round (workers import torch/ONNX Runtime and verify the bundle) and
``--repeat`` warm rounds (bundle and runtime cached per worker), keeping the best warm round.
The same scorers in one process (one shard: DataLoader decode workers + ONNX Runtime on every
core) run alongside as the baseline. Prints rows/s side by side, the speed-up, the cores
the workers really got (worker CPU seconds ÷ wall seconds: on a shared machine, less than the
worker count) and the serial share (plan + commit ÷ wall).

    .venv/bin/python benchmarks/dask_scaling.py [--workers 1 2] [--shards 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from score_images import copy_folder, make_bundle, shared_data  # noqa: E402

from scoring.image_scoring import (  # noqa: E402
    finish_image_run,
    plan_image_run,
    score_image_folder,
    score_image_shard,
)
from scoring.options import ImageScoreOptions, RecScoreOptions  # noqa: E402
from scoring.recommendations import (  # noqa: E402
    finish_rec_run,
    plan_rec_run,
    score_recommendations,
    score_user_shard,
)

DAY = date(2026, 11, 22)


def make_rec_bundle(registry: Path, n_users: int = 943, n_items: int = 1682) -> Path:
    """A dot-product recommender of ml-100k's shape with random factors and 20 seen items each."""
    from export.convert import export_bundle
    from training.models.collab import DotProductBias

    torch.manual_seed(0)
    model = DotProductBias(n_users, n_items, 50, y_range=(0.5, 5.5))
    rng = np.random.default_rng(0)
    seen = registry.parent / "seen.parquet"
    pq.write_table(pa.table({
        "user_idx": pa.array(np.repeat(np.arange(n_users), 20), pa.int32()),
        "item_idx": pa.array(rng.integers(0, n_items, n_users * 20), pa.int32())}), seen)
    manifest = {"task": "collab", "users": list(range(1, n_users + 1)),
                "items": list(range(1, n_items + 1)), "id_type": "int64",
                "y_range": [0.5, 5.5], "model": model.config().to_dict(),
                "seen": {"file": "seen.parquet"}}
    return export_bundle(model.eval(), manifest, registry, "bench-rec", pt2=False,
                         extra_files={"seen.parquet": seen}).bundle_path


def sharded_round(client, plan, score_shard, finish) -> dict:
    """One run: plan here, shards on the workers, commit here. Rows, wall seconds, the serial
    part (plan + commit) and the CPU seconds the workers spent (``time.process_time`` deltas)."""
    cpu_before = client.run(time.process_time)
    started = time.perf_counter()
    planned = plan()
    mapped = time.perf_counter()
    results = client.gather(client.map(score_shard, planned.jobs, pure=False))
    committing = time.perf_counter()
    summary = finish(planned, results)
    ended = time.perf_counter()
    cpu_after = client.run(time.process_time)
    rows = summary.rows if hasattr(summary, "rows") else summary.topk_rows + summary.full_rows
    return {"rows": rows, "wall": ended - started,
            "serial": (mapped - started) + (ended - committing),
            "worker_cpu": sum(cpu_after[w] - cpu_before.get(w, 0.0) for w in cpu_after)}


def single_process(folder: Path, image_bundle: Path, rec_bundle: Path, out: Path,
                   batch_size: int, repeat: int) -> dict:
    """Best of ``repeat`` rounds of the scorers with their one shard in this process."""
    image_s, rec_s, rows = [], [], {}
    for _ in range(repeat):
        s = score_image_folder(folder, image_bundle, out, run_date=DAY, batch_size=batch_size)
        r = score_recommendations(rec_bundle, out, top_k=10, full_table=True, run_date=DAY)
        image_s.append(s.seconds)
        rec_s.append(r.seconds)
        rows = {"images": s.rows, "recs": r.topk_rows + r.full_rows}
    return {"images": rows["images"] / min(image_s), "recs": rows["recs"] / min(rec_s)}


def on_cluster(n_workers: int, folder: Path, image_bundle: Path, rec_bundle: Path, out: Path,
               args) -> dict:
    """Cold and best warm rows/s of both kinds on a fresh cluster of ``n_workers``, with the
    cores the workers really got and the serial share of the best round."""
    from distributed import Client, LocalCluster

    plans = {
        "images": (lambda: plan_image_run(folder, image_bundle, out, ImageScoreOptions(
                       shards=args.shards, batch_size=args.batch_size), run_date=DAY,
                       threads=1),
                   score_image_shard, finish_image_run),
        "recs": (lambda: plan_rec_run(rec_bundle, out, RecScoreOptions(
                     shards=args.shards, top_k=10, full_table=True), run_date=DAY, threads=1),
                 score_user_shard, finish_rec_run),
    }
    figures: dict = {}
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      host="127.0.0.1", dashboard_address=None, silence_logs=40) as cluster, \
            Client(cluster) as client:
        for kind, (plan, score_shard, finish) in plans.items():
            cold = sharded_round(client, plan, score_shard, finish)
            best = min((sharded_round(client, plan, score_shard, finish)
                        for _ in range(args.repeat)), key=lambda r: r["wall"])
            figures[kind] = best["rows"] / best["wall"]
            figures[f"{kind}_cold"] = cold["rows"] / cold["wall"]
            figures[f"{kind}_cores_used"] = best["worker_cpu"] / best["wall"]
            figures[f"{kind}_serial_share"] = best["serial"] / best["wall"]
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2, help="warm rounds; the best counts")
    parser.add_argument("--rec-users", type=int, default=943,
                        help="users of the recommender (items stay 1,682)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    data = shared_data() / "hymenoptera_data"
    if not data.is_dir():
        sys.exit(f"no {data}: set LENSFLOW_SHARED_DATA to the shared data folder")
    with tempfile.TemporaryDirectory(prefix="lensflow-dask-") as tmp:
        tmp = Path(tmp)
        folder = copy_folder(data, args.copies, tmp / "images")
        image_bundle = make_bundle(tmp / "registry")
        rec_bundle = make_rec_bundle(tmp / "registry", n_users=args.rec_users)
        results = {"single process": single_process(folder, image_bundle, rec_bundle,
                                                    tmp / "out", args.batch_size, args.repeat)}
        for n in args.workers:
            results[f"{n} worker{'s' if n > 1 else ''}"] = on_cluster(
                n, folder, image_bundle, rec_bundle, tmp / "out", args)
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


def report(results: dict, args) -> None:
    names = list(results)
    cluster = [n for n in names if n != "single process"]
    print(f"cores {len(os.sched_getaffinity(0))}, load {os.getloadavg()[0]:.1f}, "
          f"shards {args.shards}, one thread per worker; rows/s (best warm round); cores used ="
          f" worker CPU s / wall s; serial share = (plan + commit) / wall")
    print(f"{'':22s}" + "".join(f"{n:>16s}" for n in names))
    for kind in ("images", "recs"):
        print(f"{kind + ' rows/s':22s}" + "".join(f"{results[n][kind]:16,.0f}" for n in names))
        print(f"{kind + ' cold rows/s':22s}{'':16s}"
              + "".join(f"{results[n][kind + '_cold']:16,.0f}" for n in cluster))
        base = results[cluster[0]][kind]
        print(f"{kind + ' vs ' + cluster[0]:22s}{'':16s}"
              + "".join(f"{results[n][kind] / base:15.2f}x" for n in cluster))
        print(f"{kind + ' cores used':22s}{'':16s}"
              + "".join(f"{results[n][kind + '_cores_used']:16.2f}" for n in cluster))
        print(f"{kind + ' serial share':22s}{'':16s}"
              + "".join(f"{results[n][kind + '_serial_share']:16.0%}" for n in cluster))


if __name__ == "__main__":
    main()
