"""A new classifier head that starts from what the pretrained classifier already knows.

The pretrained model's classifier scores K source classes (ImageNet's 1000) from the same pooled
features the new linear head reads. For each new class c, the mean of the source softmax over
c's training images, ``m_c``, says which source classes its images look like (Co-Tuning's
``p(source | target)``: You et al., "Co-Tuning for Transfer Learning", NeurIPS 2020). The head
starts at ``W_c = t · m_c W_src`` and ``b_c = t · m_c b_src``: class c's logit is the
``m_c``-weighted mean of the source logits. One temperature ``t`` for all classes is fitted to
the cross-entropy on the training features (a 1-D search), so the start's training loss is at
most the uniform head's. A map that says little (source classes unrelated to the task) gives
every class nearly the same logit: the head starts near uniform, not confidently wrong.

Measured on ants/bees (docs/benchmarks.md, "The head starts from the pretrained classifier"): this
start scores 148 of 153 validation images before any training step, where a linear probe
trained on the same features tops out at 144-146.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from training.errors import TrainingError
from training.evaluation.metrics import accuracy
from training.models.probe import ProbeFit, fit_linear_probe, linear_logits

#: Temperatures the fit tries (log-spaced): from a near-uniform start to 100x sharper logits.
TEMPERATURES = torch.logspace(-3, 2, 251)
#: Source classes per new class that ``history.json`` lists, most likely first.
TOP_SOURCES = 3


@dataclass(frozen=True, eq=False)
class SourceClassifier:
    """The pretrained classifier the body came with: ``logits = features @ weight.T + bias``."""

    weight: torch.Tensor  # (K, F)
    bias: torch.Tensor  # (K,)

    @classmethod
    def from_tensors(cls, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     num_features: int) -> SourceClassifier | None:
        """A copy of a linear classifier's parameters, or None when they do not read
        ``num_features`` pooled features (another layout: the new head cannot start from it)."""
        if weight is None or weight.dim() != 2 or weight.shape[1] != num_features \
                or weight.shape[0] < 2:
            return None
        if bias is None:
            bias = torch.zeros(weight.shape[0])
        if bias.shape != (weight.shape[0],):
            return None
        return cls(weight.detach().float().cpu().clone(), bias.detach().float().cpu().clone())


@dataclass(frozen=True, eq=False)
class HeadInit:
    """Where the new head starts: its weight and bias, and what the fit found."""

    weight: torch.Tensor  # (C, F)
    bias: torch.Tensor  # (C,)
    temperature: float
    train_loss: float
    uniform_loss: float
    top_sources: dict[str, list[list[float]]]
    source_classes: int
    samples: int

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return linear_logits(features, self.weight, self.bias)

    def apply(self, head: nn.Module) -> None:
        """Copy the start into ``head``'s last Linear layer (on whatever device it is)."""
        set_last_linear(head, self.weight, self.bias)

    def to_dict(self) -> dict:
        return {"kind": "classifier", "source_classes": self.source_classes,
                "samples": self.samples, "temperature": self.temperature,
                "train_loss": self.train_loss, "uniform_loss": self.uniform_loss,
                "top_source_classes": self.top_sources,
                "why": (f"started from the pretrained {self.source_classes}-class classifier: "
                        f"train loss {self.train_loss:.3g} against the uniform head's "
                        f"{self.uniform_loss:.3g}")}


