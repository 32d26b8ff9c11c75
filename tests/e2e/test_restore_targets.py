"""Restores into another database and into another instance (issue 17, part 3), end to end on
real servers: two instances registered through OSB, each with its own agent (a real process
running the PostgreSQL example scripts against this machine's PostgreSQL), an encrypted,
compressed backup of the first into the suite's SeaweedFS, then

- a restore into another database of the same instance (by the instance's binding key):
  the copy holds the backup's rows and the source database, changed since, is untouched;
- a restore into the second instance (by a caller that may manage both: the broker's
  credentials), after the first instance's agent is stopped, so that only the target's agent
  with the target's connection details can have done it: the target holds the backup's
  rows, the job is the target's, the restore point stays with its source.

The first instance's binding key cannot name the second instance (404, nothing queued).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from storage import S3Settings
from tests.agent.helpers import PASSWORD as AGENT_PASSWORD
from tests.agent.helpers import ROOT, USER, AgentProcess
from tests.e2e.test_full_stack import (
    DB_PASSWORD,
    ENCRYPTION_KEY,
    OSB,
    SERVICE_ID,
    STANDARD,
    Postgres,
    _destination,
    _require,
    _sh,
)
from tests.servers.broker import BROKER_PASSWORD, BROKER_USER, Service
from tests.servers.log_audit import audit_secret

BROKER = {"Authorization": aiohttp.encode_basic_auth(BROKER_USER, BROKER_PASSWORD)}


def _psql(sql: str, db: str) -> str:
    return _sh(
        "psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db,
        "-qAtX", "-v", "ON_ERROR_STOP=1", "-c", sql,
    )  # fmt: skip


def _rows(db: str) -> str:
    return _psql("select * from orders order by id", db)


class Calls:
    def __init__(self, service: Service) -> None:
        self.service = service

    async def call(
        self, method: str, path: str, headers: dict[str, str], **kw: Any
    ) -> tuple[int, Any]:
        async with self.service.http.request(
            method, self.service.url + path, headers=headers, **kw
        ) as r:
            return r.status, await r.json(content_type=None)

    async def provision(self, instance_id: str, agent: AgentProcess, items: list[str]) -> None:
        status, body = await self.call(
            "PUT",
            f"/v2/service_instances/{instance_id}?accepts_incomplete=true",
            {**OSB, **BROKER},
            json={
                "service_id": SERVICE_ID,
                "plan_id": STANDARD,
                "context": {"platform": "cloudfoundry", "organization_guid": "o"},
                "parameters": {
                    "agent": {
                        "url": f"http://127.0.0.1:{agent.port}",
                        "username": USER,
                        "password": AGENT_PASSWORD,
                    },
                    "database": {
                        "host": "127.0.0.1",
                        "port": 5432,
                        "username": "postgres",
                        "password": DB_PASSWORD,
                        "parameters": {"PGSSLMODE": "disable"},
                    },
                    "items": items,
                },
            },
        )
        assert status == 202, body
        deadline = time.monotonic() + 120
        while True:
            status, body = await self.call(
                "GET", f"/v2/service_instances/{instance_id}/last_operation", {**OSB, **BROKER}
            )
            assert status == 200, body
            if body["state"] != "in progress":
                assert body["state"] == "succeeded", body
                return
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.2)

    async def bind(self, instance_id: str) -> dict[str, str]:
        status, binding = await self.call(
            "PUT",
            f"/v2/service_instances/{instance_id}/service_bindings/app-{uuid.uuid4().hex[:8]}",
            {**OSB, **BROKER},
            json={"service_id": SERVICE_ID, "plan_id": STANDARD},
        )
        assert status == 201, binding
        key = binding["credentials"]["key"]
        audit_secret(key, "a binding key")
        return {"Authorization": f"Bearer {key}"}

    async def api(
        self, instance_id: str, method: str, path: str, auth: dict[str, str], **kw: Any
    ) -> tuple[int, Any]:
        return await self.call(method, f"/v1/service_instances/{instance_id}{path}", auth, **kw)

    async def job_done(self, instance_id: str, job_id: str, auth: dict[str, str]) -> Any:
        deadline = time.monotonic() + 300
        while True:
            status, job = await self.api(instance_id, "GET", f"/jobs/{job_id}", auth)
            assert status == 200, job
            if job["status"] not in ("QUEUED", "RUNNING"):
                return job
            assert time.monotonic() < deadline, job
            await asyncio.sleep(0.3)


async def test_restore_into_another_database_and_into_another_instance(
    service: Service, s3_settings: S3Settings, tmp_path: Path
) -> None:
    _require(5432, "postgresql")
    for secret in (DB_PASSWORD, ENCRYPTION_KEY):
        audit_secret(secret, "the restore-target test")
    source = Postgres()
    copy = f"{source.db}_copy"
    other = f"{source.db}_other"
    scripts = ROOT / "agent" / "examples" / "postgresql"
    agent_a = AgentProcess(tmp_path / "agent-a", scripts, secrets_via="fd").start()
    agent_b = AgentProcess(tmp_path / "agent-b", scripts, secrets_via="fd").start()
    source.create()
    for db in (copy, other):  # the restore script restores into an existing database
        _psql(f"create database {db}", "postgres")
    try:
        calls = Calls(service)
        a, b = str(uuid.uuid4()), str(uuid.uuid4())
        await calls.provision(a, agent_a, [source.db, copy])
        await calls.provision(b, agent_b, [other])
        key_a = await calls.bind(a)

        # An encrypted, compressed backup of the source database, by instance a's key.
        status, dest = await calls.api(
            a, "POST", "/destinations?validate=true", key_a, json=_destination(s3_settings)
        )
        assert status == 201, dest
        status, plan = await calls.api(
            a,
            "POST",
            "/plans",
            key_a,
            json={
                "name": "nightly",
                "destination_id": dest["id"],
                "items": [source.db],
                "frequency": "0 3 * * *",
                "timezone": "UTC",
                "retention": {"style": "FILES", "period": 3},
                "compression": True,
                "encryption": {"enabled": True, "key": ENCRYPTION_KEY},
            },
        )
        assert status == 201, plan
        backed_up = source.rows()
        status, job = await calls.api(a, "POST", "/backups", key_a, json={"plan_id": plan["id"]})
        assert status == 202, job
        job = await calls.job_done(a, job["id"], key_a)
        assert job["status"] == "SUCCEEDED", (job["reason"], job["items"])
        point = job["restore_point_id"]
        (stored,) = (await calls.api(a, "GET", f"/restore_points/{point}", key_a))[1]["items"]
        assert stored["encryption"] == "aes-256-gcm-stream-v1" and stored["compression"] == "zstd"

        # The source changes after the backup: a restore elsewhere must leave it as it is.
        source.sql("insert into orders values (900001, 'after the backup', 1.00)")
        changed = source.rows()
        assert changed != backed_up

        # 1. Into another database of the same instance.
        status, restore = await calls.api(
            a,
            "POST",
            "/restores",
            key_a,
            json={"restore_point_id": point, "items": [{"name": source.db, "target": copy}]},
        )
        assert status == 202, restore
        restore = await calls.job_done(a, restore["id"], key_a)
        assert restore["status"] == "SUCCEEDED", (restore["reason"], restore["items"])
        assert [(i["name"], i["target"]) for i in restore["items"]] == [(source.db, copy)]
        assert restore["items"][0]["encryption"] == "aes-256-gcm-stream-v1"
        assert _rows(copy) == backed_up
        assert source.rows() == changed

        # 2. Instance a's key cannot reach instance b: the same 404 as an unknown instance.
        into_b = {
            "restore_point_id": point,
            "target_instance_id": b,
            "items": [{"name": source.db, "target": other}],
        }
        status, body = await calls.api(a, "POST", "/restores", key_a, json=into_b)
        assert status == 404 and body["error"] == "instance_not_found", body
        status, body = await calls.api(
            a, "POST", "/restores", key_a, json={**into_b, "target_instance_id": str(uuid.uuid4())}
        )
        assert status == 404 and body["error"] == "instance_not_found", body
        # and an item b does not register is refused (the broker may manage both)
        status, body = await calls.api(
            a, "POST", "/restores", BROKER, json={**into_b, "items": [source.db]}
        )
        assert status == 400 and body["error"] == "unknown_item", body
        status, page = await calls.api(b, "GET", "/jobs", BROKER)
        assert status == 200 and page["total"] == 0, page

        # 3. Into instance b, by a caller that may manage both. Instance a's agent is stopped:
        # only b's agent, with b's database details, can run it.
        agent_a.stop()
        status, restore = await calls.api(a, "POST", "/restores", BROKER, json=into_b)
        assert status == 202, restore
        assert restore["source_instance_id"] == a
        restore = await calls.job_done(b, restore["id"], BROKER)
        assert restore["status"] == "SUCCEEDED", (restore["reason"], restore["items"])
        assert restore["restore_point_id"] == point and restore["agent"]["kind"] == "ours"
        assert [(i["name"], i["target"]) for i in restore["items"]] == [(source.db, other)]
        assert _rows(other) == backed_up
        assert source.rows() == changed and _rows(copy) == backed_up
        # The job is b's; the restore point stays a's.
        status, page = await calls.api(b, "GET", "/jobs", BROKER)
        assert [j["id"] for j in page["items"]] == [restore["id"]]
        status, page = await calls.api(a, "GET", "/jobs?type=RESTORE", BROKER)
        assert restore["id"] not in [j["id"] for j in page["items"]]
        status, kept = await calls.api(a, "GET", f"/restore_points/{point}", key_a)
        assert status == 200 and kept["state"] == "available", kept
        assert (await calls.api(b, "GET", f"/restore_points/{point}", BROKER))[0] == 404
    finally:
        agent_a.stop()
        agent_b.stop()
        source.cleanup()
        for db in (copy, other):
            _psql(f"drop database if exists {db} with (force)", "postgres")
