"""Object lock through the runner, retention and deletes, against SeaweedFS (which enforces
S3 Object Lock): our agent uploads each backup locked until the point's expiry plus the
margin; the Go agent, which cannot, is refused; retention keeps a locked point (available,
restorable) and deletes it once the lock lapses, never reporting it deleted before."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from backup import jobs, restore_points
from backup.clock import ManualClock
from backup.database import Database, Document
from backup.errors import Conflict
from backup.retention import RetentionSweeper
from backup.secrets import SecretBox
from storage import ObjectLock, S3Settings, open_store
from storage.s3 import S3Store
from tests.agent.helpers import PASSWORD, USER, AgentProcess
from tests.runner.conftest import GoRig, RunnerFactory, final, seed_instance, seed_plan
from tests.servers.s3 import SeaweedS3
from tests.servers.seed import seed_destination
from tests.storage.test_object_lock import locked_bucket  # noqa: F401 - a fixture

BACKUP = 'printf "locked rows" > "$BACKUP_DIRECTORY/$BACKUP_FILENAME.txt"'


def locked(server: SeaweedS3, bucket: str, margin_days: int = 2) -> S3Settings:
    return server.settings(bucket, object_lock={"mode": "COMPLIANCE", "margin_days": margin_days})


async def test_our_agent_uploads_each_backup_locked_until_expiry_plus_margin(
    store: Database,
    box: SecretBox,
    make_agent: Callable[..., AgentProcess],
    make_runner: RunnerFactory,
    s3_server: SeaweedS3,
    locked_bucket: str,  # noqa: F811
) -> None:
    agent = make_agent(backup_body=BACKUP, restore_body="true")
    settings = locked(s3_server, locked_bucket)
    instance = await seed_instance(
        store, box, agent_url=f"http://127.0.0.1:{agent.port}", username=USER, password=PASSWORD
    )
    retention = {"style": "DAYS", "period": 3}
    plan = await seed_plan(store, box, instance, settings, items=["orders"], retention=retention)
    job = await jobs.start_backup(store, plan)
    runner = make_runner(clock=None, agent_poll_min_seconds=0.2, agent_poll_max_seconds=0.5)
    assert await runner.run_once() == 1
    done = await final(store, job["_id"])
    assert done["status"] == "SUCCEEDED", (done["reason"], done["items"])

    point = await store.restore_points.find_one({"_id": job["_id"]})
    started = done["started_at"].replace(tzinfo=UTC)
    expected = started + timedelta(days=3 + 2)
    until = point["locked_until"].replace(tzinfo=UTC)
    assert expected <= until < expected + timedelta(seconds=1)  # rounded up to the second
    assert point["expires_at"].replace(tzinfo=UTC) + timedelta(days=2) - until < timedelta(
        seconds=30
    )
    (item,) = point["items"]
    retention_of = s3_server.client().get_object_retention(Bucket=locked_bucket, Key=item["key"])
    assert retention_of["Retention"] == {"Mode": "COMPLIANCE", "RetainUntilDate": until}

    # Nobody can delete it now, not the user through the manager, not the manager's store.
    with pytest.raises(Conflict) as refused:
        await restore_points.delete(store, box, instance["_id"], point["_id"])
    assert refused.value.code == "restore_point_locked"
    assert until.isoformat() in refused.value.description
    assert (await store.restore_points.find_one({"_id": point["_id"]}))["state"] == "available"
    async with open_store(settings.model_copy(update={"prefix": ""})) as objects:
        assert isinstance(objects, S3Store)
        assert await objects.locked_until(item["key"]) == until
    assert s3_server.keys(locked_bucket) != []


async def test_the_go_agent_is_not_sent_a_backup_it_cannot_lock(
    go: GoRig,
    s3_server: SeaweedS3,
    locked_bucket: str,  # noqa: F811
) -> None:
    go.s3 = locked(s3_server, locked_bucket)
    _, _, job = await go.backup(items=["orders"])
    runner = go.make_runner()
    assert await runner.run_once() == 1
    done = await go.final(job["_id"])
    assert done["status"] == "FAILED"
    reason = done["items"][0].get("reason") or done["reason"]
    assert "the Go agent cannot write objects with S3 Object Lock" in reason, done
    assert sum(go.agent.starts.values()) == 0  # nothing reached the agent
    assert await go.db.restore_points.count_documents({}) == 0


# ------------------------------------------------------------------------- retention


async def _seed_locked(
    store: Database,
    box: SecretBox,
    now: datetime,
    settings: S3Settings,
    lock_seconds: list[float],
    recorded: list[datetime | None],
) -> list[Document]:
    """Points of one plan (FILES, 1: all but the newest expire), each with one object locked
    for ``lock_seconds`` (real time) and ``locked_until`` recorded as ``recorded`` says."""
    instance_id = str(uuid.uuid4())
    dest = await seed_destination(store, box, instance_id, settings)
    retention = {"style": "FILES", "period": 1}
    plan = {"_id": uuid.uuid4().hex, "instance_id": instance_id, "retention": retention}
    await store.plans.insert_one(plan)
    points = []
    async with open_store(settings) as objects:
        assert isinstance(objects, S3Store)
        for n, (seconds, until) in enumerate(zip(lock_seconds, recorded, strict=True)):
            key = f"{instance_id}/{plan['_id']}/file-{n}.dump"

            async def chunk() -> Any:
                yield b"locked"

            real = datetime.now(UTC) + timedelta(seconds=seconds)
            await objects.upload(key, chunk(), retain_until=real)
            point: Document = {
                "_id": uuid.uuid4().hex,
                "instance_id": instance_id,
                "plan_id": plan["_id"],
                "destination_id": dest["_id"],
                "job_id": f"job-{n}",
                "created_at": now - timedelta(hours=n),
                "expires_at": None,
                "retention": retention,
                "items": [{"name": "orders", "key": key, "size": 6, "stored_size": 6}],
                "state": "available",
                "secrets": {},
            }
            if until is not None:
                point["locked_until"] = until
            await store.restore_points.insert_one(point)
            points.append(point)
    return points


async def test_retention_keeps_a_locked_point_and_deletes_it_once_the_lock_lapses(
    store: Database,
    box: SecretBox,
    s3_server: SeaweedS3,
    locked_bucket: str,  # noqa: F811
) -> None:
    settings = locked(s3_server, locked_bucket, margin_days=0)
    # The manager's clock starts at the storage's (real) time: the server's locks run on it.
    now = datetime.now(UTC).replace(microsecond=0)
    clock = ManualClock(now)
    # job-1: recorded locked for a day (by the manager's clock); job-2: recorded as not
    # locked, but the storage holds it a few seconds (a lock longer than recorded).
    points = await _seed_locked(
        store, box, now, settings, [3600, 3600, 4], [None, now + timedelta(days=1), None]
    )
    sweeper = RetentionSweeper(store, box, clock=clock, storage_timeout=30)

    result = await sweeper.run_once()
    assert (result.deleted, result.skipped, result.failed) == (0, 2, 0)
    left = {p["job_id"]: p for p in await store.restore_points.find({}).to_list()}
    assert sorted(left) == ["job-0", "job-1", "job-2"]
    assert {p["state"] for p in left.values()} == {"available"}  # still restorable
    # The storage's date was recorded for the point it refused to delete.
    storage_date = left["job-2"]["locked_until"].replace(tzinfo=UTC)
    assert datetime.now(UTC) < storage_date < datetime.now(UTC) + timedelta(seconds=5)
    assert len(s3_server.keys(locked_bucket)) == 3  # nothing deleted, nothing hidden

    # A user's delete is refused with the date, and changes nothing.
    with pytest.raises(Conflict) as refused:
        await restore_points.delete(store, box, points[1]["instance_id"], points[1]["_id"])
    assert refused.value.code == "restore_point_locked"
    assert (now + timedelta(days=1)).isoformat() in refused.value.description

    # Once the storage's lock of job-2 lapses, the next sweep deletes it: all versions.
    wait = max(0.0, (storage_date - datetime.now(UTC)).total_seconds()) + 1.5
    await asyncio.sleep(wait)
    await clock.advance(wait + 5)  # the manager's clock too (it still said "locked")
    result = await sweeper.run_once()
    assert (result.deleted, result.skipped) == (1, 1)
    assert sorted(p["job_id"] for p in await store.restore_points.find({}).to_list()) == [
        "job-0",
        "job-1",
    ]
    listing = s3_server.client().list_object_versions(Bucket=locked_bucket)
    held = {v["Key"] for v in [*listing.get("Versions", []), *listing.get("DeleteMarkers", [])]}
    assert held == {p["items"][0]["key"] for p in points[:2]}

    # Past job-1's recorded date the manager tries, and the storage (locked an hour, in real
    # time) still refuses: the point stays, with the storage's date.
    await clock.advance(2 * 86400)
    result = await sweeper.run_once()
    assert (result.deleted, result.skipped, result.failed) == (0, 1, 0)
    kept = await store.restore_points.find_one({"job_id": "job-1"})
    assert kept["state"] == "available"
    assert kept["locked_until"].replace(tzinfo=UTC) > datetime.now(UTC) + timedelta(minutes=50)


# ------------------------------------------------------------------------- the lock date


def test_the_lock_date_is_the_expiry_plus_the_margin_rounded_up_to_the_second(
    s3_settings: S3Settings,
) -> None:
    from backup.object_lock import lock_until

    with_lock = s3_settings.model_copy(
        update={"object_lock": ObjectLock(mode="GOVERNANCE", margin_days=7)}
    )
    expiry = datetime(2026, 3, 29, 1, 30, 0, 250_000, tzinfo=UTC)
    assert lock_until(with_lock, expiry) == datetime(2026, 4, 5, 1, 30, 1, tzinfo=UTC)
    whole = expiry.replace(microsecond=0)
    assert lock_until(with_lock, whole) == whole + timedelta(days=7)
    naive = datetime(2026, 3, 29, 1, 30)  # as the database may hand dates back
    assert lock_until(with_lock, naive) == naive.replace(tzinfo=UTC) + timedelta(days=7)
    assert lock_until(s3_settings, expiry) is None  # no object lock asked for
