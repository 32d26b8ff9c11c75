"""Typed application keys: what the app holds for its handlers."""

from __future__ import annotations

from aiohttp import web

from backup.secrets import SecretBox
from backup.store import Store
from broker.config import Settings

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
SECRETS = web.AppKey("secrets", SecretBox)
REQUEST_ID = web.RequestKey("request_id", str)
