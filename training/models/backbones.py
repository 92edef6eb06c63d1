"""Pretrained backbones with a new head: the transfer-learning model of fast.ai lesson 6.

A registry front in the manner of timm's ``create_model``: ``create_backbone(name)`` accepts any
torchvision classification model name or any timm model name (prefix ``torchvision/`` or ``timm/``
to choose when both libraries have it; torchvision wins otherwise), drops the ImageNet classifier
and returns the pooled-feature body (or, with ``pool=False``, the body cut before its global pool
as fastai's ``create_body`` does) with its two layer groups and input recipe. ``create_model``
puts a head of ``training.models.heads`` on it — ``linear`` (Dropout + Linear) or ``fastai``
(concat pool, BatchNorm, dropout, linear, ReLU, BatchNorm, dropout, linear) — optionally
squashed into ``y_range`` with fast.ai's ``sigmoid_range``. The layer groups
``[early, late, head]`` are what freezing and discriminative learning rates act on (Howard &
Ruder, "Universal Language Model Fine-tuning", ACL 2018).
"""

from __future__ import annotations

import difflib
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from export.pixels import Preprocessing
from training.errors import TrainingError
from training.models._layer_groups import (
    group_from_names,
    module_units,
    param_names_of,
    split_groups,
    timm_units,
)
from training.models.head_init import SourceClassifier
from training.models.heads import check_head, create_head, head_dropout, takes_feature_map

_LIBRARIES = ("torchvision", "timm")


@dataclass(frozen=True, eq=False)
class Backbone:
    """A pretrained body that maps a normalised float NCHW batch to (N, num_features) features,
    or to an (N, num_features, H, W) feature map when not ``pooled``.

    groups: (early, late) — stem and early stages, then late stages; every body parameter is in
    exactly one of them.
    """

    body: nn.Module
    num_features: int
    groups: tuple[nn.Module, nn.Module]
    preprocessing: Preprocessing
    pooled: bool = True
    #: The pretrained classifier the body came with, when it reads the body's pooled features
    #: (a new linear head can start from it: ``training.models.head_init``).
    source_classifier: SourceClassifier | None = None


