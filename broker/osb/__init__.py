"""OSB API 2.17, the platform side: ``/v2/catalog``, service instances and bindings, each
endpoint behind the broker's HTTP Basic credentials and the ``X-Broker-API-Version`` check.

Decisions a platform (or a broker registering its instances) relies on; docs/osb.md has the
whole contract:

- Any ``2.x`` from 2.13 is accepted; otherwise 412. The originating identity is optional and
  logged as ``acting_user``; the request identity is echoed.
- Provision is asynchronous (the agent is checked first): 202 with an ``operation``, or 422
  ``AsyncRequired`` without ``accepts_incomplete=true``. An identical repeat answers 202 while
  in progress and 200 once done; a different one 409.
- Update is synchronous (200) unless the agent changes, which is checked first (202).
- Deprovision is asynchronous, or synchronous (200) when nothing needs waiting for and the
  platform did not accept an asynchronous answer; an unknown instance is 410, so every DELETE
  can be repeated. After it, ``last_operation`` answers ``succeeded`` for
  ``TOMBSTONE_SECONDS``, then 410.
- Bind and unbind are synchronous; the key is shown once (201) and stored as a hash.
- A change while another is in progress is 422 ``ConcurrencyError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from backup.instances import Instances
from broker.context import DATABASE, SECRETS, SETTINGS
from broker.osb.catalog import Catalog
from broker.osb.handlers import CATALOG, INSTANCES, add_routes

__all__ = ["CATALOG", "INSTANCES", "Catalog", "setup"]


def setup(app: web.Application) -> None:
    """Load the catalog (a bad one stops start-up with a clear error), register the /v2
    routes, and run this replica's OSB operation worker with the app."""
    settings = app[SETTINGS]
    app[CATALOG] = Catalog.load(settings.catalog_path)

    async def operations(app: web.Application) -> AsyncIterator[None]:
        instances = Instances(
            app[DATABASE],
            app[SECRETS],
            probe_timeout=settings.agent_probe_timeout,
            require_agent_tls=settings.agent_require_tls,
            job_wait=settings.deprovision_job_wait,
            lease_seconds=settings.operation_lease_seconds,
            tombstone_seconds=settings.tombstone_seconds,
        )
        app[INSTANCES] = instances
        await instances.start()
        yield
        await instances.close()

    app.cleanup_ctx.append(operations)
    add_routes(app)
