"""The service with the API's authentication configured against the UAA and Cloud Controller
stand-ins, plus helpers to seed instances and call the API."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from backup import jobs
from backup.pagination import now
from broker.api.routes import PREFIX, Operation
from tests.servers.broker import BROKER_PASSWORD, BROKER_USER, Service, start_service, stop_service
from tests.servers.cloud_controller import CloudController, cloud_controller  # noqa: F401
from tests.servers.seed import ITEMS, seed_instance
from tests.servers.uaa import Uaa, uaa  # noqa: F401


@dataclass
class Api:
    """A running service plus its stand-ins; requests default to the broker's Basic auth."""

    service: Service
    uaa: Uaa
    cc: CloudController

    @property
    def db(self) -> Any:
        return self.service.db

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
    """The id of a new instance as the OSB provision writes it (docs/data-model.md)."""
    doc = await seed_instance(store, instance_id=instance_id, state=state, items=items)
    return doc["_id"]


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


WEBHOOK_BODY = {
    "url": "https://127.0.0.1:9/hooks",
    "events": ["job.failed"],
    "secret": "seeded-webhook-Secret-0123",
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


ApiFactory = Callable[..., Awaitable[Api]]


@pytest.fixture
async def make_api(
    mongo_url: str,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    uaa: Uaa,  # noqa: F811
    cloud_controller: CloudController,  # noqa: F811
) -> AsyncIterator[ApiFactory]:
    """``await make_api(**env)``: a service with these settings (environment names) on top of
    the tests' defaults, against the test's stand-ins; every one is stopped at teardown."""
    started: list[Api] = []

    async def make(**env: str) -> Api:
        started.append(
            await start_api(mongo_url, tmp_path, monkeypatch, uaa, cloud_controller, **env)
        )
        return started[-1]

    yield make
    for a in started:
        await stop_service(a.service)


@pytest.fixture
async def api(make_api: ApiFactory) -> Api:
    return await make_api()


@pytest.fixture
async def instance(api: Api) -> str:
    return await add_instance(api.db)


@pytest.fixture
async def destination(api: Api, instance: str) -> dict[str, Any]:
    status, body = await api.call("POST", "/destinations", instance=instance, json=S3_BODY)
    assert status == 201, body
    return body


@pytest.fixture
async def plan(api: Api, instance: str, destination: dict[str, Any]) -> dict[str, Any]:
    """``instance``'s plan backing up nightly to ``destination``, created through the API."""
    status, body = await api.call(
        "POST", "/plans", instance=instance, json=plan_body(destination["id"])
    )
    assert status == 201, body
    return body


async def insert_job(api: Api, instance: str, **fields: Any) -> str:
    """A job document as the scheduler or runner writes it (every field of the data model)."""
    doc = jobs.new_job(
        instance_id=instance,
        type=fields.pop("type", "BACKUP"),
        plan_id=fields.pop("plan_id", "p"),
        destination_id=fields.pop("destination_id", "d"),
        trigger=fields.pop("trigger", "SCHEDULE"),
        items=fields.pop("items", [jobs.new_item("orders")]),
        compression=True,
        encryption={"enabled": False},
    )
    doc.update(fields)
    await api.db.jobs.insert_one(doc)
    return doc["_id"]


async def insert_restore_point(
    api: Api, instance: str, destination_id: str, plan_id: str, *, keys: list[str] | None = None
) -> str:
    """A restore point as the runner records it after a successful backup."""
    names = ITEMS if keys is None else keys
    at = now()
    point = {
        "_id": uuid.uuid4().hex,
        "instance_id": instance,
        "plan_id": plan_id,
        "destination_id": destination_id,
        "job_id": "j",
        "created_at": at,
        "expires_at": at + timedelta(days=7),
        "retention": {"style": "DAYS", "period": 7},
        "items": [
            {
                "name": n,
                "key": f"{n}.gz",
                "filename": f"{n}.gz",
                "size": 10,
                "stored_size": 5,
                "checksum": "sha256:00",
                "compression": "gzip",
                "encryption": None,
            }
            for n in names
        ],
        "agent": {"kind": "osb-backup-agent", "version": "1"},
        "state": "available",
        "secrets": {},
        "schema_version": 1,
    }
    await api.db.restore_points.insert_one(point)
    return point["_id"]


@dataclass
class Seeded:
    """One instance with one of everything, and the path parameters that name them."""

    instance: str
    ids: dict[str, str]

    def path(self, operation: Operation, **over: str) -> str:
        """``operation``'s path below the instance, its parameters filled in."""
        path = operation.path.removeprefix(PREFIX)
        for name in re.findall(r"{(\w+)}", path):
            path = path.replace("{" + name + "}", quote(over.get(name, self.ids[name]), safe=""))
        return path


async def seed(api: Api, instance: str | None = None) -> Seeded:
    instance = instance or await add_instance(api.db)
    status, dest = await api.call("POST", "/destinations", instance=instance, json=S3_BODY)
    assert status == 201, dest
    status, plan = await api.call(
        "POST", "/plans", instance=instance, json=plan_body(dest["id"], name="seeded")
    )
    assert status == 201, plan
    job = await insert_job(api, instance, plan_id=plan["id"], status="RUNNING")
    point = await insert_restore_point(api, instance, dest["id"], plan["id"])
    status, hook = await api.call("POST", "/webhooks", instance=instance, json=WEBHOOK_BODY)
    assert status == 201, hook
    ids = {
        "destination_id": dest["id"],
        "plan_id": plan["id"],
        "job_id": job,
        "restore_point_id": point,
        "webhook_id": hook["id"],
    }
    return Seeded(instance, ids)


def sample_body(operation: Operation, seeded: Seeded) -> Any:
    """A plausible body for ``operation`` (authorization is decided before it is read)."""
    if operation.body is None:
        return None
    return {
        "create_destination": {**S3_BODY, "name": "another"},
        "validate_new_destination": S3_BODY,
        "update_destination": {"bucket": "other-bucket"},
        "create_plan": plan_body(seeded.ids["destination_id"], name="another"),
        "update_plan": {"paused": True},
        "start_backup": {"plan_id": seeded.ids["plan_id"]},
        "start_restore": {"restore_point_id": seeded.ids["restore_point_id"]},
        "create_webhook": WEBHOOK_BODY,
        "update_webhook": {"enabled": False},
    }.get(operation.operation_id, {})
