"""The backup-manager REST API (/v1), scoped to one service instance:
``/v1/service_instances/{instance_id}/...``. The operations are declared in
:mod:`broker.api.routes`; ``GET /v1/openapi.json`` and ``GET /v1/docs`` describe them.

Decisions a client relies on:

- Lists (destinations, plans, jobs, restore points) are newest first, ``?limit=1..100``
  (default 20) and an opaque ``?cursor=`` (the previous page's ``next_cursor``); keyset on
  (created_at, _id), so inserts never shift later pages. Each page carries ``total``.
- Changes are ``PATCH`` with JSON merge-patch semantics (RFC 7396); the merged object is
  validated as a whole and returned. Destination secrets not sent are kept.
- Back up now: ``POST .../plans/{plan_id}/backups`` answers 202 with the QUEUED job (409 while
  a backup of that plan is queued or running). Restore: ``POST .../restores`` with
  ``restore_point_id`` and optional ``items`` answers 202 with the RESTORE job (409 while a
  restore of the instance is queued or running).
- ``POST .../jobs/{id}/cancel``: a QUEUED job is CANCELLED at once (200); a RUNNING one gets
  ``cancel_requested`` (202) and the runner ends it; an ended one is 409.
- Validation (``POST .../destinations/validate`` with a creation body, or
  ``.../destinations/{id}/validate``) answers 200 with ``ok``, the failing ``error`` code and a
  ``description`` saying what to fix; it is 4xx only for a malformed request.
- Secrets are never returned: ``secret_access_key_set``, ``password_set``,
  ``encryption.key_set``. A plan's encryption key, once set, is never replaced or dropped.
- Unknown instance and instance you may not see: the same 404 ``instance_not_found``. A
  read-only user changing anything: 403. No or bad credentials: 401 with WWW-Authenticate.
  Without a Cloud Controller configured, user tokens act only with the operator scope.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from broker.api import openapi
from broker.api.auth import AUTHORIZER, Authorizer
from broker.api.routes import API_SETTINGS, OPENER, add_routes
from broker.api.settings import ApiSettings, load_api_settings
from broker.context import SETTINGS, STORE
from storage import open_store


def setup(app: web.Application, api_settings: ApiSettings | None = None) -> None:
    """Register the /v1 routes. The API settings are read from the environment now."""
    app[API_SETTINGS] = api_settings or load_api_settings()
    app[OPENER] = open_store

    async def authorizer(app: web.Application) -> AsyncIterator[None]:
        app[AUTHORIZER] = Authorizer(app[SETTINGS], app[API_SETTINGS], app[STORE])
        yield
        await app[AUTHORIZER].close()

    app.cleanup_ctx.append(authorizer)
    add_routes(app)
    openapi.setup(app)