class ImageModel(nn.Module):
    """``head(body(x))`` with the layer groups the training loop freezes and spreads LRs over.

    head_kind: which head of ``training.models.heads`` ``head`` is (``linear`` or ``fastai``).
    """

    def __init__(self, arch: str, backbone: Backbone, head: nn.Module, head_kind: str = "linear"):
        super().__init__()
        self.arch = arch
        self.head_kind = check_head(head_kind)
        self.num_features = backbone.num_features
        self.body = backbone.body
        self.head = head
        # A plain attribute, not a submodule: it is not part of the model that trains or exports.
        self.source_classifier = backbone.source_classifier if backbone.pooled else None
        # Names, not module references, so that the groups survive deepcopy and device moves.
        self._group_names = tuple(param_names_of(backbone.body, g) for g in backbone.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def layer_groups(self) -> list[nn.Module]:
        """``[early, late, head]``: the last group is always the head."""
        return [*(group_from_names(self.body, names) for names in self._group_names), self.head]


def resolve_arch(name: str) -> tuple[str, str]:
    """``(library, model_name)`` for an arch name, or a TrainingError suggesting close names."""
    import timm
    import torchvision

    library, _, bare = name.partition("/")
    if bare and library in _LIBRARIES:
        name = bare
    else:
        library = ""
    in_torchvision = name in torchvision.models.list_models(module=torchvision.models)
    if library in ("", "torchvision") and in_torchvision:
        return "torchvision", name
    if library in ("", "timm") and timm.is_model(name):
        return "timm", name
    known = torchvision.models.list_models(module=torchvision.models) + timm.list_models()
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise TrainingError(f"unknown arch {name!r}: not a torchvision or timm model name{hint}")


def create_backbone(name: str, weights: str | Path = "imagenet", *, pool: bool = True) -> Backbone:
    """The pretrained body of model ``name`` without its classifier.

    weights: ``imagenet`` (the library's default weights, from its cache or the network),
    ``none`` (random init), ``packaged`` (offline ImageNet weights, ``tf_efficientnet_lite0``
    only) or the path of a safetensors / ``torch.save`` state dict of the full original model.
    pool: False cuts the body before its global pool, so it returns the feature map.
    """
    library, model_name = resolve_arch(name)
    choice, path = _parse_weights(weights)
    if choice == "packaged" and (library, model_name) != ("timm", "tf_efficientnet_lite0"):
        raise TrainingError(
            f"--weights packaged exists only for tf_efficientnet_lite0, not {name!r}; "
            "use imagenet, none or a weights file"
        )
    build = _build_torchvision if library == "torchvision" else _build_timm
    full_keys, body, num_features, classifier = build(model_name, pretrained=choice == "imagenet")
    if choice == "packaged":
        from training.models.packaged_weights import (
            packaged_lite0_state_dict,
            packaged_preprocessing,
        )

        state = packaged_lite0_state_dict()
        _apply_weights(body, full_keys, state, origin="packaged")
        classifier = _classifier_in(state, classifier)
        preprocessing = packaged_preprocessing()
    else:
        if path is not None:
            state = _read_state_dict(path)
            _apply_weights(body, full_keys, state, origin=str(path))
            classifier = _classifier_in(state, classifier)
        elif choice == "none":
            classifier = None
        preprocessing = (_torchvision_preprocessing(model_name) if library == "torchvision"
                         else _timm_preprocessing(body))
    units = timm_units(body) if library == "timm" else None
    if not pool:
        body, num_features = _cut_before_pool(name, body, timm_model=library == "timm")
    if units is None:
        units = module_units(body)
    else:  # timm groups the full model; parameters after the cut (a conv_head) are gone
        kept = {n for n, _ in body.named_parameters()}
        units = [unit for u in units if (unit := [n for n in u if n in kept])]
    source = None
    if isinstance(classifier, tuple):
        source = SourceClassifier.from_tensors(*classifier, num_features=num_features)
    return Backbone(body, num_features, split_groups(name, body, units), preprocessing, pool,
                    source)


def create_model(
    arch: str,
    n_out: int,
    weights: str | Path = "imagenet",
    *,
    y_range: tuple[float, float] | None = None,
    dropout: float | None = None,
    input_size: int | None = None,
    head: str = "linear",
) -> tuple[ImageModel, Preprocessing]:
    """A backbone with a new ``head`` (``linear`` or ``fastai``) of ``n_out`` outputs, and its
    input recipe.

    dropout: the head's dropout ``p`` (default: 0.2 for linear, fastai's ``ps=0.5``).
    """
    if n_out < 1:
        raise TrainingError(f"n_out must be at least 1, got {n_out}")
    dropout = head_dropout(head, dropout)
    if y_range is not None and not float(y_range[0]) < float(y_range[1]):
        raise TrainingError(f"y_range must be (low, high) with low < high, got {y_range}")
    if input_size is not None and input_size < 16:
        raise TrainingError(f"input_size must be at least 16 pixels, got {input_size}")
    backbone = create_backbone(arch, weights, pool=not takes_feature_map(head))
    preprocessing = backbone.preprocessing
    if input_size is not None and input_size != preprocessing.input_size:
        if _has_fixed_input_size(arch, backbone.body):
            raise TrainingError(
                f"arch {arch!r} only takes {preprocessing.input_size}px input, "
                f"not input_size={input_size}"
            )
        preprocessing = preprocessing.with_size(input_size)
    layers = create_head(head, backbone.num_features, n_out, dropout=dropout, y_range=y_range)
    return ImageModel(arch, backbone, layers, head), preprocessing


def _parse_weights(weights: str | Path) -> tuple[str, Path | None]:
    if isinstance(weights, str) and weights.lower() in ("imagenet", "none", "packaged"):
        return weights.lower(), None
    path = Path(weights)
    if not path.is_file():
        raise TrainingError(
            f"weights file {path} not found (weights is imagenet, none, packaged or a file path)"
        )
    return "file", path


def _has_fixed_input_size(arch: str, body: nn.Module) -> bool:
    """Position embeddings pin some transformers to the size they were built for."""
    cfg = getattr(body, "pretrained_cfg", None)
    if cfg is not None:
        return bool(cfg.get("fixed_input_size", False))
    name = arch.rpartition("/")[2]
    return name.startswith(("vit_", "maxvit"))


# ---- building the body from each library ------------------------------------------------------

_NO_NETWORK_HINT = ("no network and no cached copy? use --weights packaged "
                    "(tf_efficientnet_lite0) or --weights <file>")


def _classifier_in(state: dict[str, torch.Tensor], classifier) -> tuple | None:
    """The classifier's (weight, bias) in a full-model ``state``, found by its module name."""
    name = classifier if isinstance(classifier, str) else None
    if name is None or f"{name}.weight" not in state:
        return None
    return state[f"{name}.weight"], state.get(f"{name}.bias")


def _build_torchvision(name: str, pretrained: bool) -> tuple[set[str], nn.Module, int, object]:
    """Full-model keys, the body (classifier and aux heads made Identity), its width, and the
    classifier: its (weight, bias) when ``pretrained``, else its module name."""
    import torchvision

    default = torchvision.models.get_model_weights(name).DEFAULT
    if pretrained:
        try:
            model = torchvision.models.get_model(name, weights=default)
        except (OSError, RuntimeError) as e:  # URLError is an OSError
            raise TrainingError(f"cannot get ImageNet weights for {name}: {_NO_NETWORK_HINT}") \
                from e
    else:
        kwargs = _torchvision_kwargs(name, default)
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    full_state = model.state_dict()
    full_keys = set(full_state)
    if getattr(model, "aux_logits", False):
        # Auxiliary classifiers only run in training mode and return a tuple: not features.
        model.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    num_features, qual = _drop_classifier(model, len(default.meta["categories"]), name)
    classifier = _classifier_in(full_state, qual) if pretrained else qual
    return full_keys, model, num_features, classifier


def _torchvision_kwargs(name: str, default) -> dict:
    """What torchvision's builders change when given weights, so random init has the same shape."""
    if name in ("inception_v3", "googlenet"):
        return {"transform_input": True, "init_weights": True}
    if name.startswith("vit_"):
        return {"image_size": default.meta["min_size"][0]}
    return {}


def _drop_classifier(model: nn.Module, n_classes: int, name: str) -> tuple[int, str]:
    """Replace the last layer producing class scores (and a Dropout just before it) by Identity;
    its input width and module name."""
    classifier = None
    for qual, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == n_classes:
            classifier, width = qual, module.in_features
        elif isinstance(module, nn.Conv2d) and module.out_channels == n_classes:
            classifier, width = qual, module.in_channels  # squeezenet scores with a 1x1 conv
    if classifier is None:
        raise TrainingError(f"arch {name!r}: no {n_classes}-class classifier layer to replace")
    parent_name, _, child = classifier.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, child, nn.Identity())
    if isinstance(parent, nn.Sequential) and child.isdigit() and int(child) > 0:
        before = str(int(child) - 1)
        if isinstance(parent.get_submodule(before), nn.Dropout):
            setattr(parent, before, nn.Identity())  # the new head brings its own dropout
    return width, classifier


