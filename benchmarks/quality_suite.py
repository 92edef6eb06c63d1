"""Every task with lensflow's defaults next to fastai 2.8's defaults: one table, one run.

    .venv/bin/python benchmarks/quality_suite.py [--tasks ants,pets,multilabel,points,ratings]
        [--freeze-epochs N] [--epochs N] [--fastai-python /path/to/python]
        [--size PX] [--sgdr] [--variant NAME:key=value,...] [--variants-only] [--typed-tasks ants]
        [--fastai-tasks ants,multilabel] [--threads 2] [--json FILE]

Tasks (data from ``../shared/data`` or ``$LENSFLOW_SHARED_DATA``):

- ``ants``: single-label ants/bees (``hymenoptera_data``, its ``val/`` folder is validation);
- ``pets``: single-label breeds of the Oxford-IIIT Pet sample (``derived/head_center.csv``'s
  ``breed``, 20 % per class held out, seed 42);
- ``multilabel``: ants/bees + pets with two labels each (``insect bee``, ``cat bengal``; built by
  ``tests/support/multilabel_sample.py``), metrics at the threshold the recipe stores;
- ``points``: pet head centres (``center_x,center_y``), ``valid_mse`` against ``baseline_mse``;
- ``ratings``: the recommender on ml-100k (random 20 %, seed 42).

Rows per task: ``lensflow`` (no tuning flags: each task's option defaults, ``--lr auto``),
``lensflow typed`` (the LRs ``auto`` chose typed as a number: the ratio of the two wall times is
what automatic LR costs), one row per ``--variant`` (option overrides, e.g.
``--variant x2:lr_rule_mult=2`` or ``--variant long:epochs=8,unfrozen_lr_factor=1``;
``--variants-only`` skips the defaults row and its typed rerun),
``lensflow sgdr`` with ``--sgdr`` (every task's defaults under ``schedule=sgdr``, ratings too:
cycles of 1, 2, 4, ... epochs where both stages end a cycle that way, else one-epoch cycles), and
``fastai`` when ``--fastai-python`` names an interpreter that imports fastai 2.8
(``benchmarks/fastai_peer.py`` runs there: ``vision_learner`` on timm ``tf_efficientnet_lite0``
with the same packaged weights, ``fine_tune`` with fastai's default frozen epoch, LR, head and
augmentations; ``collab_learner`` with fastbook's settings for ratings). Images, split, backbone,
input size, batch size and the number of epochs in all are the same for both tools (lensflow's
0 + 4 is fastai's 1 + 3: each tool splits the budget its own default way); ``--freeze-epochs`` /
``--epochs`` / ``--size`` override every row's epochs and input side for a quick run.

Every image row notes the first key metric after every epoch (frozen epochs first; the best
epoch restored is the early-stopping winner: single-label's most accurate, others' lowest
``valid_loss``; else the last) and shows its
metrics without and with test-time augmentation (``metrics.json``'s ``tta`` block: the centre
crop and its mirror, what a ``--tta`` bundle averages; the fastai peer reports none), and the
summary gives per task SGDR ÷ one-cycle and TTA ÷ plain of the first key metric. Figures only:
nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "support"), str(REPO / "benchmarks")]

from multilabel_sample import write_multilabel_csv  # noqa: E402
from suite_baselines import linear_probe, single_label_summary  # noqa: E402

from training.data.images import from_csv  # noqa: E402
from training.data.multilabel import from_multilabel_csv  # noqa: E402
from training.data.regression import from_regression_csv  # noqa: E402
from training.errors import TrainingError  # noqa: E402
from training.fit.schedule import Sgdr  # noqa: E402
from training.recipes.collab import train_recommender  # noqa: E402
from training.recipes.image import prepare_image_data, train_image_model  # noqa: E402
from training.recipes.multilabel import train_multilabel_model  # noqa: E402
from training.recipes.options import (  # noqa: E402
    ImageTrainOptions,
    MultiLabelOptions,
    RecommenderOptions,
    RegressionOptions,
)
from training.recipes.regression import train_regression_model  # noqa: E402

#: Single-label image sets as ``train/`` + ``val/`` class folders under the shared data.
FOLDER_SETS = {"ants": "hymenoptera_data", "brain": "brain-mri-tumor",
               "dtd": "dtd-texture-sample", "cifar": "cifar10-sample", "mnist": "mnist-sample"}
SINGLE_LABEL = (*FOLDER_SETS, "pets")
TASKS = (*SINGLE_LABEL, "multilabel", "points", "ratings")
PETS = "oxford-iiit-pet-sample"
HEAD_CENTRES = f"{PETS}/derived/head_center.csv"
PEER = Path(__file__).with_name("fastai_peer.py")
#: ``fine_tune``'s own default: fastai trains the head alone for one epoch before unfreezing.
FASTAI_FREEZE_EPOCHS = 1


def shared_data() -> Path:
    return Path(os.environ.get("LENSFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


@dataclass
class Row:
    task: str
    tool: str
    metrics: dict
    seconds: float
    lr: str
    note: str = ""
    extra: dict = field(default_factory=dict)
    tta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ImageSuiteTask:
    """How to load one image task's data and train it with a recipe."""

    name: str
    options_cls: type
    train: object  # (data, out_dir, options) -> ImageTrainResult
    kind: str  # single_label | multi_label | points
    key_metrics: tuple[str, ...]


