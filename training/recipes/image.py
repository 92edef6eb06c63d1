"""Fine-tune a pretrained image model the fast.ai way, top to bottom.

prepare the data → build the model → cache the body's features → the head's start (a linear
probe, for single-label) → LR finder on the head → [the head on a frozen body] → unfreeze →
discriminative LRs across layer groups → restore the best epoch (the validated start included)
→ write the training output that ``export`` turns into a bundle.

The recipe is the same for the three image tasks; an ``ImageTask`` holds what differs (outputs,
loss, metrics, data pipeline, final evaluation). Single-label lives here; multi-label and
regression in ``training.recipes.multilabel`` and ``training.recipes.regression``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from export.manifest import TTA_VIEWS
from export.options import ExportOptions
from export.pixels import Preprocessing, decode_for_model
from training.data import images as image_data
from training.data.image_loaders import ImageItemsDataset, build_image_loaders
from training.data.images import prepare_image_data  # noqa: F401 (the recipe's first step)
from training.data.transforms import TRAIN_SCALE
from training.errors import TrainingError
from training.evaluation import metrics
from training.evaluation.plots import plot_confusion_matrix
from training.evaluation.tta import tta_predict, with_and_without_tta
from training.fit.early_stopping import EarlyStopping, TimeBudget
from training.fit.fine_tune import StartedHead, fine_tune
from training.fit.head_sweep import train_features, valid_features
from training.fit.learner import Learner
from training.models.backbones import create_model
from training.models.checkpoint import ImageModelSpec, load_image_model, save_image_model
from training.models.head_init import classifier_init, probe_init, random_init
from training.models.heads import head_dropout
from training.recipes.options import ImageTrainOptions
from training.recipes.training_output import (
    LINEAGE_FILE,
    fingerprint_items,
    read_json,
    with_overrides,
    write_json,
    write_lineage,
)

VALID_SAMPLE_FILE = "valid_sample.safetensors"
VALID_SAMPLE_SIZE = 16
#: How to read the model's outputs (thresholds, target meaning): merged into the manifest.
OUTPUTS_FILE = "outputs.json"


@dataclass(frozen=True)
class ImageTrainResult:
    """Where the training output landed and what the restored best epoch scored."""

    out_dir: Path
    metrics: dict
    best_epoch: int
    stopped_early: bool
    seconds: float
    plots: dict

    def to_dict(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "metrics": self.metrics,
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
            "seconds": self.seconds,
            "plots": {k: str(v) for k, v in self.plots.items()},
        }


@dataclass(frozen=True)
class ImageTask:
    """What sets one image task apart; ``train_image_task`` does the rest the same way.

    evaluate: ``(preds, targets, preprocessing, plots_dir) -> (metrics, outputs)`` on the
    validation outputs of the restored best weights (plots_dir None: no plots); ``outputs``
    holds what the manifest needs to read the model's outputs (``thresholds``, ``targets``) and
    lands in ``outputs.json``. It runs twice: on the plain outputs and on those averaged over
    the TTA views (``metrics.json``'s ``tta`` block, ``outputs.json``'s ``tta``), unless the
    task trains without flips.
    dataset_cls, train_scale, flip: how items become tensors and how training augments them.
    points: the outputs are (x, y) points, which a mirrored view mirrors.
    classifier_init: a linear head can start from the pretrained classifier
    (``training.models.head_init``): one softmax over ``classes``, targets class indices.
    """

    name: str
    classes: tuple[str, ...]
    loss_fn: nn.Module
    metrics: dict[str, Callable[[torch.Tensor, torch.Tensor], float]]
    evaluate: Callable[[torch.Tensor, torch.Tensor, Preprocessing, Path | None],
                       tuple[dict, dict]]
    y_range: tuple[float, float] | None = None
    dataset_cls: type[ImageItemsDataset] = ImageItemsDataset
    train_scale: tuple[float, float] = TRAIN_SCALE
    flip: bool = True
    points: bool = False
    classifier_init: bool = False
    #: What chooses the epoch early stopping restores (None: ``valid_loss``, which also says
    #: when to stop); single-label keeps the most accurate epoch, lower loss breaking ties.
    keep: str | None = None


def train_image_model(
    data: image_data.ImageData,
    out_dir: str | Path,
    options: ImageTrainOptions | None = None,
    *,
    progress=None,
    **overrides,
) -> ImageTrainResult:
    """Fine-tune on single-label images; write the training output to ``out_dir``.

    overrides: option fields as keywords (``epochs=1, lr=1e-3``), applied to ``options``.
    """
    options = with_overrides(ImageTrainOptions, options, overrides)
    task = ImageTask(
        "single_label", tuple(data.classes), nn.CrossEntropyLoss(),
        {"accuracy": metrics.accuracy, "error_rate": metrics.error_rate},
        lambda preds, targets, prep, plots_dir: (
            _evaluate(preds, targets, data.classes, plots_dir), {}), classifier_init=True,
        keep="accuracy")
    return train_image_task(task, data, out_dir, options, progress=progress)


def train_image_task(task: ImageTask, data, out_dir: str | Path, options: ImageTrainOptions, *,
                     progress=None) -> ImageTrainResult:
    """Fine-tune ``options.arch`` for ``task`` on ``data`` (an ``ImageData``, ``MultiLabelData``
    or ``RegressionData``): LR finder, frozen head, unfrozen body, best epoch restored; then
    write the training output that ``export_image_model`` reads."""
    budget = None if options.time_budget is None else TimeBudget(options.time_budget * 60)
    out_dir = Path(out_dir)
    plots_dir = out_dir / "plots"
    torch.manual_seed(options.seed)

    dropout = head_dropout(options.head)
    model, prep = create_model(options.arch, len(task.classes), options.weights,
                               input_size=options.size, y_range=task.y_range, dropout=dropout,
                               head=options.head)
    if options.crop_pct is not None:
        prep = prep.with_crop_pct(options.crop_pct)
    learner, train_plain = _image_learner(model, task, data, prep, options, progress)
    head_init, features, start_head = _head_start(task, model, learner, train_plain, options)
    learner.keep_bn_stats = options.bn_stats == "keep" or (
        options.bn_stats == "auto" and start_head is not None)
    plots_dir.mkdir(parents=True, exist_ok=True)  # after the last refusal: no empty output
    stopper = (EarlyStopping(monitor="valid_loss", patience=options.patience, keep=task.keep)
               if options.patience else None)
    result = fine_tune(learner, options.epochs, base_lr=options.lr,
                       freeze_epochs=options.freeze_epochs, early_stopping=stopper,
                       precompute=options.precompute, plots_dir=plots_dir,
                       train_plain=train_plain, schedule=options.sgdr(),
                       auto_rule=options.lr_rule, auto_mult=options.lr_rule_mult,
                       unfrozen_factor=options.unfrozen_lr_factor, head_features=features,
                       start_head=start_head, time_budget=budget)

    final, outputs = _evaluate_with_tta(task, learner, prep, plots_dir)
    spec = ImageModelSpec(arch=options.arch, task=task.name, n_out=len(task.classes),
                          classes=list(task.classes), y_range=task.y_range, dropout=dropout,
                          preprocessing=prep, head=options.head)
    save_image_model(out_dir, learner.model.cpu(), spec)
    _write_valid_sample(out_dir / VALID_SAMPLE_FILE, data, prep)
    write_json(out_dir / "metrics.json", final)
    write_json(out_dir / "history.json", result.to_dict() | {"head_init": head_init})
    write_json(out_dir / OUTPUTS_FILE, outputs)
    write_json(out_dir / "data.json", {"root": str(data.root), "source": data.source,
                                       "summary": data.summary()})
    write_lineage(out_dir, task.name, options, image_data_fingerprint(data),
                  lr_choice={stage: c.to_dict() for stage, c in result.lr_choice.items()},
                  head_init=head_init)
    plots = {p.stem: p for p in sorted(plots_dir.glob("*.png"))}
    seconds = sum(r.seconds for r in result.history)
    return ImageTrainResult(out_dir, final, result.best_epoch, result.stopped_early, seconds,
                            plots)


def _head_start(task: ImageTask, model, learner: Learner, train_plain,
                options: ImageTrainOptions) -> tuple[dict, tuple | None, Callable | None]:
    """Where the head starts: a linear probe on the training features (``probe``, what ``auto``
    picks for a single-label linear head), the pretrained classifier's start (``classifier``),
    or as initialised. What ``history.json`` records of the start, the training features it
    read (the auto LR's head sweep reuses them), and the call that sets the head's weights,
    which ``fine_tune`` makes once the first stage's LR is chosen. The validation features
    (one body pass) choose between the probes and validate the start as epoch 0."""
    wanted = options.head_init
    if wanted == "random":
        return random_init("head_init random"), None, None
    why_not = None
    if not task.classifier_init:
        why_not = f"a {task.name} head does not start from fitted features"
    elif options.head != "linear":
        why_not = f"the {options.head} head does not start from fitted features"
    elif wanted == "classifier" and model.source_classifier is None:
        why_not = (f"weights {options.weights!r} of {options.arch} bring no classifier that "
                   "reads the body's pooled features")
    if why_not is not None:
        if wanted != "auto":
            raise TrainingError(f"head_init {wanted}: {why_not}; use head_init random or auto")
        return random_init(f"head_init auto: {why_not}"), None, None
    features = train_features(learner, train_plain)
    valid = valid_features(learner)
    if wanted == "classifier":
        start = classifier_init(model.source_classifier, *features, task.classes)
    else:
        start = probe_init(model.source_classifier, *features, task.classes, valid=valid)

    def apply() -> StartedHead:
        start.apply(model.head)
        learner.emit(event="head_init", **start.to_dict())
        outputs = None if valid is None else (start.predict(valid[0]), valid[1])
        return StartedHead(start.train_loss, outputs)

    return start.to_dict(), features, apply


def _evaluate_with_tta(task: ImageTask, learner: Learner, prep: Preprocessing,
                       plots_dir: Path) -> tuple[dict, dict]:
    """The task's evaluation of the plain outputs and, when it trains with flips, of the
    outputs averaged over the TTA views: metrics with a ``tta`` block, outputs with ``tta``."""
    preds, targets = learner.predict(learner.valid_loader)
    final, outputs = task.evaluate(preds, targets, prep, plots_dir)
    if not task.flip or len(targets) == 0:
        return final, outputs
    tta_preds, _ = tta_predict(learner, task.name, task.points)
    tta_final, tta_outputs = task.evaluate(tta_preds, targets, prep, None)
    return with_and_without_tta(final, tta_final), outputs | {"tta": tta_outputs}


def image_data_fingerprint(data) -> dict:
    """Fingerprint of every image a run used, with its split and label (a CSV edit counts)."""
    items = [(item.path, (split, item.label)) for split in ("train", "valid", "test")
             for item in getattr(data, split, ())]
    return fingerprint_items(data.root, items)


def _image_learner(model: nn.Module, task: ImageTask, data, prep: Preprocessing,
                   options: ImageTrainOptions, progress) -> tuple[Learner, DataLoader]:
    """The learner, and the un-augmented training loader precompute caches features from."""
    device = options.device
    device_type = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) \
        else "cpu"
    loaders = build_image_loaders(data, prep, bs=options.bs, workers=options.workers,
                                  device_type=device_type, seed=options.seed,
                                  dataset_cls=task.dataset_cls, train_scale=task.train_scale,
                                  flip=task.flip)
    learner = Learner(model, loaders.train, loaders.valid, task.loss_fn, task.metrics,
                      device=device, seed=options.seed, progress=progress)
    return learner, loaders.train_plain


def _evaluate(preds: torch.Tensor, targets: torch.Tensor, classes,
              plots_dir: Path | None) -> dict:
    """Metrics of the restored best weights, by the names the manifest and README use."""
    loss = float(nn.functional.cross_entropy(preds.float(), targets))
    cm = metrics.confusion_matrix(preds, targets, len(classes))
    if plots_dir is not None:
        plot_confusion_matrix(cm, list(classes), plots_dir / "confusion_matrix.png")
    per_class = metrics.per_class_accuracy(preds, targets, len(classes))
    return {
        "valid_loss": loss,
        "accuracy": metrics.accuracy(preds, targets),
        "error_rate": metrics.error_rate(preds, targets),
        "per_class_accuracy": dict(zip(classes, [float(a) for a in per_class], strict=True)),
        "confusion_matrix": cm.tolist(),
        "most_confused": metrics.most_confused(cm, list(classes)),
        "n_valid": int(targets.numel()),
    }


def valid_sample(data, prep: Preprocessing, n: int = VALID_SAMPLE_SIZE) -> torch.Tensor:
    """The first ``n`` validation images as the uint8 NHWC batch the exported graph takes."""
    images = [torch.from_numpy(decode_for_model(item.path, prep).copy()) for item in data.valid[:n]]
    if not images:
        return torch.empty((0, prep.input_size, prep.input_size, 3), dtype=torch.uint8)
    return torch.stack(images).contiguous()


def _write_valid_sample(path: Path, data, prep: Preprocessing) -> None:
    """A few real validation images: export's parity gate runs on them, so the training output
    alone is enough to build a bundle."""
    sample = valid_sample(data, prep)
    if len(sample):
        save_file({"images": sample}, str(path))


def export_image_model(
    train_out: str | Path,
    registry: str | Path,
    name: str,
    *,
    tolerances=None,
    options: ExportOptions | None = None,
):
    """Turn a training output directory into a verified bundle (export + parity gate).

    ``options.tta``: the graph averages the TTA views; the manifest's thresholds are then the
    ones chosen on TTA outputs, and ``tta.views`` names the views.
    """
    from safetensors.torch import load_file

    from export.convert import export_bundle

    train_out = Path(train_out)
    options = options or ExportOptions()
    model, spec = load_image_model(train_out)
    sample_path = train_out / VALID_SAMPLE_FILE
    sample = load_file(str(sample_path))["images"] if sample_path.exists() else None
    outputs = read_json(train_out / OUTPUTS_FILE) or {}
    lineage = read_json(train_out / LINEAGE_FILE)
    if options.tta:
        if not ((lineage or {}).get("options") or {}).get("flip", True):
            raise TrainingError(f"{train_out}: trained with flip=false, so mirrored views are "
                                "not the same task to it; export without --tta")
        outputs = outputs | (outputs.get("tta") or {})
    manifest = {
        "task": spec.task,
        "arch": spec.arch,
        "classes": spec.classes,
        "preprocessing": spec.preprocessing.to_dict(),
        "y_range": list(spec.y_range) if spec.y_range else None,
        # multi_label: one threshold or one per class; regression: what the outputs mean.
        "thresholds": outputs.get("thresholds"),
        "targets": outputs.get("targets"),
        "metrics": read_json(train_out / "metrics.json"),
        "history": read_json(train_out / "history.json"),
        "lineage": lineage,
        "tta": {"views": list(TTA_VIEWS)} if options.tta else None,
        "precision": options.precision,
    }
    plots = train_out / "plots"
    return export_bundle(model.eval(), manifest, registry, name, validation_inputs=sample,
                         tolerances=tolerances,
                         plots_dir=plots if plots.is_dir() else None, aoti=options.aoti)


