"""The ``lensflow`` command: train, export, import-model, verify, promote, keygen, score, demo,
serve.

Each command is a thin call into ``training``, ``export`` or ``scoring``; errors a user can cause
print one ``error: ...`` line and exit 2 instead of a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from export.options import ExportOptions
from flows.cli_keys import keys_app
from flows.cli_output import PLAIN as _PLAIN
from flows.cli_output import TrainingProgress, console, out
from flows.cli_output import print_metrics as _print_metrics
from flows.cli_report import report_cmd
from flows.cli_score import score_app
from flows.cli_table import table_app
from flows.option_surfaces import OptionsError, declared_options
from training.recipes.options import (
    ImageTrainOptions,
    MultiLabelOptions,
    RecommenderOptions,
    RegressionOptions,
)

app = typer.Typer(add_completion=False, **_PLAIN,
                  help="Fine-tune, export, verify and batch-score vision models and recommenders.")
train_app = typer.Typer(**_PLAIN, help="Fine-tune a model.")
app.add_typer(train_app, name="train")
app.add_typer(score_app, name="score")
app.add_typer(keys_app, name="keys")
app.add_typer(table_app, name="table")


def _user_errors() -> tuple[type[BaseException], ...]:
    from export.errors import ExportError
    from scoring.errors import ScoringError
    from training.errors import TrainingError

    return (TrainingError, ExportError, ScoringError, OptionsError)


# Where a run reads and writes is not an option of the recipe: these stay with each command.
Images = Annotated[Path, typer.Option(help="folder the fnames are relative to")]
Registry = Annotated[str | None, typer.Option(
    help="also export, verify, promote here (a path or a URL such as s3://bucket/registry)")]
Name = Annotated[str | None, typer.Option(help="model name in the registry")]


OutDir = Annotated[Path, typer.Option("--out", help="training output directory")]


@train_app.command("images")
@declared_options(cli=True, options=ImageTrainOptions, export=ExportOptions)
def train_images(
    data: Annotated[Path, typer.Argument(help="Image folder (train/val[/test] or class folders)"
                                         " or the image root of --csv.")],
    csv: Annotated[Path | None, typer.Option(help="CSV of fname,label[,is_valid].")] = None,
    out_dir: OutDir = Path("runs/train"),
    registry: Registry = None,
    name: Name = None,
    *,
    options: ImageTrainOptions,
    export: ExportOptions,
) -> None:
    """Fine-tune a pretrained image classifier (staged unfreezing, one-cycle, early stopping)."""
    from training.data.images import prepare_image_data

    # Data first, torch after: a wrong path or a bad CSV row is told before seconds of imports.
    prepared = prepare_image_data(data, csv=csv, valid_pct=options.valid_pct, seed=options.seed)
    from training.recipes.image import train_image_model

    _train_and_publish(train_image_model, prepared, out_dir, options, registry, name,
                       export)


@train_app.command("multilabel")
@declared_options(cli=True, options=MultiLabelOptions, export=ExportOptions)
def train_multilabel(
    csv: Annotated[Path, typer.Argument(help="CSV of fname,labels[,is_valid]")],
    images: Images,
    out_dir: OutDir = Path("runs/multilabel"),
    registry: Registry = None,
    name: Name = None,
    *,
    options: MultiLabelOptions,
    export: ExportOptions,
) -> None:
    """Fine-tune a multi-label image model (sigmoid per label), then tune its threshold."""
    from training.data.multilabel import from_multilabel_csv

    prepared = from_multilabel_csv(csv, images, label_delim=options.label_delim,
                                   valid_pct=options.valid_pct, seed=options.seed,
                                   split_by=options.split_by)
    from training.recipes.multilabel import train_multilabel_model

    _train_and_publish(train_multilabel_model, prepared, out_dir, options, registry, name,
                       export)


@train_app.command("regression")
@declared_options(cli=True, options=RegressionOptions, export=ExportOptions)
def train_regression(
    csv: Annotated[Path, typer.Argument(help="CSV of fname and target or point columns")],
    images: Images,
    out_dir: OutDir = Path("runs/regression"),
    registry: Registry = None,
    name: Name = None,
    *,
    options: RegressionOptions,
    export: ExportOptions,
) -> None:
    """Fine-tune an image regression model (float targets or points, sigmoid_range head, MSE)."""
    from training.data.regression import from_regression_csv
    from training.recipes.regression import train_regression_model

    prepared = from_regression_csv(csv, images, targets=options.targets, points=options.points,
                                   valid_pct=options.valid_pct, seed=options.seed,
                                   split_by=options.split_by)
    _train_and_publish(train_regression_model, prepared, out_dir, options, registry, name,
                       export)


def _train_and_publish(recipe, prepared, out_dir: Path, options, registry: str | None,
                       name: str | None, export: ExportOptions) -> None:
    """Fine-tune with ``recipe``, print the metrics, then export, verify, promote if asked."""
    console.print(prepared.summary(), highlight=False)
    with TrainingProgress() as progress:
        result = recipe(prepared, out_dir, options, progress=progress)
    _print_metrics(f"best epoch {result.best_epoch}", result.metrics)
    out.print(f"training output: {result.out_dir}")
    if registry is not None:
        _export_verify_promote(result.out_dir, registry, name or result.out_dir.name, export)


@train_app.command("ratings")
@declared_options(cli=True, options=RecommenderOptions)
def train_ratings(
    path: Annotated[str, typer.Argument(help="MovieLens folder (u.data / ratings.csv) or a"
                                        " CSV/Parquet of ratings; a path or a URL (s3://...)")],
    out_dir: OutDir = Path("runs/recommender"),
    registry: Registry = None,
    name: Name = None,
    *,
    options: RecommenderOptions,
) -> None:
    """Train a collaborative-filtering recommender (dot product + biases + sigmoid range)."""
    from training.recipes.collab import train_recommender

    with TrainingProgress() as progress:
        result = train_recommender(path, out_dir, options, progress=progress)
    _print_metrics("recommender", result.metrics)
    for line in result.report_lines():
        out.print(line)
    out.print(f"training output: {result.out_dir}")
    if registry is not None:
        _export_verify_promote(result.out_dir, registry, name or result.out_dir.name)


def _export_verify_promote(train_out: Path, registry: str, name: str,
                           export: ExportOptions | None = None) -> None:
    from training.recipes.publish import publish

    result, current = publish(train_out, registry, name, export)
    out.print(result.parity.to_markdown())
    out.print(f"bundle: {result.bundle_path}\npromoted: {current}")


@app.command("export")
@declared_options(cli=True, export=ExportOptions)
def export_cmd(
    train_out: Annotated[Path, typer.Argument(help="training output directory")],
    registry: Annotated[str, typer.Option(help="registry root: a path or a URL such as "
                                               "s3://bucket/registry")],
    name: Annotated[str, typer.Option(help="model name")],
    sign_key: Annotated[Path | None, typer.Option(
        help="EC private key PEM (lensflow keygen) that signs the bundle in the model-signing "
             "format (default $LENSFLOW_SIGNING_KEY)")]
    = None,
    *,
    export: ExportOptions,
) -> None:
    """Export a training output to a bundle (TorchScript, ONNX, torch.export) and run parity."""
    from export.signing import SIGNING_KEY_ENV, load_signing_key
    from training.recipes.publish import export_training_output

    _check_registry(registry)
    if sign_key is not None:
        load_signing_key(sign_key)  # a bad key fails before the export starts
        # The publish step reads the key from the environment; this process ends after export.
        os.environ[SIGNING_KEY_ENV] = str(sign_key)
    result = export_training_output(train_out, registry, name, options=export)
    out.print(result.parity.to_markdown())
    out.print(f"bundle: {result.bundle_path}\nsha256: {result.sha256}")


def _check_registry(registry: str) -> None:
    """A local registry that is a file fails before any export work starts."""
    from export.errors import ExportError
    from export.storage import is_url

    if not is_url(registry) and Path(registry).exists() and not Path(registry).is_dir():
        raise ExportError(f"registry {registry}: exists and is not a directory")


@app.command("verify")
def verify_cmd(
    bundle: Annotated[str, typer.Argument(help="bundle dir or REG/NAME[/VERSION]")],
    torchscript: Annotated[bool, typer.Option(
        help="also load and check model.ts (TorchScript is code: only for bundles you trust)")]
    = False,
) -> None:
    """Check the bundle's digest, signature and every file hash, then re-run the parity gate
    on ONNX Runtime (and TorchScript with --torchscript) from the bundle alone."""
    from export.bundle import load_bundle, resolve_bundle

    loaded = load_bundle(resolve_bundle(bundle))  # every check: digest, signature, files
    from export.parity import check_bundle  # torch: after the checks

    report = check_bundle(loaded, torchscript=torchscript)
    out.print(report.to_markdown())
    out.print(f"{loaded.name} {loaded.version}: hashes ok, parity "
              f"{'passed' if report.passed else 'FAILED'} "
              f"({'onnx, torchscript' if torchscript else 'onnx'}); sha256 {loaded.sha256}; "
              f"signature {loaded.signature}")
    if not report.passed:
        raise typer.Exit(1)


@app.command("promote")
def promote_cmd(
    bundle: Annotated[str, typer.Argument(help="bundle dir or REG/NAME/VERSION")],
    sign_key: Annotated[Path | None, typer.Option(
        help="EC private key PEM that signs the promotion (default $LENSFLOW_SIGNING_KEY)")]
    = None,
    rollback: Annotated[bool, typer.Option(
        help="the bundle is older than the current version: roll back to it (a signed "
             "promotion with a higher counter, which scorers accept)")] = False,
) -> None:
    """Point REG/NAME/current at this bundle, pinning its digest (only when parity passed);
    with a signing key the promotion is signed, with a counter scorers never see go back."""
    from export.bundle import promote, resolve_bundle
    from export.signing import load_signing_key

    key = load_signing_key(sign_key) if sign_key is not None else None
    out.print(f"promoted: {promote(resolve_bundle(bundle), signing_key=key, rollback=rollback)}")


@app.command("keygen")
def keygen_cmd(
    out_dir: Annotated[Path, typer.Argument(help="folder for the two PEM files")],
) -> None:
    """Make an EC P-256 key pair for signing bundles and promotions, model-signing's key format
    (private key readable by you only)."""
    from export.signing import SIGNING_KEY_ENV, VERIFY_KEY_ENV, write_key_pair

    private, public = write_key_pair(out_dir)
    out.print(f"signing key (keep secret): {private}\nverify key: {public}\n"
              f"export with {SIGNING_KEY_ENV}={private}; score with {VERIFY_KEY_ENV}={public}")


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


# ---- lensflow import-model: a checkpoint trained elsewhere (docs/bring_your_own_model.md) ----

from training.recipes.import_options import ImportOptions  # noqa: E402


@app.command("import-model")
@declared_options(cli=True, options=ImportOptions)
def import_model_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="state dict: .safetensors or a torch.save "
                                               "file of model.state_dict()")],
    registry: Annotated[str, typer.Option(help="registry root: a path or a URL such as "
                                               "s3://bucket/registry")],
    name: Annotated[str, typer.Option(help="model name in the registry")],
    classes: Annotated[Path | None, typer.Option(
        help="text file, one output name per line (default: 0..N-1)")] = None,
    sample_images: Annotated[Path | None, typer.Option(
        help="folder of your own images the parity gate checks (recommended)")] = None,
    *,
    options: ImportOptions,
) -> None:
    """Export a torchvision/timm state dict trained elsewhere to a bundle, check parity,
    promote."""
    from export.bundle import promote
    from training.recipes.import_model import import_checkpoint

    _check_registry(registry)
    result = import_checkpoint(checkpoint, registry, name, options, classes=classes,
                               sample_images=sample_images,
                               warn=lambda note: console.print(f"warning: {note}",
                                                               soft_wrap=True))
    out.print(result.export.parity.to_markdown())
    out.print(f"bundle: {result.export.bundle_path}\nsha256: {result.export.sha256}")
    if options.promote:
        out.print(f"promoted: {promote(result.export.bundle_path)}")


# Registered after the commands above, so `lensflow --help` lists it beside them.
app.command("report")(report_cmd)


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
