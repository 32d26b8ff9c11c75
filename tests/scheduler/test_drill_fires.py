"""Scheduled restore drills (backup/drill.py fire_due_drills, called by every scheduler pass)
with a manual clock on the real database: a drill cron fires one DRILL job per fire, in the
plan's time zone, whatever the number of schedulers; a paused plan or a disabled drill fires
none; a fire while the previous drill still waits is recorded as MISSED."""

from __future__ import annotations

from datetime import UTC, datetime

from backup import drill, jobs, plans
from backup.clock import ManualClock
from backup.database import Database, Document
from backup.secrets import SecretBox
from tests.scheduler.conftest import SchedulerFactory, seed_plan


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


async def drills_of(store: Database, plan_id: str) -> list[Document]:
    return (
        await store.jobs.find({"plan_id": plan_id, "type": "DRILL"})
        .sort([("drill_for", 1)])
        .to_list()
    )


async def test_a_drill_cron_fires_one_drill_job_in_the_plans_time_zone(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    # 2026-03-01 is a Sunday; 05:00 in Berlin (CET) is 04:00 UTC. The backup fires at 04:00
    # Berlin time (03:00 UTC) and the drill an hour later.
    instance, plan = await seed_plan(
        store,
        box,
        frequency="0 4 * * *",
        at=clock.now(),
        timezone="Europe/Berlin",
        drill={"frequency": "0 5 * * 0"},
    )
    assert plan["drill"] == {"frequency": "0 5 * * 0", "enabled": True}
    assert plan["drill_next_run_at"] == utc(2026, 3, 1, 4)
    s = make_scheduler()
    await clock.advance(to=utc(2026, 3, 1, 3, 59, 59))
    await s.run_once()
    assert await drills_of(store, plan["_id"]) == []
    await clock.advance(to=utc(2026, 3, 1, 4))
    await s.run_once()
    await clock.advance(30)
    await s.run_once()
    [job] = await drills_of(store, plan["_id"])
    assert job["_id"] == drill.drill_job_id(plan["_id"], utc(2026, 3, 1, 4))
    assert (job["type"], job["status"], job["trigger"]) == ("DRILL", "QUEUED", "SCHEDULE")
    assert job["drill_for"] == utc(2026, 3, 1, 4)
    assert job["restore_point_id"] is None  # the newest point when it starts
    assert job["instance_id"] == instance["_id"]
    assert s.stats.drills == 1
    moved = await store.plans.find_one({"_id": plan["_id"]})
    assert moved["drill_next_run_at"] == utc(2026, 3, 8, 4)
    # the backup fire of the same plan is a job of its own
    backups = await store.jobs.find({"plan_id": plan["_id"], "type": "BACKUP"}).to_list()
    assert len(backups) == 1 and backups[0]["scheduled_for"] == utc(2026, 3, 1, 3)


async def test_several_schedulers_record_each_drill_fire_once(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    _, plan = await seed_plan(
        store, box, frequency="0 3 * * *", at=clock.now(), drill={"frequency": "30 3 * * *"}
    )
    replicas = [make_scheduler(f"replica-{n}", lease_seconds=0) for n in range(3)]
    for day in (1, 2, 3):
        await clock.advance(to=utc(2026, 3, day, 3, 30))
        for s in replicas:
            await s.run_once()
        # a drill left waiting would make the next fire MISSED: this one has ended
        await store.jobs.update_many(
            {"plan_id": plan["_id"], "type": "DRILL", "status": "QUEUED"},
            {"$set": {"status": "SUCCEEDED"}},
        )
    fired = await drills_of(store, plan["_id"])
    assert [j["drill_for"] for j in fired] == [utc(2026, 3, d, 3, 30) for d in (1, 2, 3)]
    assert sum(s.stats.drills for s in replicas) == 3


async def test_a_paused_plan_or_a_disabled_drill_fires_no_drill(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    instance, plan = await seed_plan(
        store, box, frequency="0 3 * * *", at=clock.now(), drill={"frequency": "0 4 * * *"}
    )
    paused = await plans.update(
        store, box, instance, plan["_id"], {"paused": True}, 0, schedule_from=clock.now()
    )
    assert paused["drill_next_run_at"] is None
    resumed = await plans.update(
        store, box, instance, plan["_id"], {"paused": False}, 0, schedule_from=clock.now()
    )
    assert resumed["drill_next_run_at"] == utc(2026, 3, 1, 4)
    disabled = await plans.update(
        store,
        box,
        instance,
        plan["_id"],
        {"drill": {"enabled": False}},
        0,
        schedule_from=clock.now(),
    )
    assert disabled["drill"] == {"frequency": "0 4 * * *", "enabled": False}
    assert disabled["drill_next_run_at"] is None
    s = make_scheduler()
    await clock.advance(to=utc(2026, 3, 2, 5))
    await s.run_once()
    assert await drills_of(store, plan["_id"]) == []
    dropped = await plans.update(
        store, box, instance, plan["_id"], {"drill": None}, 0, schedule_from=clock.now()
    )
    assert dropped["drill"] is None and dropped["drill_next_run_at"] is None


async def test_a_drill_fire_while_the_previous_drill_waits_is_recorded_missed(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    _, plan = await seed_plan(
        store, box, frequency="0 3 * * *", at=clock.now(), drill={"frequency": "0 * * * *"}
    )
    s = make_scheduler()
    await clock.advance(to=utc(2026, 3, 1, 1))
    await s.run_once()
    await clock.advance(to=utc(2026, 3, 1, 2))
    await s.run_once()
    first, second = await drills_of(store, plan["_id"])
    assert first["status"] == jobs.JobStatus.QUEUED
    assert second["status"] == jobs.JobStatus.MISSED
    assert "previous drill had not ended" in second["reason"]
    assert s.stats.drills == 1


async def test_an_outage_owes_one_late_drill_not_every_missed_one(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    _, plan = await seed_plan(
        store, box, frequency="0 3 * * *", at=clock.now(), drill={"frequency": "0 * * * *"}
    )
    await clock.advance(to=utc(2026, 3, 1, 9, 10))  # fires 01:00 to 09:00 passed unseen
    s = make_scheduler()
    await s.run_once()
    [late] = await drills_of(store, plan["_id"])
    assert late["drill_for"] == utc(2026, 3, 1, 1) and late["status"] == "QUEUED"
    moved = await store.plans.find_one({"_id": plan["_id"]})
    assert moved["drill_next_run_at"] == utc(2026, 3, 1, 10)
