"""Typed application keys: what the app holds for its handlers."""

from __future__ import annotations

from aiohttp import web

from backup.database import Database
from backup.secrets import SecretBox
from broker.config import Settings

SETTINGS = web.AppKey("settings", Settings)
DATABASE = web.AppKey("database", Database)
SECRETS = web.AppKey("secrets", SecretBox)
REQUEST_ID = web.RequestKey("request_id", str)
