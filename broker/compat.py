"""The three calls that data-service brokers built on evoila's osb-core make, when they
deprovision an instance that has backups enabled, to the backup manager they were configured
with (HTTP Basic with their backup credentials, in this order, failing their own deprovision
on any answer but 2xx):

- ``DELETE /backupJobs/byInstance/{instance_id}``: the instance's jobs are stopped;
- ``DELETE /backupPlans/byInstance/{instance_id}``: its plans are removed;
- ``DELETE /fileDestinations/byInstance/{instance_id}``: its storage is removed: restore
  points as its ``delete_backups_on_deprovision`` says, job records, destinations.

Each has the meaning of this manager's own deprovision step (:class:`backup.deprovision.
InstanceCleanup`), answers ``204`` (also for an unknown or deleted instance, so every call can
be repeated), and is open to the broker's and the operator's credentials only: a binding key
or a user's token is refused (403) and wrong credentials are 401, before anything is read.
docs/osb.md, "Brokers built on evoila's osb-core".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from backup.deprovision import InstanceCleanup
from broker.api.auth import AUTHORIZER
from broker.errors import ApiError
from broker.osb import INSTANCES

log = structlog.get_logger(__name__)

# The caller waits for the answer: running jobs get this long to stop (at most the
# deprovision's own DEPROVISION_JOB_WAIT_SECONDS), as in a synchronous OSB deprovision.
JOB_WAIT_SECONDS = 10.0
_MAX_ID = 256

Step = Callable[[InstanceCleanup, str], Awaitable[object]]


async def _broker_only(request: web.Request) -> None:
    principal = await request.app[AUTHORIZER].authenticate(request)
    if principal.kind not in ("broker", "operator"):
        raise ApiError(
            403,
            "forbidden",
            "Only the broker's or an operator's credentials may clean up an instance's backups.",
        )
    structlog.contextvars.bind_contextvars(acting_user=f"{principal.kind}:{principal.subject}")


def _instance_id(request: web.Request) -> str:
    value = request.match_info["instance_id"]
    if len(value) > _MAX_ID or not value.isprintable():
        raise ApiError(
            400,
            "invalid_input",
            f"instance_id must be 1 to {_MAX_ID} printable characters.",
            extra={"field": "instance_id"},
        )
    return value


def _cleanup(request: web.Request) -> InstanceCleanup:
    instances = request.app[INSTANCES]
    return InstanceCleanup(
        instances.db,
        instances.box,
        instances.clock,
        instances.opener,
        job_wait=min(instances.job_wait, JOB_WAIT_SECONDS),
        storage_attempts=instances.storage_attempts,
        storage_retry_delay=instances.storage_retry_delay,
    )


async def _run(request: web.Request, step: Step) -> web.Response:
    await _broker_only(request)
    instance_id = _instance_id(request)
    await step(_cleanup(request), instance_id)
    return web.Response(status=204)


async def delete_backup_jobs(request: web.Request) -> web.Response:
    return await _run(request, InstanceCleanup.stop_jobs)


async def delete_backup_plans(request: web.Request) -> web.Response:
    return await _run(request, InstanceCleanup.remove_plans)


async def delete_file_destinations(request: web.Request) -> web.Response:
    return await _run(request, InstanceCleanup.remove_storage)


def setup(app: web.Application) -> None:
    """Register the three routes (after :func:`broker.osb.setup` and :func:`broker.api.setup`,
    whose instance service and authorizer they use)."""
    app.router.add_delete("/backupJobs/byInstance/{instance_id}", delete_backup_jobs)
    app.router.add_delete("/backupPlans/byInstance/{instance_id}", delete_backup_plans)
    app.router.add_delete("/fileDestinations/byInstance/{instance_id}", delete_file_destinations)
