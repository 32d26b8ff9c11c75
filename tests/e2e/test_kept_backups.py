"""Backups kept after a deprovision stay restorable (issue 18, "After deprovision"), end to end:
an encrypted, compressed backup of a PostgreSQL database (this machine's server, our agent as
a process, SeaweedFS), the instance deprovisioned through OSB keeping its backups, its restore
point then listed by an operator as orphaned and restored into another instance's database,
whose rows are then those of the backup. The deprovisioned instance's agent is stopped first,
so only the target's agent, with the target's connection details, can have done it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from storage import S3Settings
from tests.agent.helpers import ROOT, AgentProcess
from tests.e2e.test_full_stack import (
    DB_PASSWORD,
    ENCRYPTION_KEY,
    OSB,
    SERVICE_ID,
    STANDARD,
    Postgres,
    _destination,
    _require,
)
from tests.e2e.test_restore_targets import BROKER, Calls, _psql, _rows
from tests.servers.broker import Service
from tests.servers.log_audit import audit_secret


async def _deprovision(calls: Calls, instance_id: str) -> str:
    status, body = await calls.call(
        "DELETE",
        f"/v2/service_instances/{instance_id}"
        f"?service_id={SERVICE_ID}&plan_id={STANDARD}&accepts_incomplete=true",
        {**OSB, **BROKER},
    )
    assert status in (200, 202), body
    deadline = time.monotonic() + 120
    while True:
        status, body = await calls.call(
            "GET", f"/v2/service_instances/{instance_id}/last_operation", {**OSB, **BROKER}
        )
        if status == 200 and body["state"] != "in progress":
            assert body["state"] == "succeeded", body
            return str(body.get("description", ""))
        assert status in (200, 410) and time.monotonic() < deadline, body
        if status == 410:
            return ""
        await asyncio.sleep(0.2)


async def test_a_kept_backup_is_restored_into_another_instance_after_deprovision(
    service: Service, s3_settings: S3Settings, tmp_path: Path
) -> None:
    _require(5432, "postgresql")
    for secret in (DB_PASSWORD, ENCRYPTION_KEY):
        audit_secret(secret, "the kept-backups test")
    source = Postgres()
    other = f"{source.db}_other"
    scripts = ROOT / "agent" / "examples" / "postgresql"
    agent_a = AgentProcess(tmp_path / "agent-a", scripts, secrets_via="fd").start()
    agent_b = AgentProcess(tmp_path / "agent-b", scripts, secrets_via="fd").start()
    source.create()
    _psql(f"create database {other}", "postgres")  # the restore script needs it to exist
    try:
        calls = Calls(service)
        a, b = str(uuid.uuid4()), str(uuid.uuid4())
        await calls.provision(a, agent_a, [source.db])
        await calls.provision(b, agent_b, [other])
        key_a = await calls.bind(a)
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
                "retention": {"style": "DAYS", "period": 30},
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

        # The platform deletes instance a; its backups are kept (the default).
        agent_a.stop()
        description = await _deprovision(calls, a)
        assert "1 restore point(s) were kept" in description, description

        # The point is an operator's now: listed as orphaned, with its key and its retention.
        status, page = await calls.call(
            "GET", f"/v1/orphaned_restore_points?instance_id={a}", BROKER
        )
        assert status == 200 and [p["id"] for p in page["items"]] == [point], page
        (kept,) = page["items"]
        assert kept["orphaned"]["instance_id"] == a and kept["encryption_key_set"], kept
        assert kept["retention"] == {"style": "DAYS", "period": 30}
        assert kept["expires_at"] is not None
        # A key of the deleted instance reaches nothing any more.
        status, _ = await calls.api(a, "GET", f"/restore_points/{point}", key_a)
        assert status in (401, 404)

        # Restored into instance b's database, by b's agent.
        status, restore = await calls.call(
            "POST",
            f"/v1/orphaned_restore_points/{point}/restores",
            BROKER,
            json={"target_instance_id": b, "items": [{"name": source.db, "target": other}]},
        )
        assert status == 202, restore
        assert restore["source_instance_id"] == a and restore["restore_point_id"] == point
        restore = await calls.job_done(b, restore["id"], BROKER)
        assert restore["status"] == "SUCCEEDED", (restore["reason"], restore["items"])
        assert restore["items"][0]["encryption"] == "aes-256-gcm-stream-v1"
        assert _rows(other) == backed_up

        # Still kept (a restore reads it, it does not consume it).
        status, again = await calls.call("GET", f"/v1/orphaned_restore_points/{point}", BROKER)
        assert status == 200 and again["state"] == "available", again
    finally:
        agent_a.stop()
        agent_b.stop()
        source.cleanup()
        _psql(f"drop database if exists {other} with (force)", "postgres")