def load_data(task: str, shared: Path, work: Path):
    if task in FOLDER_SETS:
        return prepare_image_data(shared / FOLDER_SETS[task])
    if task == "pets":
        return from_csv(shared / HEAD_CENTRES, shared / PETS, label_col="breed")
    if task == "multilabel":
        return from_multilabel_csv(write_multilabel_csv(shared, work / "multilabel.csv"), shared)
    if task == "points":
        return from_regression_csv(shared / HEAD_CENTRES, shared / PETS,
                                   points="center_x,center_y")
    raise ValueError(task)


IMAGE_TASKS = {
    **{name: ImageSuiteTask(name, ImageTrainOptions, train_image_model, "single_label",
                            ("accuracy",)) for name in SINGLE_LABEL},
    "multilabel": ImageSuiteTask("multilabel", MultiLabelOptions, train_multilabel_model,
                                 "multi_label", ("mean_average_precision", "f1_macro",
                                                 "threshold")),
    "points": ImageSuiteTask("points", RegressionOptions, train_regression_model, "points",
                             ("valid_mse", "baseline_mse")),
}


def key_metrics(task: ImageSuiteTask, metrics: dict) -> dict:
    """The task's key metrics of one ``metrics.json`` level, with ``mse/baseline`` for points."""
    picked = {k: metrics[k] for k in task.key_metrics if k in metrics}
    if "valid_mse" in picked and "baseline_mse" in picked:
        picked["mse/baseline"] = picked["valid_mse"] / picked["baseline_mse"]
    return picked


def tta_metrics(task: ImageSuiteTask, metrics: dict) -> dict:
    """The key metrics of ``metrics.json``'s ``tta`` block ({} when the run had no TTA);
    ``baseline_mse`` is the plain one's (the mean predictor has no views)."""
    block = metrics.get("tta") or {}
    if "valid_mse" in block and "baseline_mse" not in block and "baseline_mse" in metrics:
        block = block | {"baseline_mse": metrics["baseline_mse"]}
    return key_metrics(task, block)


def sgdr_overrides(freeze_epochs: int, epochs: int) -> dict:
    """SGDR options whose cycles end both stages: ``cycle_mult=2`` (cycles of 1, 2, 4, ...)
    when ``epochs`` is 1, 3, 7, 15, ..., else one-epoch cycles (``cycle_mult=1``)."""
    try:
        for n in (freeze_epochs, epochs):
            Sgdr(1, 2).cycle_lengths(n)
    except TrainingError:
        return {"schedule": "sgdr", "cycle_len": 1, "cycle_mult": 1}
    return {"schedule": "sgdr", "cycle_len": 1, "cycle_mult": 2}


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``name:key=value,key=value`` → (name, {key: value}); values stay text for pydantic."""
    name, _, body = text.partition(":")
    if not name or not body:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME:key=value,...")
    pairs = {}
    for part in body.split(","):
        key, eq, value = part.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"--variant {text!r}: {part!r} is not key=value")
        pairs[key.strip()] = value.strip()
    return name, pairs


def lr_text(choice: dict) -> str:
    """``frozen 4.2e-03 (valley x1) / unfrozen 2.1e-03`` from history.json's ``lr_choice``."""
    parts = []
    for stage, c in choice.items():
        how = c.get("rule") if c.get("source") == "finder" else c.get("source")
        mult = f" x{c['rule_mult']:g}" if c.get("source") == "finder" and \
            c.get("rule_mult", 1) != 1 else ""
        parts.append(f"{stage} {c['lr']:.2e} ({how}{mult})")
    return " / ".join(parts)


