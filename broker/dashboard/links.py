"""Addresses of the dashboard's pages that other parts of the manager hand out."""

from __future__ import annotations

from urllib.parse import quote

from broker.config import Settings

PREFIX = "/dashboard"


def instance_url(instance_id: str) -> str:
    """The path of an instance's dashboard page."""
    return f"{PREFIX}/instances/{quote(instance_id, safe='')}"


def dashboard_url(settings: Settings, instance_id: str) -> str | None:
    """Where provisioning sends the instance's users (OSB ``dashboard_url``); None while the
    dashboard's sign-in is not configured (no DASHBOARD_CLIENT_SECRET)."""
    if settings.dashboard_client_secret is None:
        return None
    return settings.base_url + instance_url(instance_id)
