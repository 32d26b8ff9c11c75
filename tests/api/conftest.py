"""The service with the API's authentication configured against the UAA and Cloud Controller
stand-ins, plus helpers to seed instances and call the API."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from backup.pagination import now
from tests.servers.broker import BROKER_PASSWORD, BROKER_USER, Service, start_service, stop_service
from tests.servers.cloud_controller import CloudController, cloud_controller  # noqa: F401
from tests.servers.uaa import Uaa, uaa  # noqa: F401

ITEMS = ["orders", "customers"]


@dataclass
class Api:
    """A running service plus its stand-ins; requests default to the broker's Basic auth."""

    service: Service
    uaa: Uaa
    cc: CloudController

    @property
    def store(self) -> Any:
        return self.service.store

    def base(self, instance_id: str) -> str:
        return f"{self.service.url}/v1/service_instances/{instance_id}"

    async def call(
        self,
        method: str,
        path: str,
        *,
        instance: str | None = None,
        token: str | None = None,
        basic: tuple[str, str] | None = (BROKER_USER, BROKER_PASSWORD),
        **kw: Any,
    ) -> tuple[int, Any]:
        url = (self.base(instance) if instance is not None else self.service.url) + path
        headers = dict(kw.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        elif basic is not None and "Authorization" not in headers:
            headers["Authorization"] = aiohttp.encode_basic_auth(*basic)
        async with self.service.http.request(method, url, headers=headers, **kw) as r:
            body = await r.json(content_type=None) if r.status != 204 else None
            self.last_headers = r.headers
            return r.status, body


async def add_instance(
    store: Any, instance_id: str | None = None, *, state: str = "ready", items: list[str] = ITEMS
) -> str:
    """An instance document as the OSB provision writes it (docs/data-model.md)."""
    instance_id = instance_id or str(uuid.uuid4())
    at = now()
    await store.instances.insert_one(
        {
            "_id": instance_id,
            "service_id": "backup-service",
            "plan_id": "standard",
            "context": {"platform": "cloudfoundry", "organization_guid": "org", "space_guid": "sp"},
            "organization_guid": "org",
            "space_guid": "sp",
            "maintenance_info": None,
            "parameters": {},
            "agent": {"url": "http://127.0.0.1:1", "username": "agent"},
            "database": {"host": "127.0.0.1", "port": 5432, "username": "u", "parameters": {}},
            "items": list(items),
            "secrets": {},
            "delete_backups_on_deprovision": False,
            "state": state,
            "last_operation": None,
            "tombstone_expires_at": None,
            "created_at": at,
            "updated_at": at,
            "version": 1,
            "schema_version": 1,
        }
    )
    return instance_id


S3_BODY = {
    "type": "S3",
    "name": "primary",
    "endpoint": "127.0.0.1:9",
    "plain_http": True,
    "bucket": "backups",
    "access_key_id": "AKIA-test",
    "secret_access_key": "s3cr3t-value-XYZ",
}

SWIFT_BODY = {
    "type": "SWIFT",
    "name": "swift",
    "auth_url": "http://127.0.0.1:9/auth/v1.0",
    "auth_version": "1",
    "username": "test:tester",
    "password": "sw1ft-pass-QRS",
    "container": "backups",
}


def plan_body(destination_id: str, **over: Any) -> dict[str, Any]:
    return {
        "name": "nightly",
        "destination_id": destination_id,
        "frequency": "0 3 * * *",
        "timezone": "Europe/Berlin",
        "retention": {"style": "DAYS", "period": 7},
        **over,
    }


async def start_api(
    mongo_url: str,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    stand_in: Uaa,
    cc: CloudController,
    **env: str,
) -> Api:
    monkeypatch.setenv("OIDC_ISSUER", stand_in.issuer)
    monkeypatch.setenv("OIDC_AUDIENCE", "backup_manager")
    monkeypatch.setenv("CLOUD_CONTROLLER_URL", cc.url)
    monkeypatch.setenv("OPERATOR_SCOPE", "backup_manager.admin")
    monkeypatch.setenv("JWKS_MIN_REFRESH_SECONDS", "0")
    monkeypatch.setenv("MIN_PLAN_INTERVAL_SECONDS", "3600")
    monkeypatch.setenv("JOB_LOG_MAX_BYTES", "1024")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Api(await start_service(mongo_url, tmp_path), stand_in, cc)


@pytest.fixture
async def api(
    mongo_url: str,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    uaa: Uaa,  # noqa: F811
    cloud_controller: CloudController,  # noqa: F811
) -> AsyncIterator[Api]:
    a = await start_api(mongo_url, tmp_path, monkeypatch, uaa, cloud_controller)
    yield a
    await stop_service(a.service)


@pytest.fixture
async def instance(api: Api) -> str:
    return await add_instance(api.store)


@pytest.fixture
async def destination(api: Api, instance: str) -> dict[str, Any]:
    status, body = await api.call("POST", "/destinations", instance=instance, json=S3_BODY)
    assert status == 201, body
    return body
