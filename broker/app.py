"""The aiohttp application: middlewares, shared resources and routes."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from backup.database import Database, connect
from backup.secrets import SecretBox
from broker import api, background, compat, dashboard, health, osb
from broker.config import Settings
from broker.context import AUTH_THROTTLE, DATABASE, REQUEST_ID, SECRETS, SETTINGS, STORE_OPENER
from broker.errors import ApiError, Handler, error_middleware
from storage import egress, open_store
from webguard.middleware import (
    UNSUPPORTED_DESCRIPTION,
    cors_middleware,
    parse_origins,
    unsupported_body,
)
from webguard.server import ServerLimits
from webguard.throttle import Throttle

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 1024 * 1024
CORS_ALLOW_HEADERS = (
    "Authorization, Content-Type, X-Request-Id, X-Broker-API-Version, "
    "X-Broker-API-Request-Identity, X-Broker-API-Originating-Identity"
)


@web.middleware
async def json_bodies(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bodies of changes are JSON (a cross-site form cannot send that without a preflight);
    the dashboard's forms are not, and carry a CSRF token instead (broker.dashboard)."""
    if unsupported_body(request) and not request.path.startswith(dashboard.PREFIX + "/"):
        raise ApiError(415, "unsupported_media_type", UNSUPPORTED_DESCRIPTION)
    return await handler(request)


def server_limits(settings: Settings) -> ServerLimits:
    """What one client may hold of this process (see webguard.server)."""
    return ServerLimits(
        header_timeout=settings.http_header_timeout,
        body_timeout=settings.http_body_timeout,
        keepalive_timeout=settings.http_keepalive_timeout,
        max_connections=settings.http_max_connections,
    )


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a request id to every log line of this request and echo it back."""
    platform_id = request.headers.get("X-Broker-API-Request-Identity")
    request_id = (platform_id or request.headers.get("X-Request-Id") or uuid.uuid4().hex)[:128]
    request[REQUEST_ID] = request_id
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    response = await handler(request)
    response.headers["X-Request-Id"] = request_id
    if platform_id is not None:
        response.headers["X-Broker-API-Request-Identity"] = platform_id
    if request.path not in ("/health", "/ready"):
        log.info(
            "request",
            method=request.method,
            path=request.path,
            status=response.status,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )
    return response


def create_app(
    settings: Settings, *, store: Database | None = None, run_background: bool | None = None
) -> web.Application:
    """The service. Without ``store`` it connects to ``settings.mongodb_url`` on start-up (and
    closes that connection on clean-up); a given ``store`` is its caller's to close.
    ``run_background``: run the scheduler, job runner and retention sweep (default:
    ``BACKGROUND_ENABLED``).

    On start-up the cleanup contexts run in the order they are added here: the database,
    the egress policy, then the background parts; on clean-up, in reverse order."""
    settings.resolve_local_secrets()
    origins = parse_origins(settings.cors_allowed_origins)
    cors = (
        [cors_middleware(origins, allow_headers=CORS_ALLOW_HEADERS, expose_headers="X-Request-Id")]
        if origins
        else []
    )
    app = web.Application(
        middlewares=[request_context, *cors, error_middleware, json_bodies],
        client_max_size=MAX_BODY_BYTES,
    )
    app[SETTINGS] = settings
    app[AUTH_THROTTLE] = Throttle(settings.auth_failure_limit, settings.auth_failure_window)
    app[SECRETS] = SecretBox(settings.master_keys())
    app[STORE_OPENER] = open_store
    if store is not None:
        app[DATABASE] = store
    app.cleanup_ctx.extend([database, egress_policy])
    health.setup(app)
    osb.setup(app)
    api.setup(app)
    dashboard.setup(app)  # after the API: it uses the API's authorizer
    compat.setup(app)  # evoila osb-core brokers' deprovision calls (docs/osb.md)
    background.setup(app, enabled=run_background)
    return app


async def database(app: web.Application) -> AsyncIterator[None]:
    """Connects unless the app was given a database, and makes sure of its indexes."""
    settings = app[SETTINGS]
    own = DATABASE not in app
    if own:
        assert settings.mongodb_url is not None, "the embedded database's URL is set first"
        app[DATABASE] = connect(settings.mongodb_url.get_secret_value(), settings.mongodb_database)
    db = app[DATABASE]
    await db.ensure_indexes()
    log.info("database_ready", database=settings.mongodb_database)
    yield
    if own:
        await db.close()


async def egress_policy(app: web.Application) -> AsyncIterator[None]:
    """Every store and agent session checks it from now on (storage.egress)."""
    previous = egress.install(app[SETTINGS].egress_policy())
    yield
    egress.install(previous)