def set_last_linear(head: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy ``weight`` and ``bias`` into ``head``'s last Linear layer."""
    linear = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    if linear.weight.shape != weight.shape:
        raise TrainingError(f"head_init: the head's last layer is {tuple(linear.weight.shape)}"
                            f", the start is {tuple(weight.shape)}")
    with torch.no_grad():
        linear.weight.copy_(weight)
        if linear.bias is not None:
            linear.bias.copy_(bias)


@dataclass(frozen=True, eq=False)
class ProbeInit:
    """A head fitted on the training features (``training.models.probe``): L2 toward the
    pretrained classifier's start (``prior``) or toward zero. Each is fitted with the strength
    its k-fold log loss on the training samples chooses (``cv_loss``); between the two, the
    higher accuracy on the validation samples decides, then the lower loss there
    (``valid_accuracy``, ``valid_loss``: how early stopping chooses the epoch it keeps), else
    the lower ``cv_loss``."""

    fit: ProbeFit
    prior: HeadInit | None
    toward_prior: bool
    cv_loss: dict[str, float]
    samples: int
    valid_loss: dict[str, float] = field(default_factory=dict)
    valid_accuracy: dict[str, float] = field(default_factory=dict)

    @property
    def train_loss(self) -> float:
        return self.fit.train_loss

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.fit.predict(features)

    def apply(self, head: nn.Module) -> None:
        set_last_linear(head, self.fit.weight, self.fit.bias)

    def to_dict(self) -> dict:
        toward = "the pretrained classifier's start" if self.toward_prior else "zero"
        cv = ", ".join(f"{k} {v:.3g}" for k, v in self.cv_loss.items())
        if self.valid_loss:
            valid = ", ".join(f"{k} {self.valid_accuracy[k]:.3g} / {v:.3g}"
                              for k, v in self.valid_loss.items())
            because = (f"the better validation accuracy of the {len(self.valid_loss)} probes, "
                       f"then loss (accuracy / loss: {valid}; cross-validated loss on the "
                       f"training images: {cv})")
        else:
            because = f"the least cross-validated loss on the training images ({cv})"
        out = {"kind": "probe", "samples": self.samples, "toward": toward,
               "cv_loss_by_prior": dict(self.cv_loss),
               "valid_loss_by_prior": dict(self.valid_loss),
               "valid_accuracy_by_prior": dict(self.valid_accuracy), **self.fit.to_dict(),
               "why": (f"a linear probe on the frozen body's features, L2 {self.fit.l2:.0e} "
                       f"toward {toward}: {because}; train loss {self.fit.train_loss:.3g}")}
        if self.prior is not None:
            out["prior"] = {k: v for k, v in self.prior.to_dict().items() if k != "why"}
        return out


def probe_init(source: SourceClassifier | None, features: torch.Tensor, targets: torch.Tensor,
               classes: list[str] | tuple[str, ...],
               valid: tuple[torch.Tensor, torch.Tensor] | None = None) -> ProbeInit:
    """The probe start of a single-label head over ``classes``: logistic regression on the
    training samples' pooled ``features``, regularised toward ``classifier_init``'s start (when
    the body came with a ``source`` classifier) and toward zero. With ``valid`` (the validation
    samples' pooled features and class indices) the fit of higher validation accuracy is the
    start, then of lower validation loss, as early stopping keeps its epoch; without, or on a
    tie, the one of lower cross-validated loss (with too few samples to cross-validate: the
    classifier's)."""
    fits = {"zero": fit_linear_probe(features, targets, len(classes))}
    prior = None if source is None else classifier_init(source, features, targets, classes)
    if prior is not None:
        fits["classifier"] = fit_linear_probe(features, targets, len(classes),
                                              prior=(prior.weight, prior.bias))
    cv = {name: fit.cv_loss[fit.l2] for name, fit in fits.items()}
    # NaN (too few samples to cross-validate): the prior
    by_cv = "classifier" if prior is not None and not cv["classifier"] > cv["zero"] else "zero"
    valid_loss, valid_accuracy = {}, {}
    if valid is not None and len(valid[1]) and len(fits) > 1:
        x, y = valid[0].float().flatten(1), valid[1].long()
        with torch.no_grad():
            for name, fit in fits.items():
                logits = fit.predict(x)
                valid_loss[name] = float(nn.functional.cross_entropy(logits, y))
                valid_accuracy[name] = accuracy(logits, y)
    chosen = min(valid_loss, key=lambda name: (-valid_accuracy[name], valid_loss[name],
                                               name != by_cv)) if valid_loss else by_cv
    return ProbeInit(fits[chosen], prior, chosen == "classifier", cv, int(len(targets)),
                     valid_loss, valid_accuracy)


def random_init(why: str) -> dict:
    """What ``history.json`` says of a head that keeps its random initialisation."""
    return {"kind": "random", "why": why}


@torch.no_grad()
def classifier_init(source: SourceClassifier, features: torch.Tensor, targets: torch.Tensor,
                    classes: list[str] | tuple[str, ...]) -> HeadInit:
    """The start of a single-label head over ``classes`` from ``source`` and the training
    samples' pooled ``features`` (N, F) with class indices ``targets`` (N,)."""
    features = features.float().flatten(1)
    targets = targets.long()
    if features.shape[1] != source.weight.shape[1]:
        raise TrainingError(f"head_init: features have {features.shape[1]} channels, the "
                            f"pretrained classifier reads {source.weight.shape[1]}")
    probs = torch.softmax(features @ source.weight.T + source.bias, dim=1)  # (N, K)
    overall = probs.mean(0)
    # A class with no sample in the cache starts at the mean image: no preference.
    rows = [probs[targets == c].mean(0) if bool((targets == c).any()) else overall
            for c in range(len(classes))]
    mapping = torch.stack(rows)  # (C, K), each row a distribution over source classes
    weight, bias = mapping @ source.weight, mapping @ source.bias
    logits = features @ weight.T + bias
    losses = torch.stack([nn.functional.cross_entropy(logits * t, targets)
                          for t in TEMPERATURES])
    best = int(losses.argmin())
    t = float(TEMPERATURES[best])
    top = mapping.topk(min(TOP_SOURCES, mapping.shape[1]), dim=1)
    tops = {name: [[int(i), round(float(p), 4)] for p, i in zip(values, indices, strict=True)]
            for name, values, indices in zip(classes, top.values, top.indices, strict=True)}
    return HeadInit(weight * t, bias * t, t, float(losses[best]), math.log(len(classes)), tops,
                    int(source.weight.shape[0]), int(len(targets)))
