"""HTTP Basic auth for the agents' stand-ins (the Go agent's in the runner tests, the stub
agent of the benchmarks), answering 401 the way the Go agent does."""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Any

from aiohttp import web


def basic_auth(user: str, password: str) -> Any:
    """An aiohttp middleware admitting only ``user:password``."""
    expected = f"{user}:{password}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        given = b""
        if header.startswith("Basic "):
            try:
                given = base64.b64decode(header[6:])
            except (ValueError, binascii.Error):
                given = b""
        if not hmac.compare_digest(given, expected):
            return web.json_response({"message": "Unauthorised."}, status=401)
        return await handler(request)

    return middleware
