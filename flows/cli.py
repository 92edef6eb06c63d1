"""The ``lensflow`` command: train, export, verify, promote, score, demo, serve.

Each command is a thin call into ``training``, ``export`` or ``scoring``; errors a user can cause
print one ``error: ...`` line and exit 2 instead of a traceback.
"""

from __future__ import annotations

import sys
from datetime import date
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from flows.params import IMAGE_LR_WORDS

# Plain help text: our help strings hold brackets such as REG/NAME[/VERSION].
_PLAIN = {"no_args_is_help": True, "rich_markup_mode": None}
app = typer.Typer(add_completion=False, **_PLAIN,
                  help="Fine-tune, export, verify and batch-score vision models and recommenders.")
train_app = typer.Typer(**_PLAIN, help="Fine-tune a model.")
score_app = typer.Typer(**_PLAIN, help="Score a batch to Parquet.")
app.add_typer(train_app, name="train")
app.add_typer(score_app, name="score")
# No markup: summaries and paths may hold brackets, which rich would swallow as tags.
console = Console(stderr=True, markup=False, highlight=False)
out = Console(soft_wrap=True, markup=False, highlight=False)


class Runtime(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def _user_errors() -> tuple[type[BaseException], ...]:
    from export.errors import ExportError
    from scoring.errors import ScoringError
    from training.errors import TrainingError

    return (TrainingError, ExportError, ScoringError)


IMAGE_LR_HELP = ("a number; 'auto' (LR finder, valley, each stage); or valley|steep|minimum|slide: "
                 "that finder rule once, then halved after unfreezing like a number")


def _lr(value: str, words: tuple[str, ...] = ("auto",)) -> float | str:
    if value in words:
        return value
    try:
        return float(value)
    except ValueError:
        from training.errors import TrainingError

        raise TrainingError(
            f"--lr must be {', '.join(map(repr, words))} or a number, got {value!r}") from None


def _print_metrics(title: str, metrics: dict) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, int | float):
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)


def _progress_printer():
    """A per-epoch progress line for the terminal (the library itself never prints)."""
    def show(event: dict) -> None:
        if event.get("event") == "epoch_end":
            parts = [f"{k}={v:.4f}" for k, v in event.get("metrics", {}).items()
                     if isinstance(v, float)]
            console.print(f"{event.get('stage', '')} epoch {event.get('epoch')}: "
                          f"train_loss={event.get('train_loss', float('nan')):.4f} "
                          f"valid_loss={event.get('valid_loss', float('nan')):.4f} "
                          + " ".join(parts) + f" ({event.get('seconds', 0):.1f}s)",
                          highlight=False)
        elif event.get("event") == "lr_found":
            console.print(f"{event.get('stage', '')} LR finder: {event.get('suggestions')}",
                          highlight=False)
    return show


@train_app.command("images")
def train_images(
    data: Annotated[Path, typer.Argument(help="Image folder (train/val[/test] or class folders)"
                                         " or the image root of --csv.")],
    csv: Annotated[Path | None, typer.Option(help="CSV of fname,label[,is_valid].")] = None,
    arch: str = "tf_efficientnet_lite0",
    weights: Annotated[str, typer.Option(help="imagenet | none | packaged | PATH")] = "packaged",
    size: int = 224,
    bs: int = 32,
    freeze_epochs: int = 1,
    epochs: int = 3,
    lr: Annotated[str, typer.Option(help=IMAGE_LR_HELP)] = "auto",
    patience: Annotated[int, typer.Option(help="early-stopping patience; 0 disables")] = 2,
    precompute: Annotated[bool, typer.Option(help="cache frozen-body features")] = False,
    valid_pct: float = 0.2,
    seed: int = 42,
    workers: int | None = None,
    device: Device = Device.auto,
    out_dir: Annotated[Path, typer.Option("--out", help="training output directory")] = Path(
        "runs/train"),
    registry: Annotated[Path | None, typer.Option(help="also export, verify, promote here")] = None,
    name: Annotated[str | None, typer.Option(help="model name in the registry")] = None,
) -> None:
    """Fine-tune a pretrained image classifier (staged unfreezing, one-cycle, early stopping)."""
    lr_value = _lr(lr, IMAGE_LR_WORDS)  # refuse a bad --lr before any work
    from training.recipes.image import prepare_image_data, train_image_model

    prepared = prepare_image_data(data, csv=csv, valid_pct=valid_pct, seed=seed)
    console.print(prepared.summary())
    result = train_image_model(
        prepared, out_dir, arch=arch, weights=weights, size=size, bs=bs,
        freeze_epochs=freeze_epochs, epochs=epochs, lr=lr_value,
        patience=patience or None,
        precompute=precompute, seed=seed, workers=workers, device=device.value,
        progress=_progress_printer())
    _print_metrics(f"best epoch {result.best_epoch}", result.metrics)
    out.print(f"training output: {result.out_dir}")
    if registry is not None:
        _export_verify_promote(result.out_dir, registry, name or result.out_dir.name)


