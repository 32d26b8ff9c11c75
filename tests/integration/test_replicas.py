"""Three manager replicas on one database, a real agent and real S3: the replica running a
backup is killed (``kill -9``) or stopped (SIGTERM) in the middle of it, and another replica
finishes it: the agent ran each item once, there is one restore point and nothing else in
storage."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backup.secrets import SecretBox, generate_master_key_spec, parse_master_keys
from backup.store import connect
from storage import S3Settings
from tests.agent.helpers import PASSWORD, USER, AgentProcess, tracing_scripts
from tests.integration.conftest import ManagerProcess
from tests.runner.conftest import seed_instance, until
from tests.servers.log_audit import audit_secret
from tests.servers.s3 import SeaweedS3

BROKER_USER, BROKER_PASSWORD = "replica-test", "replica-broker-PW-4417"
audit_secret(BROKER_PASSWORD)


def _call(m: ManagerProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    token = base64.b64encode(f"{BROKER_USER}:{BROKER_PASSWORD}".encode()).decode()
    req = urllib.request.Request(  # noqa: S310 - loopback
        m.url + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:  # noqa: S310
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
async def test_another_replica_finishes_the_backup_of_one_that_stopped(
    how: str,
    tmp_path: Path,
    mongo_url: str,
    s3_server: SeaweedS3,
    s3_settings: S3Settings,
    managers: Callable[..., list[ManagerProcess]],
) -> None:
    keys = generate_master_key_spec()
    audit_secret(keys)
    box = SecretBox(parse_master_keys(keys))
    database = f"replicas_{uuid.uuid4().hex[:10]}"
    store = connect(mongo_url, database)
    scripts = tmp_path / "scripts"
    tracing_scripts(
        scripts,
        backup_body='echo "backup $BACKUP_DATABASE" >> "$TRACE"; '
        '[ "$BACKUP_DATABASE" = orders ] && sleep 8; '
        'echo "$BACKUP_DATABASE data" > "$BACKUP_DIRECTORY/$BACKUP_FILENAME.txt"',
    )
    agent = AgentProcess(tmp_path / "agent", scripts).start()
    try:
        instance = await seed_instance(
            store, box, agent_url=f"http://127.0.0.1:{agent.port}", username=USER, password=PASSWORD
        )
        replicas = await asyncio.to_thread(
            managers,
            3,
            MONGODB_URL=mongo_url,
            MONGODB_DATABASE=database,
            BROKER_USERNAME=BROKER_USER,
            BROKER_PASSWORD=BROKER_PASSWORD,
            SECRETS_MASTER_KEYS=keys,
            RUNNER_LEASE_SECONDS="3",
            RUNNER_POLL_SECONDS="0.5",
            RUNNER_AGENT_POLL_MIN_SECONDS="0.2",
            RUNNER_AGENT_POLL_MAX_SECONDS="0.5",
        )
        base = f"/v1/service_instances/{instance['_id']}"
        status, dest = await asyncio.to_thread(
            _call,
            replicas[0],
            "POST",
            f"{base}/destinations",
            {
                "type": "S3",
                "name": "primary",
                "endpoint": s3_settings.endpoint,
                "bucket": s3_settings.bucket,
                "region": s3_settings.region,
                "access_key_id": s3_settings.access_key_id,
                "secret_access_key": s3_settings.secret_access_key.get_secret_value(),
                "addressing_style": "path",
            },
        )
        assert status == 201, dest
        status, plan = await asyncio.to_thread(
            _call,
            replicas[1],
            "POST",
            f"{base}/plans",
            {
                "name": "nightly",
                "destination_id": dest["id"],
                "frequency": "0 3 * * *",
                "timezone": "UTC",
                "retention": {"style": "FILES", "period": 7},
                "encryption": {"enabled": True},
            },
        )
        assert status == 201, plan
        status, job = await asyncio.to_thread(
            _call, replicas[2], "POST", f"{base}/plans/{plan['id']}/backups"
        )
        assert status == 202, job

        async def running() -> dict | None:
            doc = await store.jobs.find_one({"_id": job["id"], "status": "RUNNING"})
            started = "backup orders" in agent.trace_lines()
            return doc if doc and started else None

        held = await until(running, timeout=120, what="the backup to run on the agent")
        (holder,) = [m for m in replicas if f"-{m.pid}-" in held["lease_owner"]]
        if how == "kill -9":
            holder.kill()
        else:
            await asyncio.to_thread(holder.terminate)

        async def ended() -> dict | None:
            return await store.jobs.find_one(
                {"_id": job["id"], "status": {"$in": ["SUCCEEDED", "FAILED", "CANCELLED"]}}
            )

        done = await until(ended, timeout=180, what="another replica to finish the backup")
        assert done["status"] == "SUCCEEDED", done["reason"]
        assert done["attempts"] == 2 and done["lease_owner"] is None
        # the agent ran each item once: the new holder re-attached to the running one
        backups = [line for line in agent.trace_lines() if line.startswith("backup ")]
        assert backups == ["backup orders", "backup customers"]
        starts = [
            json.loads(line)
            for line in agent.logs().splitlines()
            if '"job_started"' in line and job["id"] in line
        ]
        assert sorted(e["job_id"] for e in starts) == [f"{job['id']}-0", f"{job['id']}-1"]
        points = await store.restore_points.find({"instance_id": instance["_id"]}).to_list()
        assert len(points) == 1 and points[0]["_id"] == job["id"]
        assert sorted(s3_server.keys(s3_settings.bucket)) == sorted(
            i["key"] for i in points[0]["items"]
        )
        survivors = [m for m in replicas if m is not holder]
        finished_by = [
            m
            for m in survivors
            if any(
                e.get("event") == "job_finished" and e.get("job_id") == job["id"]
                for e in m.log_events()
            )
        ]
        assert len(finished_by) == 1
        if how == "SIGTERM":
            assert any(e.get("event") == "lease_released" for e in holder.log_events())
    finally:
        agent.kill()
        await store.client.drop_database(database)
        await store.close()
