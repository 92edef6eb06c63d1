"""Where deployments read and write, from ``LENSFLOW_*`` environment variables or defaults.

``prefect.yaml`` runs :func:`resolve_settings` as a build step of ``prefect deploy`` and uses its
outputs (``{{ lensflow.registry }}`` ...) in pull steps, parameters and schedules; ``serve_all``
calls the same function, so both ways of deploying agree on every path. Every path comes out
absolute: a process worker runs each flow from a temporary directory, where a relative path
would point nowhere.

| variable | default | used for |
| --- | --- | --- |
| ``LENSFLOW_HOME`` | the directory ``prefect deploy`` runs in | code directory flows run from |
| ``LENSFLOW_REGISTRY`` | ``$LENSFLOW_HOME/runs/registry`` | model bundles |
| ``LENSFLOW_OUT`` | ``$LENSFLOW_HOME/runs/out`` | Parquet outputs |
| ``LENSFLOW_INBOX`` | ``$LENSFLOW_HOME/runs/inbox`` | image folder the nightly run scores |
| ``LENSFLOW_TIMEZONE`` | ``UTC`` | timezone of the 02:00 schedule and of run dates |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


@dataclass(frozen=True)
class DeploySettings:
    """Absolute paths and the schedule timezone that deployments are built with."""

    home: str
    registry: str
    out: str
    inbox: str
    timezone: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _absolute(value: str | None, default: Path, base: Path) -> str:
    path = Path(value).expanduser() if value else default
    return str(path if path.is_absolute() else (base / path).resolve())


def deploy_settings(environ: Mapping[str, str] | None = None,
                    cwd: Path | None = None) -> DeploySettings:
    """Settings from ``environ`` (default ``os.environ``); relative paths are taken from the
    home directory. An unknown timezone is a ``ValueError`` naming the variable."""
    env = os.environ if environ is None else environ
    base = (cwd or Path.cwd()).resolve()
    home = Path(_absolute(env.get("LENSFLOW_HOME"), base, base))
    timezone = env.get("LENSFLOW_TIMEZONE") or "UTC"
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"LENSFLOW_TIMEZONE={timezone!r}: not an IANA timezone name "
                         "(e.g. Europe/Berlin)") from None
    return DeploySettings(
        home=str(home),
        registry=_absolute(env.get("LENSFLOW_REGISTRY"), home / "runs" / "registry", home),
        out=_absolute(env.get("LENSFLOW_OUT"), home / "runs" / "out", home),
        inbox=_absolute(env.get("LENSFLOW_INBOX"), home / "runs" / "inbox", home),
        timezone=timezone,
    )


def resolve_settings() -> dict[str, str]:
    """``prefect deploy`` build step: the settings as ``{{ lensflow.<name> }}`` outputs."""
    return deploy_settings().to_dict()
