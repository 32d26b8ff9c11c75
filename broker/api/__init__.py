"""The backup-manager REST API (/v1)."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """Register the /v1 routes."""
