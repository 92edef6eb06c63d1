"""The partition date of a run: the day it was *scheduled* for, in the deployment's timezone.

A nightly run that starts late, or is re-run the next morning from the UI, must still write the
partition of the night it stands for; ``scheduled_start_time`` is the one clock that says which
night that was. The date is taken in the timezone of the deployment's schedule (a 02:00 run in
Europe/Berlin belongs to that Berlin date, not to the UTC date of the instant).
"""

from __future__ import annotations

import os
from datetime import date, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from prefect import runtime

#: Timezone used when a run has no scheduled deployment to take one from.
TIMEZONE_ENV = "LENSFLOW_TIMEZONE"


def deployment_timezone() -> str:
    """Timezone of the running deployment's first schedule, else ``$LENSFLOW_TIMEZONE`` or UTC."""
    deployment_id = runtime.deployment.id
    if deployment_id:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            deployment = client.read_deployment(deployment_id)
        for entry in deployment.schedules or []:
            tz = getattr(entry.schedule, "timezone", None)
            if tz:
                return tz
    return os.environ.get(TIMEZONE_ENV) or "UTC"


def date_in_timezone(instant: datetime, tz: str) -> date:
    """Calendar date of an aware instant in ``tz`` (an unknown zone name falls back to UTC)."""
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        zone = ZoneInfo("UTC")
    return instant.astimezone(zone).date()


def scheduled_run_date() -> date:
    """The date this flow run was scheduled for (now, for a run started by hand or in a test)."""
    return date_in_timezone(runtime.flow_run.scheduled_start_time, deployment_timezone())
