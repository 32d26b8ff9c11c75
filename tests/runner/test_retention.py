"""Retention: the arithmetic (manual clock), and the sweep against real S3, including the
storage being down while it deletes."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from backup import jobs
from backup.clock import ManualClock
from backup.database import Database
from backup.retention import RetentionSweeper, expires_at, select_expired
from backup.runner import JobRunner, load_runner_settings
from backup.secrets import SecretBox
from storage import S3Settings
from tests.servers.s3 import SeaweedS3
from tests.servers.seed import seed_destination

NOW = datetime(2026, 3, 29, 12, 0, tzinfo=UTC)


def _points(*ages: timedelta) -> list[dict]:
    return [{"_id": f"p{n}", "created_at": NOW - age} for n, age in enumerate(ages)]


def _ids(points: list[dict]) -> list[str]:
    return sorted(p["_id"] for p in points)


def test_expiry_by_age() -> None:
    at = datetime(2026, 3, 28, 1, 30, tzinfo=UTC)  # the night Europe's clocks go forward
    assert expires_at({"style": "DAYS", "period": 2}, at) == at + timedelta(hours=48)
    assert expires_at({"style": "HOURS", "period": 5}, at) == at + timedelta(hours=5)
    assert expires_at({"style": "FILES", "period": 5}, at) is None
    assert expires_at(None, at) is None


@pytest.mark.parametrize(
    ("retention", "ages", "expired"),
    [
        # DAYS: expired at exactly created + period; younger ones stay
        (
            {"style": "DAYS", "period": 7},
            [timedelta(days=1), timedelta(days=7), timedelta(days=6, hours=23), timedelta(days=9)],
            ["p1", "p3"],
        ),
        (
            {"style": "HOURS", "period": 6},
            [timedelta(hours=1), timedelta(hours=5, minutes=59), timedelta(hours=6, seconds=1)],
            ["p2"],
        ),
        # the newest is kept even when it expired (a plan whose backups now fail)
        ({"style": "DAYS", "period": 1}, [timedelta(days=30), timedelta(days=40)], ["p1"]),
        ({"style": "HOURS", "period": 1}, [timedelta(days=30)], []),
        # FILES: the newest `period` stay, whatever their age
        (
            {"style": "FILES", "period": 3},
            [timedelta(hours=h) for h in (5, 1, 4, 2, 3)],
            ["p0", "p2"],
        ),
        ({"style": "FILES", "period": 1}, [timedelta(hours=h) for h in (2, 1, 3)], ["p0", "p2"]),
        ({"style": "FILES", "period": 10}, [timedelta(hours=h) for h in (2, 1, 3)], []),
        (None, [timedelta(days=400), timedelta(days=500)], []),
    ],
)
def test_select_expired(retention: dict | None, ages: list[timedelta], expired: list[str]) -> None:
    assert _ids(select_expired(_points(*ages), retention, NOW)) == expired


def test_ties_on_created_at_are_ordered_by_id() -> None:
    same = [{"_id": f"p{n}", "created_at": NOW} for n in range(4)]
    assert _ids(select_expired(same, {"style": "FILES", "period": 2}, NOW)) == ["p0", "p1"]


# ------------------------------------------------------------------------- the sweep


async def _seed(
    store: Database, box: SecretBox, s3: S3Settings, ages_hours: list[int], retention: dict
) -> tuple[dict, dict, list[dict]]:
    from storage import open_store

    instance_id = str(uuid.uuid4())
    dest = await seed_destination(store, box, instance_id, s3)
    plan = {"_id": uuid.uuid4().hex, "instance_id": instance_id, "retention": retention}
    await store.plans.insert_one(plan)
    points = []
    async with open_store(s3) as objects:
        for n, hours in enumerate(ages_hours):
            key = f"{instance_id}/{plan['_id']}/file-{n}.dump"

            async def chunk(n: int = n):
                yield b"x" * (n + 1)

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
                "items": [{"name": "orders", "key": key, "size": n + 1, "stored_size": n + 1}],
                "state": "available",
                "secrets": {},
            }
            await store.restore_points.insert_one(point)
            points.append(point)
    return dest, plan, points


async def _left(store: Database) -> list[str]:
    return sorted(p["job_id"] for p in await store.restore_points.find({}).to_list())


async def test_sweep_deletes_files_then_records(
    store: Database, box: SecretBox, s3_server: SeaweedS3, s3_settings: S3Settings
) -> None:
    clock = ManualClock(NOW)
    _, plan, points = await _seed(
        store, box, s3_settings, [1, 30, 50, 80], {"style": "DAYS", "period": 2}
    )
    sweeper = RetentionSweeper(store, box, clock=clock, storage_timeout=30)
    result = await sweeper.run_once()
    assert (result.deleted, result.failed, result.deleted_bytes) == (2, 0, 3 + 4)
    assert await _left(store) == ["job-0", "job-1"]
    assert sorted(s3_server.keys(s3_settings.bucket)) == sorted(
        p["items"][0]["key"] for p in points[:2]
    )
    kept = await store.restore_points.find_one({"job_id": "job-1"})
    assert kept["expires_at"] == kept["created_at"] + timedelta(days=2)
    # a shorter retention applies to the points already there, but never to the newest
    await store.plans.update_one(
        {"_id": plan["_id"]}, {"$set": {"retention": {"style": "HOURS", "period": 1}}}
    )
    await clock.advance(3600 * 24 * 30)
    result = await sweeper.run_once()
    assert result.deleted == 1 and await _left(store) == ["job-0"]
    assert s3_server.keys(s3_settings.bucket) == [points[0]["items"][0]["key"]]


async def test_a_plan_gone_keeps_following_its_recorded_retention(
    store: Database, box: SecretBox, s3_settings: S3Settings
) -> None:
    _, plan, _ = await _seed(store, box, s3_settings, [1, 2, 3], {"style": "FILES", "period": 2})
    await store.plans.delete_one({"_id": plan["_id"]})
    result = await RetentionSweeper(store, box, clock=ManualClock(NOW)).sweep_plan(plan["_id"])
    assert result.deleted == 1 and await _left(store) == ["job-0", "job-1"]


async def test_a_point_being_restored_is_kept_until_the_restore_ends(
    store: Database, box: SecretBox, s3_settings: S3Settings
) -> None:
    _, _, points = await _seed(store, box, s3_settings, [1, 2], {"style": "FILES", "period": 1})
    restore = await jobs.start_restore(store, points[1], None)
    sweeper = RetentionSweeper(store, box, clock=ManualClock(NOW))
    result = await sweeper.run_once()
    assert (result.deleted, result.skipped) == (0, 1)
    assert (await store.restore_points.find_one({"_id": points[1]["_id"]}))["state"] == "available"
    await store.jobs.update_one({"_id": restore["_id"]}, {"$set": {"status": "SUCCEEDED"}})
    assert (await sweeper.run_once()).deleted == 1


async def test_storage_down_during_retention_keeps_the_record_for_the_next_sweep(
    store: Database, box: SecretBox, s3_private_server: SeaweedS3
) -> None:
    s3 = s3_private_server.settings()
    _, _, points = await _seed(store, box, s3, [1, 2, 3], {"style": "FILES", "period": 1})
    s3_private_server.stop()
    sweeper = RetentionSweeper(store, box, clock=ManualClock(NOW), storage_timeout=20)
    result = await sweeper.run_once()
    assert (result.deleted, result.failed) == (0, 2)
    states = {p["job_id"]: p["state"] for p in await store.restore_points.find({}).to_list()}
    assert states == {"job-0": "available", "job-1": "deleting", "job-2": "deleting"}
    s3_private_server.start()
    assert len(s3_private_server.keys(s3.bucket)) == 3  # nothing was lost meanwhile
    result = await sweeper.run_once()
    assert (result.deleted, result.failed) == (2, 0)
    assert await _left(store) == ["job-0"]
    assert s3_private_server.keys(s3.bucket) == [points[0]["items"][0]["key"]]


async def test_pinned_points_stay_even_when_pinned_while_the_sweep_runs(
    store: Database, box: SecretBox, s3_server: SeaweedS3, s3_settings: S3Settings
) -> None:
    _, _, points = await _seed(
        store, box, s3_settings, [1, 2, 3, 4], {"style": "FILES", "period": 1}
    )
    await store.restore_points.update_one(
        {"_id": points[3]["_id"]}, {"$set": {"pinned": True, "pin_reason": "audit"}}
    )

    class PinDuringSweep(RetentionSweeper):
        """A user pins a point after the sweep read the plan's points, before it deletes."""

        async def _align_expiry(self, seen: list[dict], retention: dict[str, Any]) -> None:
            await store.restore_points.update_one(
                {"_id": points[2]["_id"]}, {"$set": {"pinned": True, "pin_reason": "late"}}
            )
            await super()._align_expiry(seen, retention)

    result = await PinDuringSweep(store, box, clock=ManualClock(NOW)).run_once()
    assert (result.deleted, result.failed) == (1, 0), result
    assert await _left(store) == ["job-0", "job-2", "job-3"]
    kept = {p["items"][0]["key"] for p in points if p["job_id"] != "job-1"}
    assert set(s3_server.keys(s3_settings.bucket)) == kept