def _build_timm(name: str, pretrained: bool) -> tuple[set[str], nn.Module, int, object]:
    """As ``_build_torchvision``, from timm."""
    import timm

    try:
        model = timm.create_model(name, pretrained=pretrained)
    except (OSError, RuntimeError) as e:  # hub errors subclass OSError
        raise TrainingError(f"cannot get ImageNet weights for {name}: {_NO_NETWORK_HINT}") from e
    full_state = model.state_dict()
    qual = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    classifier = _classifier_in(full_state, qual) if pretrained else qual
    model.reset_classifier(0)
    width = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return set(full_state), model, width, classifier


_GLOBAL_POOL = re.compile(r"Adaptive\w*Pool2d$")  # torch's adaptive pools, timm's SelectAdaptive
_PROBE_SIZE = 64


def _cut_before_pool(name: str, model: nn.Module, *, timm_model: bool) -> tuple[nn.Module, int]:
    """fastai's ``create_body``: the children before the last one holding a global pool, under
    their own names (so weights keep their keys), and the channels of the map they return."""
    children = list(model.named_children())
    cut = next((i for i in reversed(range(len(children)))
                if any(_GLOBAL_POOL.search(type(m).__name__) for m in children[i][1].modules())),
               0)
    refusal = (f"arch {name!r}: head 'fastai' needs a convolutional body that ends in a global "
               "pool; use head 'linear'")
    if cut == 0 or getattr(model, "transform_input", False):  # inception's input shift is lost
        raise TrainingError(refusal)
    body = nn.Sequential(OrderedDict(children[:cut]))
    # A probe on a small random batch (own generator: the caller's RNG stream is left alone).
    x = torch.randn(1, 3, _PROBE_SIZE, _PROBE_SIZE, generator=torch.Generator().manual_seed(0))
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = body(x)
            # timm says what its body computes: the cut must give that NCHW map, not a token
            # sequence or an NHWC map.
            want = model.forward_features(x) if timm_model else out
    except RuntimeError as e:
        raise TrainingError(f"{refusal} ({e})") from e
    finally:
        model.train(training)
    same = out.shape == want.shape and torch.allclose(out, want)
    if out.dim() != 4 or not same or (timm_model and out.shape[1] != model.num_features):
        raise TrainingError(refusal)
    return body, int(out.shape[1])


