"""Three manager replicas on one database, a real agent and real S3: the replica running a
backup is killed (``kill -9``) or stopped (SIGTERM) in the middle of it, and another replica
finishes it: the agent ran each item once, there is one restore point and nothing else in
storage."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from storage import S3Settings
from tests.agent.helpers import PASSWORD, USER, AgentProcess, tracing_scripts
from tests.runner.conftest import seed_instance, until
from tests.servers.managers import ManagerProcess, SharedDatabase
from tests.servers.s3 import SeaweedS3


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
async def test_another_replica_finishes_the_backup_of_one_that_stopped(
    how: str,
    tmp_path: Path,
    shared_database: SharedDatabase,
    s3_server: SeaweedS3,
    s3_settings: S3Settings,
    managers: Callable[..., list[ManagerProcess]],
) -> None:
    store, box = shared_database.db, shared_database.box
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
            **shared_database.env,
            RUNNER_LEASE_SECONDS="3",
            RUNNER_POLL_SECONDS="0.5",
            RUNNER_AGENT_POLL_MIN_SECONDS="0.2",
            RUNNER_AGENT_POLL_MAX_SECONDS="0.5",
        )
        base = f"/v1/service_instances/{instance['_id']}"
        dest = await replicas[0].create_s3_destination(instance["_id"], s3_settings)
        status, plan = await replicas[1].api(
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
        status, job = await replicas[2].api("POST", f"{base}/plans/{plan['id']}/backups")
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
            [*(i["key"] for i in points[0]["items"]), points[0]["manifest_key"]]
        )
        survivors = [m for m in replicas if m is not holder]
        finished_by = [m for m in survivors if m.logged("job_finished", job_id=job["id"])]
        assert len(finished_by) == 1
        if how == "SIGTERM":
            assert holder.logged("lease_released")
    finally:
        agent.kill()
