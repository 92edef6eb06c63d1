"""The options of every training recipe, each declared once: name, type, default, help, checks.

The recipe reads them from one object; ``flows`` derives the ``lensflow train ...`` commands and
the Prefect flow parameters (UI form, ``--param`` validation) from these same models, so a new
option is one line here. Where a run puts its data and output (paths, registry, model name) is
not an option of the recipe and stays with each surface.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, model_validator

from export.declared_options import Device, NonNegativeInt, Options, PositiveInt
from training.choices import FINDER_RULES, HEAD_INITS, SCHEDULES
from training.errors import TrainingError

if TYPE_CHECKING:
    from training.fit.schedule import Sgdr

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
ValidFraction = Annotated[float, Field(gt=0, lt=1)]
#: Words an image LR takes besides a number: "auto" (each stage's finder) or one finder rule.
IMAGE_LR_WORDS = ("auto", *FINDER_RULES)
ImageLearningRate = Literal[IMAGE_LR_WORDS] | PositiveFloat  # type: ignore[valid-type]
FinderRule = Literal[FINDER_RULES]  # type: ignore[valid-type]
LearningRate = Literal["auto"] | PositiveFloat


class ScheduleOptions(Options):
    """The LR schedule of every fit: one-cycle, or SGDR's cosine annealing with warm restarts;
    and the wall time a run may take.

    Under SGDR each stage (``freeze_epochs``, ``epochs``) must end a cycle; ``cycles``, when
    given, is checked against ``epochs`` so a fastai-style ``--cycles 3 --cycle-mult 2`` says
    it means 7 epochs instead of silently training another number.
    """

    schedule: Literal[SCHEDULES] = Field(  # type: ignore[valid-type]
        "one_cycle", description="one_cycle | sgdr (cosine annealing with warm restarts)")
    cycles: PositiveInt | None = Field(None, description="sgdr: cycles of the (unfrozen) "
                                       "training; default: as many as its epochs hold")
    cycle_len: PositiveInt = Field(1, description="sgdr: epochs of the first cycle")
    cycle_mult: PositiveInt = Field(1, description="sgdr: each next cycle this many times "
                                    "longer")
    time_budget: PositiveFloat | None = Field(
        None, description="minutes the run may train, from reading the data on (LR finder and "
        "head start included): training stops after the epoch past which another would not "
        "fit, and the best epoch is restored; default: no limit")

    @model_validator(mode="after")
    def _stages_end_cycles(self):
        if self.schedule != "sgdr":
            return self
        sgdr = self.sgdr()
        epochs = getattr(self, "epochs", 0)
        try:
            for n in (getattr(self, "freeze_epochs", 0), epochs):
                if n:
                    sgdr.cycle_lengths(n)
        except TrainingError as err:
            raise ValueError(f"schedule=sgdr: {err}") from None
        from training.fit.schedule import sgdr_epochs

        wanted = sgdr_epochs(self.cycles or 0, self.cycle_len, self.cycle_mult)
        if self.cycles is not None and wanted != epochs:
            raise ValueError(
                f"schedule=sgdr: cycles={self.cycles} with cycle_len={self.cycle_len}, "
                f"cycle_mult={self.cycle_mult} is {wanted} epochs, but epochs={epochs}: set "
                f"epochs to {wanted}")
        return self

    def sgdr(self) -> Sgdr | None:
        """The SGDR schedule, or None under one-cycle."""
        if self.schedule != "sgdr":
            return None
        from training.fit.schedule import Sgdr  # torch: imported when a run asks for SGDR

        return Sgdr(self.cycle_len, self.cycle_mult)


class ImageTrainOptions(ScheduleOptions):
    """Fine-tuning a pretrained image model: single-label, and the base of the other tasks."""

    arch: str = Field("tf_efficientnet_lite0", description="backbone: a timm or torchvision "
                      "model name (prefix timm/ or torchvision/ to force one)")
    weights: str = Field("packaged", description="imagenet | none | packaged | PATH of a state "
                         "dict")
    head: Literal["linear", "fastai"] = Field(
        "linear", description="classifier head: linear (pool, dropout, linear) | fastai (concat "
        "pool, BN, dropout, linear, ReLU, BN, dropout, linear)")
    head_init: Literal[HEAD_INITS] = Field(  # type: ignore[valid-type]
        "auto", description="where a linear head starts: probe (logistic regression on the "
        "frozen features, toward the pretrained classifier or zero, whichever is the more "
        "accurate on the validation images) | classifier (from the pretrained classifier's "
        "classes its training images resemble) | random | auto (probe where the task is "
        "single-label, else random)")
    size: PositiveInt = Field(224, description="side of the square input in pixels")
    crop_pct: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, description="validation and scoring: resize the shorter side to size / crop_pct, "
        "then centre-crop size (1.0: the whole shorter side); default: the architecture's "
        "(timm's crop_pct, 0.875 for most)")
    bn_stats: Literal["auto", "keep", "update"] = Field(
        "auto", description="BatchNorm while fine-tuning: keep (normalise with the pretrained "
        "running statistics) | update (each batch's, fastai's) | auto (keep when the head "
        "starts from fitted features, else update)")
    bs: PositiveInt = Field(32, description="batch size")
    freeze_epochs: NonNegativeInt = Field(0, description="epochs of the head on a frozen body "
                                          "(after its start: --head-init)")
    epochs: NonNegativeInt = Field(4, description="epochs after unfreezing, discriminative LRs")
    lr: ImageLearningRate = Field("auto", description="a number; auto (the head sweep's "
                                  "--lr-rule x --lr-rule-mult); or valley|steep|minimum|slide: "
                                  "that finder rule once; after unfreezing x "
                                  "--unfrozen-lr-factor")
    lr_rule: FinderRule = Field("valley", description="the finder rule --lr auto applies to "
                                "the head sweep")
    lr_rule_mult: PositiveFloat = Field(1.0, description="--lr auto: the rule's suggestion x "
                                        "this")
    unfrozen_lr_factor: PositiveFloat = Field(0.5, description="top LR after unfreezing as a "
                                              "multiple of the frozen stage's")
    patience: NonNegativeInt = Field(2, description="early-stopping patience in epochs; 0 "
                                     "disables")
    precompute: bool = Field(False, description="cache frozen-body features for frozen epochs")
    valid_pct: ValidFraction = Field(0.2, description="share held out for validation when the "
                                     "data has no split of its own")
    seed: int = Field(42, description="seed of the split, the head's init and the shuffling")
    workers: NonNegativeInt | None = Field(None, description="image-decoding worker processes "
                                           "(default: by data size)")
    device: Device = Field("auto", description="auto | cpu | cuda")


def task_default(name: str, value):
    """``ImageTrainOptions.<name>`` with another default for one task: the option's help stays
    declared once, in ``ImageTrainOptions``."""
    return Field(value, description=ImageTrainOptions.model_fields[name].description)


class MultiLabelOptions(ImageTrainOptions):
    """Multi-label images: a sigmoid per label and a decision threshold tuned on validation."""

    label_delim: str = Field(" ", description="separator between the labels of one image")
    split_by: str | None = Field(None, description="CSV column whose groups stay on one side "
                                 "of the split")
    threshold_metric: Literal["accuracy_multi", "f1_macro", "f1_micro"] = Field(
        "accuracy_multi", description="metric the threshold is chosen for")
    per_label_thresholds: bool = Field(False, description="one threshold per label")
    # Multi-label's own default (docs/training.md#defaults-per-task), measured at 1 + 1 epochs
    # on the quality suite's ants/bees + pets set: the head sweep's valley is too cold there, and
    # x 3 lifted mAP from 0.9419 to 0.9866 (seed 42; 0.9836 at seed 1), past fastai's defaults
    # (0.9708). The fastai head at x 3 ended level (0.9877, 0.9838), so the head stays linear.
    lr_rule_mult: PositiveFloat = task_default("lr_rule_mult", 3.0)
    # Its head starts at random (no fitted start for sigmoids yet), so it keeps the frozen epoch
    # that trains it first, and the 1 + 3 epochs its figures were measured with.
    freeze_epochs: NonNegativeInt = task_default("freeze_epochs", 1)
    epochs: NonNegativeInt = task_default("epochs", 3)


class RegressionOptions(ImageTrainOptions):
    """Image regression: float targets or pixel points, MSE, a sigmoid_range head."""

    targets: str | None = Field(None, description="float target columns: c1,c2")
    points: str | None = Field(None, description="pixel point columns: X,Y[,X2,Y2]")
    split_by: str | None = Field(None, description="CSV column whose groups stay on one side "
                                 "of the split")
    y_range: str = Field("auto", pattern=r"^\s*(auto|none|[-+0-9.eE]+\s*,\s*[-+0-9.eE]+)\s*$",
                         description="auto | none | LOW,HIGH")
    flip: bool = Field(True, description="horizontal flips in training")
    # Regression's own defaults (docs/training.md#defaults-per-task): a sigmoid-range head on
    # MSE learns slowly, so the head sweep's valley (~1e-3 on the pet head centres) trains too
    # cold and 3 epochs do not beat the mean; `minimum` x 8 found 1.0e-2 there (0.38x baseline;
    # x 1 stayed at the mean, valley x 10 reached 0.67x), kept (not halved) after unfreezing for
    # a longer stage that ends annealed (no early stop mid-cycle); 128 px keeps it affordable.
    size: PositiveInt = task_default("size", 128)
    freeze_epochs: NonNegativeInt = task_default("freeze_epochs", 1)
    epochs: NonNegativeInt = task_default("epochs", 12)
    lr_rule: FinderRule = task_default("lr_rule", "minimum")
    lr_rule_mult: PositiveFloat = task_default("lr_rule_mult", 8.0)
    unfrozen_lr_factor: PositiveFloat = task_default("unfrozen_lr_factor", 1.0)
    patience: NonNegativeInt = task_default("patience", 0)


class RecommenderOptions(ScheduleOptions):
    """Collaborative filtering: dot product + biases + sigmoid range (or an embedding MLP)."""

    factors: PositiveInt = Field(50, description="latent factors per user and item")
    epochs: PositiveInt = Field(5, description="one-cycle epochs")
    wd: NonNegativeFloat = Field(0.2, description="weight decay (AdamW, decoupled)")
    lr: LearningRate = Field("auto", description="auto (LR finder) or a number")
    bs: PositiveInt = Field(512, description="batch size")
    valid_pct: ValidFraction = Field(0.2, description="share of ratings held out")
    split: Literal["random", "time"] = Field("random", description="random | time (the "
                                             "latest ratings are validation)")
    use_nn: bool = Field(False, description="embeddings → MLP instead of a dot product")
    patience: NonNegativeInt = Field(0, description="early-stopping patience; 0 keeps the "
                                     "last epoch")
    seed: int = Field(42, description="seed of the split and the embeddings")
    y_range: str = Field("auto", pattern=r"^\s*(auto|[-+0-9.eE]+\s*,\s*[-+0-9.eE]+)\s*$",
                         description="auto (from 0, or the lowest rating, to the highest + 10 %) "
                         "| LOW,HIGH")
    user_col: str | None = Field(None, description="user id column of a CSV/Parquet")
    item_col: str | None = Field(None, description="item id column of a CSV/Parquet")
    rating_col: str | None = Field(None, description="rating column of a CSV/Parquet")
    device: Device = Field("auto", description="auto | cpu | cuda")
