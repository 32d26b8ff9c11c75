"""OSB API 2.17 endpoints (platform side)."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """Register the /v2 routes."""
