"""JSON-only request bodies for changes, and CORS for configured origins only.

A browser lets any web page send a cross-site POST without asking first when its content type
is ``text/plain``, ``application/x-www-form-urlencoded`` or ``multipart/form-data``; a JSON
body sent that way would be read like any other. Requiring ``application/json`` (or
``application/*+json``) for every body of a change makes the browser ask first (a CORS
preflight), which is answered only for the configured origins.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from aiohttp.typedefs import Middleware

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CHANGES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CORS_METHODS = "GET, POST, PUT, PATCH, DELETE"
CORS_MAX_AGE = "600"


def is_json(content_type: str) -> bool:
    """``application/json`` or ``application/<anything>+json`` (parameters such as charset
    were already split off by aiohttp)."""
    media = content_type.strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def unsupported_body(request: web.BaseRequest) -> bool:
    """A change that carries a body in anything but JSON."""
    return request.method in CHANGES and request.body_exists and not is_json(request.content_type)


UNSUPPORTED_DESCRIPTION = "Request bodies must be JSON, sent with Content-Type: application/json."


def parse_origins(raw: str | Iterable[str] | None) -> frozenset[str]:
    """``https://a.example, https://b.example`` as a set of exact origins (no trailing slash,
    no wildcard: ``*`` would let every site read the answers)."""
    if raw is None:
        return frozenset()
    parts = raw.split(",") if isinstance(raw, str) else list(raw)
    out = set()
    for part in parts:
        origin = part.strip().rstrip("/")
        if not origin:
            continue
        if origin == "*" or "://" not in origin or "*" in origin:
            raise ValueError(
                f"{origin[:100]!r} is not an origin; give exact origins such as "
                "https://dashboard.example.com, comma-separated"
            )
        out.add(origin)
    return frozenset(out)


def cors_middleware(
    origins: frozenset[str], *, allow_headers: str, expose_headers: str = ""
) -> Middleware:
    """Answers preflights of ``origins`` and lets them read answers. Never
    ``Access-Control-Allow-Credentials``: callers authenticate with an Authorization header
    they set themselves, not with cookies a browser would add."""

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        allowed = origin is not None and origin in origins
        if (
            allowed
            and request.method == "OPTIONS"
            and "Access-Control-Request-Method" in request.headers
        ):
            assert origin is not None
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Origin": origin,
                    "Access-Control-Allow-Methods": CORS_METHODS,
                    "Access-Control-Allow-Headers": allow_headers,
                    "Access-Control-Max-Age": CORS_MAX_AGE,
                    "Vary": "Origin",
                },
            )
        response = await handler(request)
        if not response.prepared:
            # The answer depends on Origin whether or not this one is allowed (caches).
            response.headers.add("Vary", "Origin")
            if allowed:
                assert origin is not None
                response.headers["Access-Control-Allow-Origin"] = origin
                if expose_headers:
                    response.headers["Access-Control-Expose-Headers"] = expose_headers
        return response

    return cors
