"""Background work of a manager replica (scheduler, job runner, retention sweep)."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """Start the replica's background loops with the app and stop them with it."""
