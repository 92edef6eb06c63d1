"""``lensflow demo``: every stage, end to end, on data that needs no setup.

Images and ratings come from ``$LENSFLOW_DATA``, the cached tutorial archives, or (offline)
generated look-alikes; see ``flows.demo_data.resolve_demo_data``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flows.demo_data import resolve_demo_data
from scoring.image_scoring import score_image_folder
from scoring.recommendations import score_recommendations
from training.recipes.collab import train_recommender
from training.recipes.image import prepare_image_data, train_image_model
from training.recipes.options import ImageTrainOptions, RecommenderOptions
from training.recipes.publish import publish


def run_demo(workdir: Path, say: Callable[[str], None] = print, *,
             offline: bool | None = None) -> dict[str, Path]:
    """Train, export, verify, promote and score an image model and a recommender in ``workdir``."""
    workdir = Path(workdir)
    registry, out = workdir / "registry", workdir / "predictions"
    data = resolve_demo_data(offline=offline)
    say(f"data ({data.source}): images {data.images}, ratings {data.ratings}")

    generated = _generated(data.source, "images")
    images = prepare_image_data(data.images)
    say(images.summary())
    trained = train_image_model(images, workdir / "train-images", ImageTrainOptions(
        size=64 if generated else 160, bs=8 if generated else 32))
    say(f"image model: accuracy {trained.metrics['accuracy']:.3f} "
        f"(best epoch {trained.best_epoch}) → {trained.out_dir}")
    exported, current = publish(trained.out_dir, registry, "demo-images")
    say(exported.parity.to_markdown())
    say(f"image bundle promoted: {current}")

    scored = score_image_folder(_scoring_folder(data.images), registry / "demo-images", out)
    say(scored.summary_line())

    rec = train_recommender(data.ratings, workdir / "train-ratings", RecommenderOptions(
        factors=16 if _generated(data.source, "ratings") else 50, epochs=5))
    rec_exported, _ = publish(rec.out_dir, registry, "demo-recommender")
    say(f"recommender: valid_mse {rec.metrics['valid_mse']:.4f} → {rec_exported.bundle_path}")
    recs = score_recommendations(registry / "demo-recommender", out, top_k=10, full_table=True)
    say(recs.summary_line())

    nightly_out = _nightly_through_prefect(workdir, registry, _scoring_folder(data.images), say)

    landed = {
        "registry": registry,
        "image training output": trained.out_dir,
        "image predictions": Path(scored.partition),
        "recommendations": out,
        "nightly flow outputs": nightly_out,
    }
    for what, where in landed.items():
        say(f"{what}: {where}")
    return landed


def _nightly_through_prefect(workdir: Path, registry: Path, folder: Path, say) -> Path:
    """The same scoring as the scheduled ``nightly`` deployment, as one Prefect flow run.

    Without ``PREFECT_API_URL`` Prefect serves this run from a temporary local server.
    """
    import os

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # The temporary server would otherwise send Prefect's usage telemetry, and log an ERROR
    # line for it on an offline machine.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.score_flows import nightly_flow
    from scoring.errors import ScoringError

    out = workdir / "nightly"
    state = nightly_flow(str(out), image_jobs=[{"folder": str(folder),
                                                "model": str(registry / "demo-images")}],
                         rec_jobs=[{"model": str(registry / "demo-recommender"), "top_k": 10}],
                         return_state=True)
    if not state.is_completed():
        raise ScoringError(f"nightly flow run ended {state.name}: {state.message}")
    say(f"nightly flow run {state.state_details.flow_run_id}: {state.name}")
    return out


def _scoring_folder(images: Path) -> Path:
    """The validation images stand in for a nightly drop of new images."""
    for name in ("val", "valid", "test"):
        if (images / name).is_dir():
            return images / name
    return images


def _generated(source: str, kind: str) -> bool:
    """Whether ``kind`` of the demo data was generated ("generated" or "images: generated, ...")."""
    return source == "generated" or f"{kind}: generated" in source
