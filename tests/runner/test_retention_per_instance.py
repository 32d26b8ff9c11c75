"""Retention decides about a plan's own points only. An import that maps a source instance to
another keeps each point's plan id, so another instance can hold points naming a plan of an
instance still registered here: those must neither count for that plan's rules (its own older
points deleted because the other instance's copies are newer) nor be deleted by them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from backup.clock import ManualClock
from backup.database import Database
from backup.retention import RetentionSweeper
from backup.retention import preview as retention_preview
from backup.secrets import SecretBox
from storage import S3Settings, open_store
from tests.servers.seed import seed_destination

NOW = datetime(2026, 3, 29, 12, 0, tzinfo=UTC)


async def test_points_of_another_instance_naming_a_plan_are_not_the_plans(
    store: Database, box: SecretBox, s3_settings: S3Settings
) -> None:
    instance_a, instance_b = str(uuid.uuid4()), str(uuid.uuid4())
    dest_a = await seed_destination(store, box, instance_a, s3_settings)
    dest_b = await seed_destination(store, box, instance_b, s3_settings)
    retention = {"style": "FILES", "period": 1}
    plan = {"_id": uuid.uuid4().hex, "instance_id": instance_a, "retention": retention}
    await store.plans.insert_one(plan)
    owners = [(instance_a, dest_a, 2), (instance_b, dest_b, 1)]  # B's copy is the newer
    async with open_store(s3_settings) as objects:
        for n, (instance_id, dest, hours) in enumerate(owners):
            key = f"{instance_id}/{plan['_id']}/file-{n}.dump"

            async def chunk() -> object:
                yield b"x"

            await objects.upload(key, chunk())
            await store.restore_points.insert_one(
                {
                    "_id": f"point-{n}",
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
            )
    result = await RetentionSweeper(store, box, clock=ManualClock(NOW)).run_once()
    assert result.deleted == 0, result
    left = sorted(p["_id"] for p in await store.restore_points.find({}).to_list())
    assert left == ["point-0", "point-1"]
    # the preview (and a change's confirmation check) of A's plan sees A's points only
    decisions = await retention_preview(store, plan, NOW)
    assert [d.point["_id"] for d in decisions] == ["point-0"]