@train_app.command("multilabel")
def train_multilabel(
    csv: Annotated[Path, typer.Argument(help="CSV of fname,labels[,is_valid]")],
    images: Annotated[Path, typer.Option(help="folder the fnames are relative to")],
    label_delim: Annotated[str, typer.Option(help="separator between labels")] = " ",
    threshold_metric: Annotated[str, typer.Option(
        help="accuracy_multi | f1_macro | f1_micro")] = "accuracy_multi",
    per_label_thresholds: Annotated[bool, typer.Option(help="one threshold per label")] = False,
    split_by: Annotated[str | None, typer.Option(help="group column kept on one side")] = None,
    arch: str = "tf_efficientnet_lite0",
    weights: Annotated[str, typer.Option(help="imagenet | none | packaged | PATH")] = "packaged",
    size: int = 224, bs: int = 32, freeze_epochs: int = 1, epochs: int = 3,
    lr: Annotated[str, typer.Option(help=IMAGE_LR_HELP)] = "auto",
    patience: Annotated[int, typer.Option(help="early-stopping patience; 0 disables")] = 2,
    precompute: Annotated[bool, typer.Option(help="cache frozen-body features")] = False,
    valid_pct: float = 0.2, seed: int = 42, workers: int | None = None,
    device: Device = Device.auto,
    out_dir: Annotated[Path, typer.Option("--out", help="training output directory")] = Path(
        "runs/multilabel"),
    registry: Annotated[Path | None, typer.Option(help="also export, verify, promote here")] = None,
    name: Annotated[str | None, typer.Option(help="model name in the registry")] = None,
) -> None:
    """Fine-tune a multi-label image model (sigmoid per label), then tune its threshold."""
    lr_value = _lr(lr, IMAGE_LR_WORDS)
    from training.data.multilabel import from_multilabel_csv
    from training.recipes.multilabel import train_multilabel_model

    prepared = from_multilabel_csv(csv, images, label_delim=label_delim, valid_pct=valid_pct,
                                   seed=seed, split_by=split_by)
    console.print(prepared.summary(), highlight=False)
    result = train_multilabel_model(
        prepared, out_dir, threshold_metric=threshold_metric,
        per_label_thresholds=per_label_thresholds, arch=arch, weights=weights, size=size, bs=bs,
        freeze_epochs=freeze_epochs, epochs=epochs, lr=lr_value,
        patience=patience or None,
        precompute=precompute, seed=seed, workers=workers, device=device.value,
        progress=_progress_printer())
    _finish_training(result, registry, name)


