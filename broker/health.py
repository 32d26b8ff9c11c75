"""Liveness and readiness."""

from __future__ import annotations

from aiohttp import web

from broker.context import DATABASE


async def health(request: web.Request) -> web.Response:
    """The process is alive and serving HTTP."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """The database answers; a load balancer should send traffic only then."""
    if await request.app[DATABASE].ping():
        return web.json_response({"status": "ready", "database": "ok"})
    return web.json_response(
        {
            "status": "not_ready",
            "database": "unreachable",
            "error": "database_unreachable",
            "description": "The database does not answer; requests that need it will fail.",
        },
        status=503,
    )


def setup(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