def image_row(task: ImageSuiteTask, data, options, tool: str) -> tuple[Row, dict]:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = task.train(data, out, options)
        seconds = time.perf_counter() - start
        history = json.loads((Path(out) / "history.json").read_text())
    choice = history.get("lr_choice", {})
    schedule = history.get("schedule") or {}
    note = f"best epoch {result.best_epoch}"
    if (history.get("head_init") or {}).get("kind") == "classifier":
        note += "; head from the classifier"
    per_epoch = [r["metrics"].get(task.key_metrics[0]) for r in history.get("history", [])]
    if all(isinstance(v, float) for v in per_epoch):
        note += "; per epoch " + " ".join(f"{v:.4f}" for v in per_epoch)
    if schedule.get("schedule") == "sgdr":
        note += f"; sgdr cycle_len {schedule['cycle_len']}, cycle_mult {schedule['cycle_mult']}"
    return Row(task.name, tool, key_metrics(task, result.metrics), seconds, lr_text(choice),
               note, tta=tta_metrics(task, result.metrics)), choice


def fastai_items(task: ImageSuiteTask, data) -> list[dict]:
    """The very items (paths, labels, split) lensflow trains on, for the fastai peer."""
    items = []
    for split in ("train", "valid"):
        for item in getattr(data, split):
            if task.kind == "single_label":
                label = data.classes[item.label]
            elif task.kind == "multi_label":
                label = [c for c, on in zip(data.classes, item.label, strict=True) if on]
            else:
                label = list(item.label)
            items.append({"path": str(item.path), "label": label, "valid": split == "valid"})
    return items


def run_peer(python: str, spec: dict, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
        proc = subprocess.run([python, str(PEER), str(spec_path), str(out_path),
                               "--threads", str(threads)], env=env, capture_output=True,
                              text=True)
        if proc.returncode != 0 or not out_path.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"error": tail[0][:160]}
        return json.loads(out_path.read_text())


