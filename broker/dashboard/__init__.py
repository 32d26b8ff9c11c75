"""The web dashboard (``/dashboard``): server-rendered pages for the users of one instance and
an operator's view of the fleet, signed in through the platform's UAA with the catalog's
``dashboard_client`` (docs/dashboard.md). It reuses the /v1 API's authorizer and the domain;
it has no API of its own."""

from __future__ import annotations

import json

from aiohttp import web

from broker.config import Settings
from broker.context import SETTINGS
from broker.dashboard.links import PREFIX, dashboard_url
from broker.dashboard.pages import ENDPOINTS, add_routes


def setup(app: web.Application) -> None:
    """Mount the dashboard under :data:`PREFIX` (after the API, whose authorizer it uses)."""
    from broker.osb import CATALOG  # set up before the dashboard

    catalog = app[CATALOG]
    catalog.body = catalog_body(catalog.body, app[SETTINGS])
    app[ENDPOINTS] = {}
    add_routes(app)


def catalog_body(body: bytes, settings: Settings) -> bytes:
    """The catalog served, its services' ``dashboard_client`` completed from the settings (the
    id, the secret and the redirect URI: none belongs in a file), or left out while the
    dashboard's sign-in is not configured (no secret)."""
    catalog = json.loads(body)
    secret = settings.dashboard_client_secret
    for service in catalog["services"]:
        if "dashboard_client" not in service:
            continue
        if secret is None:
            del service["dashboard_client"]
            continue
        service["dashboard_client"] = {
            "id": settings.dashboard_client_id,
            "secret": secret.get_secret_value(),
            "redirect_uri": f"{settings.base_url}{PREFIX}/callback",
        }
    return json.dumps(catalog, separators=(",", ":")).encode()


__all__ = ["PREFIX", "dashboard_url", "setup"]