async def test_an_object_two_points_name_is_deleted_with_the_last_of_them(
    store: Database, box: SecretBox, s3_server: SeaweedS3, s3_settings: S3Settings
) -> None:
    """The Go agent on Swift ignores the prefix and names files by the minute: two backups
    may share one object. Retention must not delete it under the newer point."""
    _, _, points = await _seed(store, box, s3_settings, [1, 2], {"style": "FILES", "period": 1})
    shared = points[0]["items"][0]["key"]
    await store.restore_points.update_one(
        {"_id": points[1]["_id"]}, {"$set": {"items.0.key": shared}}
    )
    await store.restore_points.update_many({}, {"$set": {"agent": {"kind": "go"}}})
    sweeper = RetentionSweeper(store, box, clock=ManualClock(NOW))
    assert (await sweeper.run_once()).deleted == 1
    assert await _left(store) == ["job-0"]
    assert shared in s3_server.keys(s3_settings.bucket)


# ------------------------------------------------------------------------- job history


async def _job(store: Database, status: str, ended_days_ago: float | None, **fields: object) -> str:
    doc = jobs.new_job(
        instance_id="instance-h",
        type=jobs.JobType.BACKUP,
        plan_id=str(fields.pop("plan_id", "plan-h")),
        destination_id="dest-h",
        trigger=jobs.Trigger.SCHEDULE,
        items=[jobs.new_item("orders")],
        compression=True,
        encryption={"enabled": False},
        status=status,
    )
    doc["created_at"] = NOW - timedelta(days=(ended_days_ago or 0) + 1)
    doc["ended_at"] = None if ended_days_ago is None else NOW - timedelta(days=ended_days_ago)
    doc.update(fields)
    await store.jobs.insert_one(doc)
    return doc["_id"]