def fastai_available(python: str | None) -> str | None:
    """Why fastai rows are skipped, or None when ``python`` imports fastai 2.8."""
    if not python:
        return "no --fastai-python given"
    try:
        proc = subprocess.run([python, "-c", "import fastai; print(fastai.__version__)"],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{python}: {err}"
    version = proc.stdout.strip()
    if proc.returncode != 0 or not version.startswith("2.8"):
        return f"{python} does not import fastai 2.8 ({version or 'ImportError'})"
    return None


def image_task_rows(name: str, args, shared: Path, work: Path) -> list[Row]:
    task = IMAGE_TASKS[name]
    data = load_data(name, shared, work)
    epochs = {k: v for k, v in (("freeze_epochs", args.freeze_epochs),
                                ("epochs", args.epochs), ("size", args.size)) if v is not None}
    options = task.options_cls(device="cpu", **epochs)
    rows = []
    choice = {}
    if not args.variants_only:
        row, choice = image_row(task, data, options, "lensflow")
        rows.append(row)
        print_row(row)
    frozen = choice.get("frozen") or choice.get("unfrozen")
    if name in args.typed and options.lr == "auto" and frozen:
        typed, _ = image_row(task, data, options.updated(lr=frozen["lr"]), "lensflow typed")
        typed.extra["auto_cost"] = row.seconds / typed.seconds
        rows.append(typed)
        print_row(typed)
    variants = list(args.variant)
    if args.sgdr:
        variants.insert(0, ("sgdr", sgdr_overrides(options.freeze_epochs, options.epochs)))
    for variant, overrides in variants:
        merged = options.model_dump() | epochs | overrides
        variant_row, _ = image_row(task, data, task.options_cls(**merged), f"lensflow {variant}")
        rows.append(variant_row)
        print_row(variant_row)
    if task.kind == "single_label" and name in args.probes:
        probe, seconds, note = linear_probe(data, options)
        rows.append(Row(name, "probe", probe, seconds, "—", note))
        print_row(rows[-1])
    if args.fastai_skip is None and name in args.peers:
        total = options.freeze_epochs + options.epochs
        frozen = min(FASTAI_FREEZE_EPOCHS, total - 1)
        spec = {"task": task.kind, "items": fastai_items(task, data), "size": options.size,
                "bs": options.bs, "freeze_epochs": frozen, "epochs": total - frozen,
                "seed": options.seed}
        start = time.perf_counter()
        result = run_peer(args.fastai_python, spec, args.threads)
        seconds = result.pop("seconds", time.perf_counter() - start)
        lr = result.pop("lr", "")
        note = result.pop("error", "")
        if "baseline_mse" in result:
            result["mse/baseline"] = result["valid_mse"] / result["baseline_mse"]
        rows.append(Row(name, "fastai", result, seconds, str(lr), note))
        print_row(rows[-1])
    return rows


def ratings_rows(args, shared: Path) -> list[Row]:
    path = shared / "ml-100k"
    options = RecommenderOptions(device="cpu")
    rows = []
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = train_recommender(path, out, options)
        seconds = time.perf_counter() - start
    rows.append(Row("ratings", "lensflow", {"valid_mse": result.metrics["valid_mse"]}, seconds,
                    f"{result.lr:.2e} (finder)"))
    print_row(rows[-1])
    if "ratings" in args.typed and options.lr == "auto":
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            typed = train_recommender(path, out, options.updated(lr=result.lr))
            typed_s = time.perf_counter() - start
        rows.append(Row("ratings", "lensflow typed", {"valid_mse": typed.metrics["valid_mse"]},
                        typed_s, f"{result.lr:.2e} (given)",
                        extra={"auto_cost": seconds / typed_s}))
        print_row(rows[-1])
    if args.sgdr:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            sgdr_options = options.updated(**sgdr_overrides(0, options.epochs))
            sgdr = train_recommender(path, out, sgdr_options)
            sgdr_s = time.perf_counter() - start
        rows.append(Row("ratings", "lensflow sgdr", {"valid_mse": sgdr.metrics["valid_mse"]},
                        sgdr_s, f"{sgdr.lr:.2e} (finder)"))
        print_row(rows[-1])
    if args.fastai_skip is None and "ratings" in args.peers:
        spec = {"task": "collab", "path": str(path), "seed": options.seed,
                "valid_pct": options.valid_pct, "epochs": options.epochs,
                "factors": options.factors}
        result = run_peer(args.fastai_python, spec, args.threads)
        seconds = result.pop("seconds", 0.0)
        lr = result.pop("lr", "")
        rows.append(Row("ratings", "fastai", result, seconds, str(lr), result.pop("error", "")))
        print_row(rows[-1])
    return rows


def earlier_fastai_rows(paths: list[Path], tasks: list[str], rows: list[Row]) -> list[Row]:
    """The fastai rows of ``tasks`` in earlier runs' ``--json`` files that this run lacks."""
    have = {r.task for r in rows if r.tool == "fastai"}
    found = []
    for path in paths:
        for row in json.loads(path.read_text()):
            if row["tool"] == "fastai" and row["task"] in tasks and row["task"] not in have:
                row["note"] = (row.get("note") or "") + f"from {path.name}"
                found.append(Row(**row))
                have.add(row["task"])
    return found


def metric_text(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in metrics.items())


def tta_text(row: Row) -> str:
    """The TTA metrics that differ in meaning from the plain ones (not the shared baseline)."""
    return metric_text({k: v for k, v in row.tta.items() if k != "baseline_mse"}) or "—"


def print_row(row: Row) -> None:
    print(f"# {row.task} {row.tool}: {metric_text(row.metrics)}; with TTA {tta_text(row)}; "
          f"in {row.seconds:.1f} s; LR {row.lr} {row.note}", flush=True)


def ratios(rows: list[Row]) -> list[str]:
    """Per task, of its first key metric: SGDR ÷ one-cycle (plain and with TTA) and TTA ÷ plain."""
    lines = []
    for task in dict.fromkeys(r.task for r in rows):
        base = next((r for r in rows if r.task == task and r.tool == "lensflow"), None)
        if base is None or not base.metrics:
            continue
        metric = next(iter(base.metrics))
        parts = []
        sgdr = next((r for r in rows if r.task == task and r.tool == "lensflow sgdr"), None)
        if sgdr and sgdr.metrics.get(metric):
            text = f"sgdr/one-cycle {sgdr.metrics[metric] / base.metrics[metric]:.3f}"
            if base.tta.get(metric) and sgdr.tta.get(metric):
                text += f" (with TTA {sgdr.tta[metric] / base.tta[metric]:.3f})"
            parts.append(text)
        for name, r in (("one-cycle", base), ("sgdr", sgdr)):
            if r and r.tta.get(metric) is not None and r.metrics.get(metric):
                parts.append(f"TTA/plain {name} {r.tta[metric] / r.metrics[metric]:.3f}")
        if parts:
            lines.append(f"{task} {metric}: " + ", ".join(parts))
    return lines


def print_table(rows: list[Row], header: str) -> None:
    print(f"\n{header}\n")
    print("| task | tool | metrics | with TTA | seconds | LR chosen | note |")
    print("| --- | --- | --- | --- | ---: | --- | --- |")
    for r in rows:
        print(f"| {r.task} | {r.tool} | {metric_text(r.metrics)} | {tta_text(r)} | "
              f"{r.seconds:.1f} | {r.lr} | {r.note} |")
    lines = ratios(rows)
    if lines:
        print("\nratios of the first key metric: " + "; ".join(lines))
    costs = [(r.task, r.extra["auto_cost"]) for r in rows if "auto_cost" in r.extra]
    if costs:
        print("\nauto-LR cost (wall time of the `--lr auto` run ÷ the same run with its chosen "
              "LRs typed): " + ", ".join(f"{t} {c:.3f}" for t, c in costs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--freeze-epochs", type=int, default=None,
                        help="override every image task's frozen epochs (both tools)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="override every image task's unfrozen epochs (both tools)")
    parser.add_argument("--size", type=int, default=None,
                        help="override every image task's input side in pixels (both tools)")
    parser.add_argument("--sgdr", action="store_true",
                        help="add a `lensflow sgdr` row per task: the defaults under SGDR")
    parser.add_argument("--variant", type=parse_variant, action="append", default=[],
                        help="extra lensflow row: NAME:option=value,... (repeatable)")
    parser.add_argument("--variants-only", action="store_true",
                        help="image tasks: skip the defaults row (and its typed rerun), run only "
                        "the --variant rows")
    parser.add_argument("--fastai-python", default=None,
                        help="an interpreter that imports fastai 2.8, for the fastai rows")
    parser.add_argument("--typed-tasks", default=",".join(TASKS),
                        help="tasks that also rerun with auto's LRs typed (auto-LR cost); "
                        "'' for none")
    parser.add_argument("--fastai-tasks", default=",".join(TASKS),
                        help="tasks that get a fastai row (with --fastai-python)")
    parser.add_argument("--probe-tasks", default=",".join(SINGLE_LABEL),
                        help="single-label tasks that get a linear-probe row; '' for none")
    parser.add_argument("--fastai-json", type=Path, action="append", default=[],
                        help="take the fastai rows of these tasks from an earlier run's --json "
                        "(fastai's rows do not depend on lensflow's code); repeatable")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.typed = {t.strip() for t in args.typed_tasks.split(",")}
    args.peers = {t.strip() for t in args.fastai_tasks.split(",")}
    args.probes = {t.strip() for t in args.probe_tasks.split(",")}
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    torch.set_num_threads(args.threads)
    shared = shared_data()
    if not (shared / "hymenoptera_data").is_dir():
        sys.exit(f"{shared}: the shared data folder is missing; set LENSFLOW_SHARED_DATA")
    args.fastai_skip = fastai_available(args.fastai_python)
    if args.fastai_skip:
        print(f"# fastai rows skipped: {args.fastai_skip}")
    started = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as work:
        for name in tasks:
            if name == "ratings":
                rows += ratings_rows(args, shared)
            else:
                rows += image_task_rows(name, args, shared, Path(work))
    rows += earlier_fastai_rows(args.fastai_json, tasks, rows)
    print_table(rows, f"quality suite: {', '.join(tasks)}; torch {torch.__version__}, "
                f"{args.threads} threads, {time.perf_counter() - started:.0f} s in all")
    if any(t in SINGLE_LABEL for t in tasks):
        print("\nsingle-label sets: lensflow's defaults, fastai's defaults, the linear probe\n")
        print("\n".join(single_label_summary(rows, [t for t in tasks if t in SINGLE_LABEL])))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=2, default=str))


if __name__ == "__main__":
    main()