def _torchvision_preprocessing(name: str) -> Preprocessing:
    import torchvision

    preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    return Preprocessing(
        input_size=int(preset.crop_size[0]),
        resize_size=int(preset.resize_size[0]),
        mean=tuple(float(v) for v in preset.mean),
        std=tuple(float(v) for v in preset.std),
        interpolation=preset.interpolation.value,
    )


def _timm_preprocessing(body: nn.Module) -> Preprocessing:
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(body)
    input_size = int(cfg["input_size"][-1])
    return Preprocessing(
        input_size=input_size,
        resize_size=input_size,
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=str(cfg["interpolation"]),
    ).with_crop_pct(cfg["crop_pct"])


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file or a ``torch.save`` state dict, never unpickling arbitrary objects."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, zipfile and unpickler all raise their own types
        raise TrainingError(f"cannot read weights file {path}: {e}") from e
    for wrapper in ("state_dict", "model"):  # common training-checkpoint layouts
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor)
                                               for v in loaded.values()):
        raise TrainingError(f"weights file {path} does not hold a state dict of tensors")
    return loaded


def _apply_weights(body: nn.Module, full_keys: set[str],
                   source: Path | dict[str, torch.Tensor], origin: str) -> None:
    """Load full-model weights into the body; the old classifier's keys are ignored."""
    state = _read_state_dict(source) if isinstance(source, Path) else source
    target = body.state_dict()
    check_weights_fit(target, state, f"weights {origin}", ignored=full_keys - set(target))
    body.load_state_dict({k: state[k] for k in target}, strict=True)


def check_weights_fit(target: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                      origin: str, ignored: set[str] | frozenset[str] = frozenset()) -> None:
    """Raise a TrainingError naming ``origin`` and the keys unless ``state`` fills ``target``."""
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target) - set(ignored))
    if missing or unexpected:
        raise TrainingError(
            f"{origin} do not fit the model: missing keys {missing[:5]} ({len(missing)}), "
            f"unexpected keys {unexpected[:5]} ({len(unexpected)})"
        )
    for key, value in target.items():
        if state[key].shape != value.shape:
            raise TrainingError(f"{origin}: {key} has shape {tuple(state[key].shape)}, "
                                f"the model needs {tuple(value.shape)}")
