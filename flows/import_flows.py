"""The import flow: a state dict trained elsewhere → export → parity gate → promote.

Wiring only: ``training.recipes.import_model`` builds the architecture, loads the checkpoint and
runs the same export and parity gate a lensflow training output gets; ``promote_task`` (shared
with the training flows) moves ``<registry>/<name>/current``. The options are the declared
``ImportOptions``, flattened into flow parameters by ``declared_options``; the parity table is an
artifact, and a missing sample folder is a warning in the run's log.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from export.errors import ParityError
from flows.artifacts import publish_markdown
from flows.failures import user_errors_fail_the_run
from flows.option_surfaces import declared_options
from flows.params import ModelName, PathText
from flows.train_flows import promote_task
from training.recipes.import_options import ImportOptions

PARITY_KEY = "import-model-parity"


@task(name="import-and-check-parity", cache_policy=NO_CACHE)
def import_task(checkpoint: str, registry: str, name: str, options: ImportOptions,
                classes: str | None, sample_images: str | None):
    """Load the checkpoint into its architecture, export it into a new bundle, run parity."""
    from training.recipes.import_model import import_checkpoint

    logger = get_run_logger()
    try:
        result = import_checkpoint(checkpoint, registry, name, options, classes=classes,
                                   sample_images=sample_images, warn=logger.warning)
    except ParityError as err:
        if err.report is not None:
            publish_markdown(err.report.to_markdown(), key=PARITY_KEY,
                             description=f"parity FAILED for {err.bundle_path}")
        raise
    publish_markdown(result.export.parity.to_markdown(), key=PARITY_KEY,
                     description=f"parity of {result.export.bundle_path} "
                     f"({result.sample_images} sample images)")
    logger.info("bundle %s written; parity passed", result.export.bundle_path)
    return result


@flow(name="import-model")
@declared_options(options=ImportOptions)
@user_errors_fail_the_run
def import_model_flow(checkpoint: PathText, registry: PathText, name: ModelName,
                      classes: str | None = None, sample_images: str | None = None, *,
                      options: ImportOptions) -> dict | State:
    """Export ``checkpoint`` (a safetensors or ``torch.save`` state dict of ``arch``, trained
    anywhere) to ``registry/name``, check parity on ``sample_images`` (a folder of your own
    images; recommended), promote it if parity passes.

    ``classes``: a text file of output names, one per line. The other parameters are
    ``ImportOptions``.
    """
    result = import_task(checkpoint, registry, name, options, classes, sample_images)
    pointer = promote_task(result.export.bundle_path) if options.promote else None
    return result.to_dict() | {"current": pointer}