@train_app.command("regression")
def train_regression(
    csv: Annotated[Path, typer.Argument(help="CSV of fname and target or point columns")],
    images: Annotated[Path, typer.Option(help="folder the fnames are relative to")],
    targets: Annotated[str | None, typer.Option(help="float target columns: c1,c2")] = None,
    points: Annotated[str | None, typer.Option(help="pixel point columns: X,Y[,X2,Y2]")] = None,
    split_by: Annotated[str | None, typer.Option(help="group column kept on one side")] = None,
    y_range: Annotated[str, typer.Option(help="'auto', 'none' or LOW,HIGH")] = "auto",
    flip: Annotated[bool, typer.Option(help="horizontal flips in training")] = True,
    arch: str = "tf_efficientnet_lite0",
    weights: Annotated[str, typer.Option(help="imagenet | none | packaged | PATH")] = "packaged",
    size: int = 224, bs: int = 32, freeze_epochs: int = 1, epochs: int = 3,
    lr: Annotated[str, typer.Option(help=IMAGE_LR_HELP)] = "auto",
    patience: Annotated[int, typer.Option(help="early-stopping patience; 0 disables")] = 2,
    precompute: Annotated[bool, typer.Option(help="cache frozen-body features")] = False,
    valid_pct: float = 0.2, seed: int = 42, workers: int | None = None,
    device: Device = Device.auto,
    out_dir: Annotated[Path, typer.Option("--out", help="training output directory")] = Path(
        "runs/regression"),
    registry: Annotated[Path | None, typer.Option(help="also export, verify, promote here")] = None,
    name: Annotated[str | None, typer.Option(help="model name in the registry")] = None,
) -> None:
    """Fine-tune an image regression model (float targets or points, sigmoid_range head, MSE)."""
    lr_value = _lr(lr, IMAGE_LR_WORDS)
    from training.data.regression import from_regression_csv
    from training.recipes.regression import parse_y_range, train_regression_model

    prepared = from_regression_csv(csv, images, targets=targets, points=points,
                                   valid_pct=valid_pct, seed=seed, split_by=split_by)
    console.print(prepared.summary(), highlight=False)
    result = train_regression_model(
        prepared, out_dir, y_range=parse_y_range(y_range), flip=flip, arch=arch,
        weights=weights, size=size, bs=bs, freeze_epochs=freeze_epochs, epochs=epochs,
        lr=lr_value, patience=patience or None, precompute=precompute, seed=seed,
        workers=workers, device=device.value, progress=_progress_printer())
    _finish_training(result, registry, name)


def _finish_training(result, registry: Path | None, name: str | None) -> None:
    _print_metrics(f"best epoch {result.best_epoch}", result.metrics)
    out.print(f"training output: {result.out_dir}")
    if registry is not None:
        _export_verify_promote(result.out_dir, registry, name or result.out_dir.name)


@train_app.command("ratings")
def train_ratings(
    path: Annotated[Path, typer.Argument(help="MovieLens folder (u.data / ratings.csv) or a"
                                         " CSV/Parquet of ratings")],
    factors: int = 50,
    epochs: int = 5,
    wd: float = 0.2,
    lr: Annotated[str, typer.Option(help="'auto' (LR finder) or a number")] = "auto",
    bs: int = 512,
    valid_pct: float = 0.2,
    split: Annotated[str, typer.Option(help="random | time")] = "random",
    use_nn: Annotated[bool, typer.Option(help="embeddings → MLP instead of a dot product")] = False,
    patience: int = 0,
    seed: int = 42,
    user_col: str | None = None,
    item_col: str | None = None,
    rating_col: str | None = None,
    out_dir: Annotated[Path, typer.Option("--out", help="training output directory")] = Path(
        "runs/recommender"),
    registry: Annotated[Path | None, typer.Option(help="export, verify, promote here")] = None,
    name: Annotated[str | None, typer.Option(help="model name in the registry")] = None,
) -> None:
    """Train a collaborative-filtering recommender (dot product + biases + sigmoid range)."""
    from training.recipes.collab import train_recommender

    columns = {k: v for k, v in {"user_col": user_col, "item_col": item_col,
                                 "rating_col": rating_col}.items() if v}
    result = train_recommender(
        path, out_dir, factors=factors, epochs=epochs, wd=wd, lr=_lr(lr), bs=bs,
        valid_pct=valid_pct, split=split, seed=seed, use_nn=use_nn, patience=patience or None,
        registry=registry, name=name, progress=_progress_printer(), **columns)
    _print_metrics("recommender", result.metrics)
    for line in getattr(result, "report_lines", lambda: [])():
        out.print(line)
    out.print(f"training output: {result.out_dir}")
    if getattr(result, "bundle_path", None):
        out.print(f"bundle: {result.bundle_path} (promoted: {result.promoted})")


