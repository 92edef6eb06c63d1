"""``lensflow serve``: every deployment of ``prefect.yaml``, served from this process.

For users without a work pool or worker: ``prefect.serve`` registers the deployments with their
schedules and runs their flows in subprocesses of this one. The deployments are read from
``prefect.yaml`` itself, with its ``{{ lensflow.* }}`` placeholders filled from the same
``deploy_settings`` the ``prefect deploy`` build step uses, so the two ways cannot drift apart.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import yaml
from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from prefect.utilities.templating import apply_values

from flows.deploy_settings import deploy_settings

#: The repository root, where ``prefect.yaml`` and the flow entrypoints live.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def deployment_specs(project_root: Path = PROJECT_ROOT) -> list[dict]:
    """The ``deployments`` of ``prefect.yaml`` with every ``{{ lensflow.* }}`` filled in."""
    config = yaml.safe_load((project_root / "prefect.yaml").read_text())
    settings = deploy_settings(cwd=project_root).to_dict()
    return apply_values(config["deployments"], {"lensflow": settings}, remove_notset=False)


def _schedules(spec: dict) -> list:
    return [Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
            for s in spec.get("schedules") or []]


def build_deployments(project_root: Path = PROJECT_ROOT) -> list[RunnerDeployment]:
    """One ``RunnerDeployment`` per ``prefect.yaml`` deployment: same name, flow, parameters,
    schedules, tags and description."""
    deployments = []
    for spec in deployment_specs(project_root):
        path, func = spec["entrypoint"].split(":")
        # Imported as a package module (not run as a script) so a flow exists once per process.
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), func)
        deployments.append(flow.to_deployment(
            name=spec["name"], parameters=spec.get("parameters") or {},
            schedules=_schedules(spec), tags=spec.get("tags"),
            description=spec.get("description")))
    return deployments


def serve_all(limit: int | None = None) -> None:
    """Serve every deployment until interrupted (Ctrl-C pauses their schedules)."""
    os.chdir(PROJECT_ROOT)  # relative training outputs land in the project, as under a worker
    serve(*build_deployments(), limit=limit)