async def test_the_sweep_prunes_old_job_records_but_keeps_what_still_matters(
    store: Database, box: SecretBox
) -> None:
    closed = S3Settings(  # storage that is down: the failed job's file stays to be deleted
        endpoint="http://127.0.0.1:9", bucket="bkt", access_key_id="a", secret_access_key="s"
    )
    dest = await seed_destination(store, box, "instance-h", closed)
    pruned = [
        await _job(store, jobs.JobStatus.SUCCEEDED, 91),
        await _job(store, jobs.JobStatus.FAILED, 400),
        await _job(store, jobs.JobStatus.MISSED, 90.01),
        await _job(store, jobs.JobStatus.CANCELLED, 200),
    ]
    kept = [
        await _job(store, jobs.JobStatus.SUCCEEDED, 89.9),  # younger than the history
        await _job(store, jobs.JobStatus.RUNNING, None, created_at=NOW - timedelta(days=300)),
        await _job(store, jobs.JobStatus.QUEUED, None, created_at=NOW - timedelta(days=300)),
        # its uploaded file still waits to be deleted: the record leads the sweep to it
        await _job(
            store,
            jobs.JobStatus.FAILED,
            300,
            pending_deletes=[{"destination_id": dest["_id"], "key": "k"}],
        ),
        await _job(
            store, jobs.JobStatus.SUCCEEDED, 365, plan_id="quiet-plan"
        ),  # that plan's last job
    ]
    await store.plans.insert_one({"_id": "quiet-plan", "last_job_id": kept[-1]})
    point = {
        "_id": "p-h",
        "plan_id": "plan-h",
        "job_id": pruned[0],
        "state": "available",
        "created_at": NOW - timedelta(days=91),
        "retention": None,
    }
    await store.restore_points.insert_one(point)

    # 0 keeps the whole history
    result = await RetentionSweeper(
        store, box, clock=ManualClock(NOW), job_history_days=0
    ).run_once()
    assert result.jobs_pruned == 0
    assert await store.jobs.count_documents({}) == len(pruned) + len(kept)

    sweeper = RetentionSweeper(store, box, clock=ManualClock(NOW), storage_timeout=5)  # 90 days
    result = await sweeper.run_once()
    assert result.failed == 1  # the failed job's file, still in storage
    assert result.jobs_pruned == len(pruned)
    left = {d["_id"] for d in await store.jobs.find({}, {"_id": 1}).to_list()}
    assert left == set(kept)
    assert await store.restore_points.find_one({"_id": "p-h"}) is not None  # not its job's