def _export_training_output(train_out: Path, registry: Path, name: str):
    """Export an image or recommender training output, by the task its model.json names."""
    import json

    from training.errors import TrainingError

    spec = train_out / "model.json"
    if not spec.is_file():
        raise TrainingError(f"{train_out}: no model.json — is this a lensflow training output?")
    if json.loads(spec.read_text()).get("task") == "collab":
        from training.recipes.collab import export_recommender

        return export_recommender(train_out, registry, name)
    from training.recipes.image import export_image_model

    return export_image_model(train_out, registry, name)


def _export_verify_promote(train_out: Path, registry: Path, name: str) -> None:
    from export.bundle import promote as promote_bundle

    result = _export_training_output(train_out, registry, name)
    out.print(result.parity.to_markdown())
    current = promote_bundle(result.bundle_path)
    out.print(f"bundle: {result.bundle_path}\npromoted: {current}")


@app.command("export")
def export_cmd(
    train_out: Annotated[Path, typer.Argument(help="training output directory")],
    registry: Annotated[Path, typer.Option(help="registry root")],
    name: Annotated[str, typer.Option(help="model name")],
) -> None:
    """Export a training output to a bundle (TorchScript, ONNX, torch.export) and run parity."""
    result = _export_training_output(train_out, registry, name)
    out.print(result.parity.to_markdown())
    out.print(f"bundle: {result.bundle_path}")


@app.command("verify")
def verify_cmd(
    bundle: Annotated[str, typer.Argument(help="bundle dir or REG/NAME[/VERSION]")],
) -> None:
    """Check every file hash and re-run the parity gate from the bundle alone."""
    from export.bundle import load_bundle, resolve_bundle
    from export.parity import check_bundle

    path = resolve_bundle(bundle)
    loaded = load_bundle(path)
    report = check_bundle(path)
    out.print(report.to_markdown())
    out.print(f"{loaded.name} {loaded.version}: hashes ok, parity "
              f"{'passed' if report.passed else 'FAILED'}")
    if not report.passed:
        raise typer.Exit(1)


@app.command("promote")
def promote_cmd(
    bundle: Annotated[str, typer.Argument(help="bundle dir or REG/NAME/VERSION")],
) -> None:
    """Point REG/NAME/current at this bundle (only when its parity passed)."""
    from export.bundle import promote, resolve_bundle

    out.print(f"promoted: {promote(resolve_bundle(bundle))}")


@score_app.command("images")
def score_images(
    folder: Path,
    model: Annotated[str, typer.Option(help="REG/NAME[/VERSION] or a bundle dir")],
    out_root: Annotated[Path, typer.Option("--out", help="output root for Parquet tables")],
    run_date: Annotated[str | None, typer.Option(help="YYYY-MM-DD (default: today, UTC)")] = None,
    batch_size: int = 64,
    workers: int | None = None,
    runtime: Runtime = Runtime.onnx,
    device: Device = Device.auto,
    top_k: int = 5,
    incremental: bool = False,
    dask_address: Annotated[str | None, typer.Option(
        envvar="LENSFLOW_DASK_ADDRESS",
        help="run the shards on this Dask scheduler, tcp://HOST:PORT (as a Prefect flow run)",
    )] = None,
    shards: Annotated[int | None, typer.Option(
        min=1, help="pieces to split the run into (default 1 here, 16 on a Dask cluster)")] = None,
) -> None:
    """Score every image under FOLDER into <out>/image_predictions/run_date=.../."""
    from scoring.image_scoring import ScoreSummary, score_image_folder

    if dask_address or shards:
        _allow_slow_ephemeral_server()
        from flows.score_flows import score_image_folder_flow

        result = _run_flow(score_image_folder_flow, str(folder), model, str(out_root),
                           run_date=_date(run_date), batch_size=batch_size, workers=workers,
                           runtime=runtime.value, device=device.value, top_k=top_k,
                           incremental=incremental, shards=shards, dask_address=dask_address)
        out.print(ScoreSummary(**result).summary_line())
        return
    summary = score_image_folder(
        folder, model, out_root, run_date=_date(run_date), batch_size=batch_size, workers=workers,
        runtime=runtime.value, device=device.value, top_k=top_k, incremental=incremental,
        progress=_score_progress())
    out.print(summary.summary_line())


