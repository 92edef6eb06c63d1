"""The ``lensflow`` command: train, export, verify, promote, score, demo, serve.

Each command is a thin call into ``training``, ``export`` or ``scoring``; errors a user can cause
print one ``error: ...`` line and exit 2 instead of a traceback.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from flows.cli_output import PLAIN as _PLAIN
from flows.cli_output import console, out
from flows.cli_output import print_metrics as _print_metrics
from flows.cli_score import score_app
from flows.params import IMAGE_LR_WORDS

app = typer.Typer(add_completion=False, **_PLAIN,
                  help="Fine-tune, export, verify and batch-score vision models and recommenders.")
train_app = typer.Typer(**_PLAIN, help="Fine-tune a model.")
app.add_typer(train_app, name="train")
app.add_typer(score_app, name="score")


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


def _export_verify_promote(train_out: Path, registry: Path, name: str) -> None:
    from training.recipes.publish import publish

    result, current = publish(train_out, registry, name)
    out.print(result.parity.to_markdown())
    out.print(f"bundle: {result.bundle_path}\npromoted: {current}")


@app.command("export")
def export_cmd(
    train_out: Annotated[Path, typer.Argument(help="training output directory")],
    registry: Annotated[Path, typer.Option(help="registry root")],
    name: Annotated[str, typer.Option(help="model name")],
) -> None:
    """Export a training output to a bundle (TorchScript, ONNX, torch.export) and run parity."""
    from training.recipes.publish import export_training_output

    result = export_training_output(train_out, registry, name)
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
