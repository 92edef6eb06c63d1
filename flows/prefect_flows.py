"""Every lensflow Prefect flow, importable from one place.

``prefect.yaml`` and ``lensflow serve`` point at the defining modules; this index is for Python
callers (``from flows.prefect_flows import score_image_folder_flow``) and for looking a flow up
by its Prefect name.
"""

from __future__ import annotations

from flows.import_flows import import_model_flow
from flows.score_flows import nightly_flow, score_image_folder_flow, score_recommendations_flow
from flows.train_csv_flows import train_multilabel_model_flow, train_regression_model_flow
from flows.train_flows import train_image_model_flow, train_recommender_flow

FLOWS = {f.name: f for f in (score_image_folder_flow, score_recommendations_flow, nightly_flow,
                             train_image_model_flow, train_recommender_flow,
                             train_multilabel_model_flow, train_regression_model_flow,
                             import_model_flow)}

__all__ = ["FLOWS", "import_model_flow", "nightly_flow", "score_image_folder_flow",
           "score_recommendations_flow", "train_image_model_flow", "train_multilabel_model_flow",
           "train_recommender_flow", "train_regression_model_flow"]
