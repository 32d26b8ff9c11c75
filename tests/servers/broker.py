"""The service under test, in-process on the test session's loop, on a fresh database."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from backup.secrets import generate_master_key_spec
from backup.store import Store, connect
from broker.app import create_app
from broker.background import LOOPS_ENABLED
from broker.config import Settings, load_settings

BROKER_USER = "test-broker"
BROKER_PASSWORD = "broker-pw-Zq8Vx3"  # the log-grep test looks for this
OSB_HEADERS = {"X-Broker-API-Version": "2.17"}


@dataclass
class Service:
    """A running service: its base URL, settings, store and an HTTP session."""

    url: str
    settings: Settings
    store: Store
    http: aiohttp.ClientSession
    server: TestServer

    @property
    def broker_auth(self) -> aiohttp.BasicAuth:
        return aiohttp.BasicAuth(BROKER_USER, BROKER_PASSWORD)

    async def osb(self, method: str, path: str, **kw: Any) -> aiohttp.ClientResponse:
        headers = {**OSB_HEADERS, **kw.pop("headers", {})}
        return await self.http.request(
            method, self.url + path, auth=kw.pop("auth", self.broker_auth), headers=headers, **kw
        )


async def start_service(
    mongo_url: str,
    tmp_path: Any,
    database: str | None = None,
    *,
    background: bool = False,
    **overrides: Any,
) -> Service:
    """``background``: run the scheduler, job runner and retention sweep too (off by default,
    so that jobs a test queues stay QUEUED)."""
    settings = load_settings(
        MONGODB_URL=mongo_url,
        MONGODB_DATABASE=database or f"t_{uuid.uuid4().hex[:12]}",
        BROKER_USERNAME=BROKER_USER,
        BROKER_PASSWORD=BROKER_PASSWORD,
        SECRETS_MASTER_KEYS=overrides.pop("SECRETS_MASTER_KEYS", generate_master_key_spec()),
        DATA_DIR=str(tmp_path),
        **overrides,
    )
    store = connect(mongo_url, settings.mongodb_database)
    app = create_app(settings, store=store)
    app[LOOPS_ENABLED] = background
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    settings.public_url = url
    return Service(url, settings, store, aiohttp.ClientSession(), server)


async def stop_service(service: Service) -> None:
    await service.http.close()
    await service.server.close()
    await service.store.close()


@pytest.fixture
async def service(mongo_url: str, tmp_path: Any) -> AsyncIterator[Service]:
    """A fresh service on its own database, for one test."""
    svc = await start_service(mongo_url, tmp_path)
    yield svc
    await stop_service(svc)