async def test_pruning_goes_through_a_long_history_in_batches(store: Database) -> None:
    for n in range(7):
        await _job(store, jobs.JobStatus.SUCCEEDED, 100 + n)
    last = await _job(store, jobs.JobStatus.SUCCEEDED, 120, plan_id="p-last")
    await store.plans.insert_one({"_id": "p-last", "last_job_id": last})
    deleted = await jobs.prune_history(store, ended_before=NOW - timedelta(days=90), batch=2)
    assert deleted == 7
    assert [d["_id"] for d in await store.jobs.find({}).to_list()] == [last]


@pytest.mark.parametrize(("value", "kept"), [("0", None), ("30", timedelta(days=30))])
async def test_the_runner_sweeps_with_the_configured_history(
    store: Database, box: SecretBox, monkeypatch: pytest.MonkeyPatch, value: str, kept: object
) -> None:
    monkeypatch.setenv("JOB_HISTORY_DAYS", value)
    runner = JobRunner(store, box, load_runner_settings(), replica_id="r")
    assert runner.sweeper.job_history == kept


def test_a_negative_history_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOB_HISTORY_DAYS", "-1")
    with pytest.raises(ValueError, match="JOB_HISTORY_DAYS"):
        load_runner_settings()


async def test_stop_ends_the_loop_even_when_a_sweep_swallowed_the_cancel(
    store: Database, box: SecretBox
) -> None:
    """The async database driver can swallow a cancel that lands inside one of its calls; the
    sweeper must still stop at once, not after its hour-long interval."""
    entered = asyncio.Event()

    class Swallowing(RetentionSweeper):
        async def run_once(self) -> Any:
            entered.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass  # as the driver did: the cancel is lost here
            return None

    sweeper = Swallowing(store, box, interval=3600)
    await sweeper.start()
    await asyncio.wait_for(entered.wait(), 10)
    loop_task = sweeper._task
    assert loop_task is not None
    stopping = asyncio.ensure_future(sweeper.stop())
    done, _ = await asyncio.wait({stopping}, timeout=10)
    if not done:  # leave nothing running behind a failed test
        loop_task.cancel()
    assert done and loop_task.done(), "stop() waited for the sweep interval"


async def test_a_destination_no_client_accepts_does_not_stop_the_sweep(
    store: Database, box: SecretBox, s3_server: SeaweedS3, s3_settings: S3Settings
) -> None:
    """Settings stored before today's checks (an endpoint botocore cannot build a client for)
    fail that destination's deletes, not the whole sweep (issue 14)."""
    bad_dest, _, _ = await _seed(store, box, s3_settings, [1, 2], {"style": "FILES", "period": 1})
    _, _, good = await _seed(store, box, s3_settings, [1, 2], {"style": "FILES", "period": 1})
    await store.destinations.update_one(
        {"_id": bad_dest["_id"]}, {"$set": {"endpoint": "http://bad_host:9"}}
    )
    result = await RetentionSweeper(store, box, clock=ManualClock(NOW)).run_once()
    assert (result.deleted, result.failed) == (1, 1), result
    assert any("no longer accepted" in e for e in result.errors), result.errors
    assert await store.restore_points.find_one({"_id": good[1]["_id"]}) is None
