"""The service under test, in-process on the test session's loop, on a fresh database."""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from aiohttp.web import Application

from backup.database import Database, connect
from backup.instances import Instances
from backup.secrets import generate_master_key_spec
from broker.app import create_app
from broker.config import Settings, load_settings
from storage.egress import DEFAULT_DENY, networks_except
from tests.servers.log_audit import audit_secret

BROKER_USER = "test-broker"
BROKER_PASSWORD = "broker-pw-Zq8Vx3"  # the log audit looks for it (tests/servers/log_audit.py)
OSB_HEADERS = {"X-Broker-API-Version": "2.17"}
TEST_EGRESS = {"EGRESS_DENY_NETWORKS": ",".join(networks_except(DEFAULT_DENY, "127.0.0.1"))}
"""The egress policy of the services under test: the default deny list except 127.0.0.1, where
the test servers (agents, S3, Swift) listen; 127.0.0.2 and ::1 stay denied for attack tests."""

audit_secret(BROKER_PASSWORD, "tests.servers.broker.BROKER_PASSWORD")
audit_secret(
    base64.b64encode(f"{BROKER_USER}:{BROKER_PASSWORD}".encode()).decode(),
    "the broker's Basic authorization header",
)


@dataclass
class Service:
    """A running service: its base URL, settings, store and an HTTP session."""

    url: str
    settings: Settings
    db: Database
    http: aiohttp.ClientSession
    server: TestServer

    @property
    def app(self) -> Application:
        assert self.server.app is not None
        return self.server.app

    @property
    def instances(self) -> Instances:
        """The OSB operation worker of this service (``await .idle()`` waits for it)."""
        from broker.osb import INSTANCES

        return self.app[INSTANCES]

    @property
    def broker_auth(self) -> aiohttp.BasicAuth:
        return aiohttp.BasicAuth(BROKER_USER, BROKER_PASSWORD)

    async def osb(self, method: str, path: str, **kw: Any) -> aiohttp.ClientResponse:
        """An OSB request with the version header and the broker's credentials; ``auth=None``
        sends none, ``auth=(user, password)`` others."""
        headers = {**OSB_HEADERS, **kw.pop("headers", {})}
        auth = kw.pop("auth", (BROKER_USER, BROKER_PASSWORD))
        if isinstance(auth, aiohttp.BasicAuth):
            auth = (auth.login, auth.password)
        if auth is not None and "Authorization" not in headers:
            headers["Authorization"] = aiohttp.encode_basic_auth(*auth)
        return await self.http.request(method, self.url + path, headers=headers, **kw)


async def start_service(
    mongo_url: str,
    tmp_path: Any,
    database: str | None = None,
    *,
    loops: bool = False,
    **overrides: Any,
) -> Service:
    """Start the service on ``database`` (default: a fresh one). ``overrides`` are settings by
    environment name (``AGENT_PROBE_TIMEOUT_SECONDS=5``...). The scheduler, runner and
    retention loops run only with ``loops=True``. The egress policy is :data:`TEST_EGRESS`
    unless given (here or in the environment)."""
    if "EGRESS_DENY_NETWORKS" not in os.environ:  # a test may set its own (monkeypatch)
        overrides = {**TEST_EGRESS, **overrides}
    master_keys = overrides.pop("SECRETS_MASTER_KEYS", None) or generate_master_key_spec()
    # Tests of refusals send many wrong credentials from one address; the throttle has its
    # own tests (tests/api/test_http_hardening.py), which set a small limit.
    if "AUTH_FAILURE_LIMIT" not in os.environ:
        overrides.setdefault("AUTH_FAILURE_LIMIT", 100_000)
    for spec in master_keys.split(","):
        audit_secret(spec.partition(":")[2].strip(), "a master key of start_service")
    settings = load_settings(
        MONGODB_URL=mongo_url,
        MONGODB_DATABASE=database or f"t_{uuid.uuid4().hex[:12]}",
        BROKER_USERNAME=BROKER_USER,
        BROKER_PASSWORD=BROKER_PASSWORD,
        SECRETS_MASTER_KEYS=master_keys,
        DATA_DIR=str(tmp_path),
        **overrides,
    )
    store = connect(mongo_url, settings.mongodb_database)
    app = create_app(settings, store=store, run_background=loops)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    settings.public_url = url
    return Service(url, settings, store, aiohttp.ClientSession(), server)


async def stop_service(service: Service) -> None:
    await service.http.close()
    await service.server.close()
    await service.db.close()


@pytest.fixture
async def service(mongo_url: str, tmp_path: Any) -> AsyncIterator[Service]:
    """A fresh service on its own database, for one test."""
    svc = await start_service(mongo_url, tmp_path)
    yield svc
    await stop_service(svc)