@score_app.command("recommendations")
def score_recommendations_cmd(
    model: Annotated[str, typer.Option(help="REG/NAME[/VERSION] or a bundle dir")],
    out_root: Annotated[Path, typer.Option("--out", help="output root for Parquet tables")],
    top_k: int = 10,
    full_table: Annotated[bool, typer.Option(help="also write every user × item score")] = False,
    users: Annotated[Path | None, typer.Option(help="file of raw user ids, one per line")] = None,
    strict: Annotated[bool, typer.Option(help="unknown user ids are an error")] = False,
    run_date: Annotated[str | None, typer.Option(help="YYYY-MM-DD (default: today, UTC)")] = None,
    runtime: Runtime = Runtime.onnx,
    device: Device = Device.auto,
    dask_address: Annotated[str | None, typer.Option(
        envvar="LENSFLOW_DASK_ADDRESS",
        help="run the shards on this Dask scheduler, tcp://HOST:PORT (as a Prefect flow run)",
    )] = None,
    shards: Annotated[int | None, typer.Option(
        min=1, help="pieces to split the run into (default 1 here, 16 on a Dask cluster)")] = None,
) -> None:
    """Top-k per user (seen items excluded) and optionally the full user × item table."""
    from scoring.recommendations import RecScoreSummary, score_recommendations

    if dask_address or shards:
        _allow_slow_ephemeral_server()
        from flows.score_flows import score_recommendations_flow

        result = _run_flow(score_recommendations_flow, model, str(out_root), top_k=top_k,
                           full_table=full_table, users=str(users) if users else None,
                           strict=strict, run_date=_date(run_date), runtime=runtime.value,
                           device=device.value, shards=shards, dask_address=dask_address)
        out.print(RecScoreSummary(**result).summary_line())
        return
    summary = score_recommendations(
        model, out_root, top_k=top_k, full_table=full_table, users=users, strict=strict,
        run_date=_date(run_date), runtime=runtime.value, device=device.value)
    out.print(summary.summary_line())


def _allow_slow_ephemeral_server() -> None:
    """Without PREFECT_API_URL the flow starts a temporary server; Prefect's 20 s start-up
    limit is too short on a busy 2-core machine. Must run before Prefect is imported."""
    import os

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def _run_flow(flow, *args, **kwargs) -> dict:
    """Run a scoring flow (sharded, maybe on Dask); a failed run is one error line."""
    from scoring.errors import ScoringError

    state = flow(*args, **kwargs, return_state=True)
    if not state.is_completed():
        raise ScoringError(state.message or f"{flow.name} ended {state.name}")
    return state.result()


def _date(value: str | None) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"--run-date must be YYYY-MM-DD, got {value!r}") from None


def _score_progress():
    from rich.progress import Progress

    state: dict = {}

    def show(event: dict) -> None:
        if event.get("event") == "start":
            state["bar"] = Progress(console=console, transient=True)
            state["bar"].start()
            state["task"] = state["bar"].add_task("scoring", total=event.get("total"))
        elif event.get("event") == "advance" and "bar" in state:
            state["bar"].advance(state["task"], event.get("n", 1))
        elif event.get("event") == "end" and "bar" in state:
            state["bar"].stop()
    return show


@app.command("demo")
def demo_cmd(
    workdir: Annotated[Path, typer.Option(help="where the demo writes")] = Path("runs/demo"),
    offline: Annotated[bool, typer.Option(help="never download; use generated data")] = False,
) -> None:
    """Run the whole chain on the default data and say where every output landed."""
    from flows.demo import run_demo

    run_demo(workdir, say=out.print, offline=offline or None)


@app.command("serve")
def serve_cmd() -> None:
    """Serve every deployment with its schedule from this process (no work pool needed)."""
    from flows.serve import serve_all

    serve_all()


def main() -> None:
    """Console-script entry: user errors print one line, never a traceback."""
    try:
        app()
    except _user_errors() as exc:
        # Plain print: one line however long, never wrapped to the terminal's width.
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
