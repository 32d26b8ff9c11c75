"""Rendering the dashboard's pages: Jinja2 templates with HTML escaping always on (tenant
text, such as plan, destination and instance names, is hostile), and headers that keep each
page from being framed, cached or running any script."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

import jinja2
from aiohttp import web

from broker.dashboard.plots import human_bytes

_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("broker.dashboard", "templates"),
    autoescape=True,  # every template, whatever its file name
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _when(value: object) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S UTC")
    return "—" if value is None else str(value)


def _retention(retention: object) -> str:
    """A plan's retention in words: "14 days + 7 daily, 4 weekly; at least 3 good"."""

    def rule(name: str) -> Any:
        if isinstance(retention, dict):
            return retention.get(name)
        return getattr(retention, name, None)

    parts = []
    if rule("style") is not None:
        unit = {"DAYS": "days", "HOURS": "hours", "FILES": "latest backups"}.get(
            str(rule("style")), str(rule("style")).lower()
        )
        parts.append(f"{rule('period')} {unit}")
    counts = [f"{rule(n)} {n}" for n in ("daily", "weekly", "monthly", "yearly") if rule(n)]
    if counts:
        parts.append(", ".join(counts))
    text = " + ".join(parts) or "—"
    if rule("min_good"):
        text += f"; at least {rule('min_good')} good"
    return text


_ENVIRONMENT.filters["when"] = _when
_ENVIRONMENT.filters["retention"] = _retention


def _duration(seconds: object) -> str:
    """Seconds as people read them (26h, 90m, 2d)."""
    if not isinstance(seconds, int):
        return "—"
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length and seconds % length == 0:
            return f"{seconds // length}{unit}"
    return f"{seconds}s"


_ENVIRONMENT.filters["duration"] = _duration
_ENVIRONMENT.filters["bytes"] = lambda size: "—" if size is None else human_bytes(float(size))


def render(
    request: web.Request, template: str, *, status: int = 200, **values: Any
) -> web.Response:
    """The page, with a content security policy that allows this page's own style block only
    (no script at all: the pages work without one)."""
    nonce = secrets.token_urlsafe(16)
    values.setdefault("session", None)
    values.setdefault("may_manage", False)
    values.setdefault("instance", None)
    values.setdefault("live", False)
    html = _ENVIRONMENT.get_template(template).render(nonce=nonce, **values)
    response = web.Response(text=html, status=status, content_type="text/html")
    response.headers.update(
        {
            "Content-Security-Policy": (
                f"default-src 'none'; style-src 'nonce-{nonce}'; img-src 'self'; "
                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
            ),
            "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin",
            "Cache-Control": "no-store",
        }
    )
    return response
