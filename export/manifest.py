"""The manifest contract: what a bundle's ``manifest.json`` says and how every reader reads it.

Export writes it, the parity gate and scoring read it; the rules below are the only place that
says what a task name, a threshold or a point frame means.
"""

from __future__ import annotations

import numpy as np

from export.errors import ManifestError
from export.pixels import Preprocessing

IMAGE_TASKS = ("single_label", "multi_label", "regression")
TASKS = (*IMAGE_TASKS, "collab")
#: Outputs of an image graph: scores (softmax, sigmoid or identity) and the raw logits.
IMAGE_OUTPUTS = ("scores", "logits")
DEFAULT_THRESHOLD = 0.5
#: ``targets.frame`` of point regression: (x, y) pairs in the centre crop, scaled to [-1, 1].
POINT_FRAME = "input_crop_normalised"
#: ``tta.views`` of a graph with test-time augmentation: the centre crop the graph is given and
#: its horizontal mirror, whose scores the graph averages (``export.wrappers.FlipAverage``).
TTA_VIEWS = ("centre_crop", "centre_crop_hflip")
#: ``precision`` of an image graph's arithmetic (inputs stay uint8, outputs float32). bfloat16 is
#: not among them: ONNX Conv has no bfloat16 type at the bundle's opset 18, and ONNX Runtime
#: refuses such a graph ("Type 'tensor(bfloat16)' ... of operator (Conv) is invalid").
PRECISIONS = ("fp32", "fp16")


def thresholds_for(manifest: dict, n_classes: int) -> np.ndarray:
    """Per-class decision thresholds of a multi_label model.

    ``thresholds`` may be absent (0.5 each), one number, a list (one per class) or a map of
    class name to threshold with an optional ``default`` for the classes it does not name.
    """
    raw = manifest.get("thresholds")
    if raw is None:
        values = np.full(n_classes, DEFAULT_THRESHOLD)
    elif isinstance(raw, dict):
        classes = manifest.get("classes") or []
        default = float(raw.get("default", DEFAULT_THRESHOLD))
        values = np.array([float(raw.get(c, default)) for c in classes] or [default] * n_classes)
    elif isinstance(raw, list | tuple):
        values = np.asarray(raw, dtype=np.float64)
    else:
        values = np.full(n_classes, float(raw))
    if values.shape != (n_classes,):
        raise ManifestError(f"manifest 'thresholds': {values.size} values for {n_classes} classes")
    return values


def point_frame(manifest: dict) -> Preprocessing | None:
    """The crop the outputs are points in, when a regression model predicts points; else None."""
    targets = manifest.get("targets") or {}
    if manifest.get("task") != "regression" or targets.get("kind") != "points":
        return None
    if targets.get("frame") != POINT_FRAME:
        raise ManifestError(f"manifest 'targets.frame': {targets.get('frame')!r} is not "
                            f"{POINT_FRAME!r}, the only point frame lensflow reads")
    return Preprocessing.from_dict(manifest["preprocessing"])


def tta_views(manifest: dict) -> tuple[str, ...]:
    """The views an image graph averages (``tta.views``); () when it runs on the input alone."""
    tta = manifest.get("tta")
    if not tta:
        return ()
    views = tuple(tta.get("views") or ())
    if views != TTA_VIEWS:
        raise ManifestError(f"manifest 'tta.views': {list(views)} is not {list(TTA_VIEWS)}, "
                            "the views lensflow's graphs average")
    return views


def graph_precision(manifest: dict) -> str:
    """The arithmetic precision of the bundle's image graph (``precision``; fp32 when absent)."""
    precision = manifest.get("precision") or "fp32"
    if precision not in PRECISIONS:
        raise ManifestError(f"manifest 'precision': {precision!r} is not one of "
                            f"{list(PRECISIONS)}")
    if precision != "fp32" and manifest.get("task") not in IMAGE_TASKS:
        raise ManifestError(f"manifest 'precision': {precision} is for image graphs; a "
                            "recommender's graphs are embedding lookups and stay fp32")
    return precision
