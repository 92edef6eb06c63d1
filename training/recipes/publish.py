"""Training output → parity-checked bundle, for every task: the one export step after a recipe."""

from __future__ import annotations

import json
from pathlib import Path

from export.options import ExportOptions
from training.errors import TrainingError


def export_training_output(train_out: str | Path, registry: str | Path, name: str,
                           options: ExportOptions | None = None):
    """Export a training output to a new bundle in ``registry/name`` and run the parity gate.

    The task comes from the output's ``model.json``; returns ``export.convert.ExportResult``.
    Raises ``ParityError`` (with the written bundle's path) when an export is not faithful.
    """
    train_out = Path(train_out)
    options = options or ExportOptions()
    spec = train_out / "model.json"
    if not spec.is_file():
        raise TrainingError(f"{train_out}: no model.json — is this a lensflow training output?")
    if json.loads(spec.read_text()).get("task") == "collab":
        if options.tta:
            raise TrainingError(f"{train_out}: a recommender has no views to average; "
                                "tta is for image models")
        if options.precision != "fp32":
            raise TrainingError(f"{train_out}: precision {options.precision} is for image "
                                "models; a recommender's graphs are embedding lookups")
        from training.recipes.collab import export_recommender

        return export_recommender(train_out, registry, name, aoti=options.aoti)
    from training.recipes.image import export_image_model

    return export_image_model(train_out, registry, name, options=options)


def publish(train_out: str | Path, registry: str | Path, name: str,
            options: ExportOptions | None = None):
    """Export, gate on parity, promote: ``(ExportResult, path of the current pointer)``."""
    from export.bundle import promote

    result = export_training_output(train_out, registry, name, options=options)
    return result, promote(result.bundle_path)
