"""The backup-manager REST API (/v1), scoped to one service instance:
``/v1/service_instances/{instance_id}/...``. The operations are declared in
:mod:`broker.api.routes`; ``GET /v1/openapi.json`` and ``GET /v1/docs`` describe them, and
``docs/api.md`` explains how to use them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from broker.api import openapi
from broker.api.auth import AUTHORIZER, Authorizer
from broker.api.routes import API_SETTINGS, add_routes
from broker.api.settings import ApiSettings, load_api_settings
from broker.context import DATABASE, SETTINGS


def setup(app: web.Application, api_settings: ApiSettings | None = None) -> None:
    """Register the /v1 routes. The API settings are read from the environment now."""
    app[API_SETTINGS] = api_settings or load_api_settings()

    async def authorizer(app: web.Application) -> AsyncIterator[None]:
        app[AUTHORIZER] = Authorizer(app[SETTINGS], app[API_SETTINGS], app[DATABASE])
        yield
        await app[AUTHORIZER].close()

    app.cleanup_ctx.append(authorizer)
    add_routes(app)
    openapi.setup(app)
