"""A running or queued restore drill reads its restore point's files, as a restore does: the
retention sweep must not delete that point under it (an older point drilled by hand would
otherwise be deleted while the drill downloads it)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from backup import jobs
from backup.clock import ManualClock
from backup.database import Database
from backup.retention import RetentionSweeper
from backup.secrets import SecretBox
from storage import S3Settings, open_store
from tests.servers.seed import seed_destination

NOW = datetime(2026, 3, 29, 12, 0, tzinfo=UTC)


async def test_a_point_being_drilled_is_kept_until_the_drill_ends(
    store: Database, box: SecretBox, s3_settings: S3Settings
) -> None:
    instance_id = str(uuid.uuid4())
    dest = await seed_destination(store, box, instance_id, s3_settings)
    retention = {"style": "FILES", "period": 1}
    plan = {
        "_id": uuid.uuid4().hex,
        "instance_id": instance_id,
        "destination_id": dest["_id"],
        "retention": retention,
    }
    await store.plans.insert_one(plan)
    points = []
    async with open_store(s3_settings) as objects:
        for n, hours in enumerate([1, 2]):
            key = f"{instance_id}/{plan['_id']}/file-{n}.dump"

            async def chunk() -> object:
                yield b"x"

            await objects.upload(key, chunk())
            point = {
                "_id": uuid.uuid4().hex,
                "instance_id": instance_id,
                "plan_id": plan["_id"],
                "destination_id": dest["_id"],
                "job_id": f"job-{n}",
                "created_at": NOW - timedelta(hours=hours),
                "expires_at": None,
                "retention": retention,
                "items": [{"name": "orders", "key": key, "size": 1, "stored_size": 1}],
                "state": "available",
                "secrets": {},
            }
            await store.restore_points.insert_one(point)
            points.append(point)
    older = points[1]
    drill = await jobs.start_drill(store, plan, older)
    sweeper = RetentionSweeper(store, box, clock=ManualClock(NOW))
    result = await sweeper.run_once()
    assert (result.deleted, result.skipped) == (0, 1)
    kept = await store.restore_points.find_one({"_id": older["_id"]})
    assert kept is not None and kept["state"] == "available"
    await store.jobs.update_one({"_id": drill["_id"]}, {"$set": {"status": "SUCCEEDED"}})
    assert (await sweeper.run_once()).deleted == 1
