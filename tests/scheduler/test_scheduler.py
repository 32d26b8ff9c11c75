"""The scheduler with a manual clock on the real database: fires, the loop's sleeping and
waking, pause/resume/reschedule/delete, daylight saving, the misfire policy, several
schedulers on one database and the crash points between a fire's two writes."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from backup import backpressure, jobs, plans, schedule
from backup.clock import ManualClock
from backup.database import Database, Document
from backup.secrets import SecretBox
from scheduler import Scheduler, fire_job_id
from tests.scheduler.conftest import (
    START,
    SchedulerFactory,
    jobs_of,
    seed_plan,
)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


async def until(check: Callable[[], Awaitable[Any] | Any], timeout: float = 60.0) -> Any:
    """Poll (real time) until ``check`` is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def idle(s: Scheduler, passes_after: int = -1) -> None:
    """Wait until the loop sleeps again (after pass number ``passes_after``, if given)."""
    await until(lambda: s.next_wake_at is not None and s.stats.passes > passes_after)


async def follow(clock: ManualClock, s: Scheduler, target: datetime) -> None:
    """Move the clock to ``target`` stopping at every moment the loop asked to be woken, and
    let it finish each pass (its database work takes real time)."""
    while True:
        await idle(s)
        wake = s.next_wake_at
        assert wake is not None
        if wake > target:
            await clock.advance(to=target)
            return
        before = s.stats.passes
        await clock.advance(to=max(wake, clock.now()))
        await idle(s, before)


async def finish_queued(store: Database) -> None:
    """What a job runner would do between fires: run every queued job (here: end it)."""
    await store.jobs.update_many({"status": "QUEUED"}, {"$set": {"status": "SUCCEEDED"}})


async def plan_doc(store: Database, plan_id: str) -> Document:
    doc = await store.plans.find_one({"_id": plan_id})
    assert doc is not None
    return doc


# ---------------------------------------------------------------- fires


async def test_a_fire_creates_one_job_and_moves_the_plan_on(
    store: Database,
    box: SecretBox,
    clock: ManualClock,
    make_scheduler: SchedulerFactory,
    queued_signal: Any,
) -> None:
    instance, plan = await seed_plan(store, box, frequency="0 3 * * *", at=clock.now())
    assert plan["next_run_at"] == utc(2026, 3, 1, 3)
    s = make_scheduler()
    await clock.advance(to=utc(2026, 3, 1, 2, 59, 59))
    assert await s.run_once() == 0
    await clock.advance(to=utc(2026, 3, 1, 3))
    assert await s.run_once() == 1
    await clock.advance(30)
    assert await s.run_once() == 0
    [job] = await jobs_of(store, plan["_id"])
    assert job["_id"] == fire_job_id(plan["_id"], utc(2026, 3, 1, 3))
    assert (job["trigger"], job["status"], job["type"]) == ("SCHEDULE", "QUEUED", "BACKUP")
    assert job["scheduled_for"] == utc(2026, 3, 1, 3) and job["created_at"] == utc(2026, 3, 1, 3)
    assert job["instance_id"] == instance["_id"]
    assert job["destination_id"] == instance["destination_id"]
    assert [i["name"] for i in job["items"]] == ["orders", "customers"]
    assert job["reason"] is None and job["ended_at"] is None
    moved = await plan_doc(store, plan["_id"])
    assert moved["next_run_at"] == utc(2026, 3, 2, 3) and moved["last_job_id"] == job["_id"]
    assert queued_signal.count == 1  # the runner was told


async def test_a_scheduler_behind_its_fires_holds_the_runners_back(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    """backup.backpressure: fires found due for longer than BEHIND_SECONDS make the scheduler ask
    the runners to start nothing for HOLD_SECONDS; fires handled on time ask nothing."""
    _, on_time = await seed_plan(store, box, frequency="0 3 * * *", at=clock.now())
    _, late = await seed_plan(store, box, frequency="0 4 * * *", at=clock.now())
    s = make_scheduler()
    await clock.advance(to=utc(2026, 3, 1, 3))
    assert await s.run_once() == 1
    assert await backpressure.yield_until(store, clock.now()) is None
    assert await store.leases.find_one({"_id": backpressure.DOC_ID}) is None
    await clock.advance(to=utc(2026, 3, 1, 4, 0, 1))  # one second late: behind
    assert await s.run_once() == 1
    assert await backpressure.yield_until(store, clock.now()) == utc(2026, 3, 1, 4, 0, 3)
    await clock.advance(backpressure.HOLD_SECONDS)
    assert await backpressure.yield_until(store, clock.now()) is None  # it lapses by itself
    assert len(await jobs_of(store, late["_id"])) == 1
    assert len(await jobs_of(store, on_time["_id"])) == 1


async def test_the_loop_sleeps_until_the_earliest_fire_not_on_a_tick(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    _, plan = await seed_plan(store, box, frequency="30 0 * * *", at=clock.now())
    s = make_scheduler(poll_seconds=300)
    await s.start()
    await follow(clock, s, utc(2026, 3, 1, 0, 31))
    [job] = await jobs_of(store, plan["_id"])
    lag = (job["created_at"] - job["scheduled_for"]).total_seconds()
    assert job["trigger"] == "SCHEDULE" and 0 <= lag < 0.01
    # 31 minutes: a pass at start, one per 5-minute poll, the fire itself; no busy tick
    assert s.stats.passes <= 9, s.stats.passes


async def test_a_rescheduled_plan_wakes_the_loop_at_once(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    instance, plan = await seed_plan(store, box, frequency="0 3 * * *", at=clock.now())
    s = make_scheduler(poll_seconds=300)
    await s.start()
    await idle(s)
    assert s.next_wake_at == START + timedelta(seconds=300)  # nothing due within the window
    before = s.stats.passes
    await plans.update(
        store, box, instance, plan["_id"], {"frequency": "1 0 * * *"}, 0, schedule_from=clock.now()
    )
    await idle(s, before)  # woken by the change, not by the poll
    assert s.next_wake_at is not None and s.next_wake_at < START + timedelta(seconds=61)
    await follow(clock, s, utc(2026, 3, 1, 0, 2))
    [job] = await jobs_of(store, plan["_id"])
    assert job["scheduled_for"] == utc(2026, 3, 1, 0, 1) and job["trigger"] == "SCHEDULE"
    assert (job["created_at"] - job["scheduled_for"]).total_seconds() < 0.01
    await plans.update(
        store, box, instance, plan["_id"], {"timezone": "Asia/Tokyo"}, 0, schedule_from=clock.now()
    )
    assert (await plan_doc(store, plan["_id"]))["next_run_at"] == utc(2026, 3, 1, 15, 1)


async def test_pausing_stops_fires_at_once_and_resuming_schedules_from_now(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    instance, plan = await seed_plan(store, box, frequency="0 * * * *", at=clock.now())
    s = make_scheduler(poll_seconds=300)
    await s.start()
    await follow(clock, s, utc(2026, 3, 1, 1, 59, 59))
    assert len(await jobs_of(store, plan["_id"])) == 1  # 01:00
    assert s.next_wake_at is not None and s.next_wake_at <= utc(2026, 3, 1, 2, 0, 1)
    await plans.update(store, box, instance, plan["_id"], {"paused": True}, 0)
    assert (await plan_doc(store, plan["_id"]))["next_run_at"] is None
    await follow(clock, s, utc(2026, 3, 1, 5, 20))
    assert len(await jobs_of(store, plan["_id"])) == 1  # the loop was about to fire: it did not
    await finish_queued(store)
    await plans.update(
        store, box, instance, plan["_id"], {"paused": False}, 0, schedule_from=clock.now()
    )
    assert (await plan_doc(store, plan["_id"]))["next_run_at"] == utc(2026, 3, 1, 6)
    await follow(clock, s, utc(2026, 3, 1, 6, 0, 1))
    got = await jobs_of(store, plan["_id"])
    assert [j["scheduled_for"] for j in got] == [utc(2026, 3, 1, 1), utc(2026, 3, 1, 6)]
    # paused hours are neither run nor missed
    assert [j["status"] for j in got] == ["SUCCEEDED", "QUEUED"]


async def test_a_deleted_plan_fires_no_more(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    instance, plan = await seed_plan(store, box, frequency="0 * * * *", at=clock.now())
    s = make_scheduler()
    await clock.advance(to=utc(2026, 3, 1, 1))
    assert await s.run_once() == 1
    await plans.delete(store, instance["_id"], plan["_id"])
    await clock.advance(to=utc(2026, 3, 1, 5))
    assert await s.run_once() == 0
    [job] = await jobs_of(store, plan["_id"])
    assert job["status"] == "CANCELLED" and job["reason"] == "The plan was deleted."


async def test_a_plan_deleted_while_its_fire_is_recorded_gets_its_job_cancelled(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    """The race: the scheduler read the due plan, the user deleted it (cancelling the queued
    jobs it could see), then the scheduler wrote the fire's job."""
    instance, plan = await seed_plan(store, box, frequency="0 * * * *", at=clock.now())
    await clock.advance(to=utc(2026, 3, 1, 1))
    stale = await plan_doc(store, plan["_id"])
    await plans.delete(store, instance["_id"], plan["_id"])
    s = make_scheduler()
    await s._fire_batch([stale], clock.now())  # the read happened before the delete
    [job] = await jobs_of(store, plan["_id"])
    assert job["status"] == "CANCELLED" and job["reason"] == "The plan was deleted."


async def test_a_plan_whose_schedule_cannot_be_evaluated_is_stopped_visibly(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    _, plan = await seed_plan(store, box, frequency="0 * * * *", at=clock.now())
    await store.plans.update_one({"_id": plan["_id"]}, {"$set": {"timezone": "Atlantis/Lost"}})
    s = make_scheduler()
    await clock.advance(to=utc(2026, 3, 1, 1))
    assert await s.run_once() == 0
    [job] = await jobs_of(store, plan["_id"])
    assert job["status"] == "MISSED" and "cannot be evaluated" in job["reason"]
    assert "Atlantis/Lost" in job["reason"]
    assert (await plan_doc(store, plan["_id"]))["next_run_at"] is None
    await clock.advance(3600)
    assert await s.run_once() == 0 and len(await jobs_of(store, plan["_id"])) == 1


# ---------------------------------------------------------------- daylight saving


async def _fires_through(
    store: Database, box: SecretBox, make_scheduler: SchedulerFactory, frequency: str, tz: str,
    start: datetime, days: int,
) -> list[datetime]:  # fmt: skip
    clock = ManualClock(start)
    _, plan = await seed_plan(store, box, frequency=frequency, timezone=tz, at=start)
    s = make_scheduler(clock=clock)
    end = start + timedelta(days=days)
    while True:
        nxt = (await plan_doc(store, plan["_id"]))["next_run_at"]
        if nxt > end:
            break
        await clock.advance(to=nxt)
        assert await s.run_once() == 1
        await finish_queued(store)
    got = await jobs_of(store, plan["_id"])
    assert all(j["trigger"] == "SCHEDULE" and j["status"] == "SUCCEEDED" for j in got)
    return [j["scheduled_for"] for j in got]


@pytest.mark.parametrize(
    ("frequency", "tz", "start", "days", "expected"),
    [
        pytest.param(
            "30 2 * * *",
            "Europe/Berlin",
            utc(2026, 3, 27),
            4,
            [
                utc(2026, 3, 27, 1, 30),
                utc(2026, 3, 28, 1, 30),
                utc(2026, 3, 29, 1, 0),  # 02:30 does not exist: once, at 03:00 CEST
                utc(2026, 3, 30, 0, 30),
            ],
            id="berlin-spring-forward",
        ),
        pytest.param(
            "30 2 * * *",
            "Europe/Berlin",
            utc(2026, 10, 23),
            4,
            [
                utc(2026, 10, 23, 0, 30),
                utc(2026, 10, 24, 0, 30),
                utc(2026, 10, 25, 0, 30),  # 02:30 happens twice: once, in the first pass
                utc(2026, 10, 26, 1, 30),
            ],
            id="berlin-fall-back",
        ),
        pytest.param(
            "30 2 * * *",
            "America/New_York",
            utc(2026, 3, 7, 12),
            2,
            [utc(2026, 3, 8, 7, 0), utc(2026, 3, 9, 6, 30)],
            id="new-york-spring-forward",
        ),
        pytest.param(
            "30 1 * * *",
            "America/New_York",
            utc(2026, 10, 31, 12),
            2,
            [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)],
            id="new-york-fall-back",
        ),
    ],
)
async def test_a_daily_plan_fires_once_a_day_across_a_clock_change(
    store: Database,
    box: SecretBox,
    make_scheduler: SchedulerFactory,
    frequency: str,
    tz: str,
    start: datetime,
    days: int,
    expected: list[datetime],
) -> None:
    got = await _fires_through(store, box, make_scheduler, frequency, tz, start, days)
    assert got == expected
    local = ZoneInfo(tz)
    assert Counter(t.astimezone(local).date() for t in got) == Counter(
        {d: 1 for d in (t.astimezone(local).date() for t in got)}
    )


# ---------------------------------------------------------------- misfires


async def _outage(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory,
    back_at: datetime, frequency: str = "0 * * * *", **settings: Any,
) -> tuple[Document, list[Document], int]:  # fmt: skip
    """An hourly plan created at START (first fire 01:00); no scheduler runs until
    ``back_at``; then one pass."""
    _, plan = await seed_plan(store, box, frequency=frequency, at=clock.now())
    await clock.advance(to=back_at)
    queued = await make_scheduler(**settings).run_once()
    return await plan_doc(store, plan["_id"]), await jobs_of(store, plan["_id"]), queued


async def test_after_an_outage_the_latest_fire_is_caught_up_and_the_rest_recorded_missed(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    plan, got, queued = await _outage(store, box, clock, make_scheduler, utc(2026, 3, 1, 5, 30))
    assert queued == 1
    missed, caught = got
    assert missed["status"] == "MISSED" and missed["trigger"] == "SCHEDULE"
    assert missed["scheduled_for"] == utc(2026, 3, 1, 1)
    assert missed["missed"] == {
        "first": utc(2026, 3, 1, 1),
        "last": utc(2026, 3, 1, 4),
        "count": 4,
        "exact": True,
    }
    assert missed["reason"].startswith("Missed 4 runs scheduled from 2026-03-01 01:00 UTC to ")
    assert "most recent run" in missed["reason"] and missed["ended_at"] is not None
    assert caught["trigger"] == "CATCH_UP" and caught["status"] == "QUEUED"
    assert caught["scheduled_for"] == utc(2026, 3, 1, 5)
    assert plan["next_run_at"] == utc(2026, 3, 1, 6) and plan["last_job_id"] == caught["_id"]


async def test_a_fire_later_than_the_grace_is_recorded_missed_not_run(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    plan, got, queued = await _outage(
        store, box, clock, make_scheduler, utc(2026, 3, 1, 5, 30), misfire_grace_seconds=600
    )
    assert queued == 0
    [missed] = got  # one record for the whole outage, the latest fire included
    assert missed["missed"]["count"] == 5 and missed["missed"]["last"] == utc(2026, 3, 1, 5)
    assert "SCHEDULER_MISFIRE_GRACE_SECONDS = 600 s" in missed["reason"]
    assert plan["next_run_at"] == utc(2026, 3, 1, 6)


async def test_a_single_late_fire_within_the_grace_is_caught_up(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    plan, got, queued = await _outage(store, box, clock, make_scheduler, utc(2026, 3, 1, 1, 10))
    assert queued == 1
    [job] = got
    assert job["trigger"] == "CATCH_UP" and job["scheduled_for"] == utc(2026, 3, 1, 1)
    assert plan["next_run_at"] == utc(2026, 3, 1, 2)


async def test_a_fire_late_because_the_running_replica_was_busy_is_no_misfire(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    _, plan = await seed_plan(store, box, frequency="0 * * * *", at=clock.now())
    s = make_scheduler(poll_seconds=300)
    await s.start()
    await idle(s)
    # The clock runs on to 01:10 while the loop is held up (a burst, a slow database): the
    # 01:00 fire is handled 10 minutes late by a scheduler that was running all along.
    await clock.advance(to=utc(2026, 3, 1, 1, 10))
    # On its way to 01:10 the manual clock wakes the loop's 00:05 sleeper: that pass may still
    # read 00:05 and go back to sleep for a whole poll. Wake it: its next look is at 01:10.
    s.wake()
    [job] = await until(lambda: jobs_of(store, plan["_id"]))
    assert job["scheduled_for"] == utc(2026, 3, 1, 1) and job["trigger"] == "SCHEDULE"
    assert job["status"] == "QUEUED" and s.stats.catch_ups == 0


async def test_a_short_gap_within_the_threshold_is_no_misfire(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    _, got, queued = await _outage(store, box, clock, make_scheduler, utc(2026, 3, 1, 5, 0, 30))
    missed, on_time = got
    assert missed["missed"]["count"] == 4 and on_time["trigger"] == "SCHEDULE"
    assert on_time["scheduled_for"] == utc(2026, 3, 1, 5) and queued == 1


async def test_with_no_grace_every_missed_fire_is_recorded_and_none_run(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    _, got, queued = await _outage(
        store, box, clock, make_scheduler, utc(2026, 3, 1, 1, 10), misfire_grace_seconds=0
    )
    [missed] = got
    assert queued == 0 and missed["missed"]["count"] == 1 and missed["status"] == "MISSED"


async def test_a_week_long_outage_of_a_frequent_plan_is_one_bounded_record(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    plan, got, queued = await _outage(
        store, box, clock, make_scheduler, utc(2026, 3, 8, 0, 0, 30), frequency="* * * * *"
    )
    missed, latest = got
    assert missed["missed"]["exact"] is False and missed["missed"]["count"] == 10_000
    assert missed["missed"]["first"] == utc(2026, 3, 1, 0, 1)
    assert missed["missed"]["last"] == utc(2026, 3, 7, 23, 59)  # the range is whole
    assert missed["reason"].startswith("Missed more than 10,000 runs")
    assert latest["scheduled_for"] == utc(2026, 3, 8) and latest["trigger"] == "SCHEDULE"
    assert plan["next_run_at"] == utc(2026, 3, 8, 0, 1) and queued == 1


# ---------------------------------------------------------------- several replicas


async def test_three_schedulers_on_one_database_create_exactly_one_job_per_fire(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    schedules = [
        ("* * * * *", "UTC"),
        ("*/2 * * * *", "Europe/Berlin"),
        ("*/5 * * * *", "America/New_York"),
        ("7,19,44 * * * *", "Asia/Kolkata"),
        ("0 * * * *", "UTC"),
    ]
    created = []
    for i in range(30):
        freq, tz = schedules[i % len(schedules)]
        _, plan = await seed_plan(store, box, frequency=freq, timezone=tz, at=clock.now())
        created.append(plan)
    replicas = [make_scheduler(f"replica-{c}", batch_size=7) for c in "abc"]
    end = START + timedelta(minutes=45)
    queued = 0
    while clock.now() < end:
        await clock.advance(60)
        counts = await asyncio.gather(*(r.run_once() for r in replicas))
        queued += sum(counts)
        await finish_queued(store)
    total = 0
    for plan in created:
        expected, _ = schedule.fires_between(
            plan["frequency"], plan["timezone"], START + timedelta(seconds=1), end, limit=1000
        )
        got = await jobs_of(store, plan["_id"])
        assert [j["scheduled_for"] for j in got] == expected, plan["frequency"]
        assert all(j["status"] == "SUCCEEDED" and j["trigger"] == "SCHEDULE" for j in got)
        assert all(j["_id"] == fire_job_id(plan["_id"], j["scheduled_for"]) for j in got)
        total += len(got)
    assert queued == total  # each job counted by exactly the replica that wrote it
    assert sum(r.stats.already_recorded for r in replicas) > 0  # they did contend


async def test_a_fire_while_the_previous_job_waits_to_start_is_skipped_not_queued(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    """A plan's queue stays bounded when its backups cannot keep up (agent down, backups
    longer than the interval): a fire while its previous job is still QUEUED is recorded
    MISSED with the reason; once that job has started, the next fire queues again."""
    _, plan = await seed_plan(store, box, frequency="0 * * * *", at=clock.now())
    s = make_scheduler()
    await clock.advance(to=utc(2026, 3, 1, 1))
    assert await s.run_once() == 1
    first = fire_job_id(plan["_id"], utc(2026, 3, 1, 1))
    for hour in (2, 3):
        await clock.advance(to=utc(2026, 3, 1, hour))
        assert await s.run_once() == 0
    got = await jobs_of(store, plan["_id"])
    assert [j["status"] for j in got] == ["QUEUED", "MISSED", "MISSED"]
    for skipped in got[1:]:
        assert skipped["reason"].startswith(
            f"Skipped: the previous backup of this plan (job {first}"
        )
        assert skipped["missed"]["count"] == 1 and skipped["ended_at"] is not None
    moved = await plan_doc(store, plan["_id"])
    assert moved["last_job_id"] == first and moved["next_run_at"] == utc(2026, 3, 1, 4)
    assert s.stats.skipped == 2
    # The runner starts it: the next fire queues behind the running one (one at most).
    await store.jobs.update_one({"_id": first}, {"$set": {"status": "RUNNING"}})
    await clock.advance(to=utc(2026, 3, 1, 4))
    assert await s.run_once() == 1
    assert [j["status"] for j in await jobs_of(store, plan["_id"])][-1] == "QUEUED"


async def test_a_replica_that_died_between_the_two_writes_is_completed_not_duplicated(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    _, plan = await seed_plan(store, box, frequency="0 * * * *", at=clock.now())
    await clock.advance(to=utc(2026, 3, 1, 1))
    # the dead replica wrote the fire's job, then died before advancing the plan
    dead = make_scheduler("replica-dead")
    fire = utc(2026, 3, 1, 1)
    await dead._insert_many([dead._job(plan | {"next_run_at": fire}, fire, jobs.Trigger.SCHEDULE)])
    await clock.advance(20)
    s = make_scheduler("replica-b")
    assert await s.run_once() == 0
    assert s.stats.already_recorded == 1
    [job] = await jobs_of(store, plan["_id"])
    moved = await plan_doc(store, plan["_id"])
    assert moved["next_run_at"] == utc(2026, 3, 1, 2) and moved["last_job_id"] == job["_id"]


async def test_recovering_replicas_with_different_views_account_for_every_missed_fire_once(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    """Replica A came back at 03:30, recorded 01:00-03:00 as missed (no grace) and died before
    advancing the plan. Replica B comes back at 05:30 with a one-hour grace: it must not
    record 01:00-04:00 over A's record, nor skip 04:00."""
    _, plan = await seed_plan(store, box, frequency="0 * * * *", at=clock.now())
    await clock.advance(to=utc(2026, 3, 1, 3, 30))
    a = make_scheduler("replica-a", misfire_grace_seconds=0)
    stale = await plan_doc(store, plan["_id"])
    await a._record(stale, a._plan_misfire(stale, clock.now()))  # then A dies
    await clock.advance(to=utc(2026, 3, 1, 5, 30))
    assert await make_scheduler("replica-b").run_once() == 1
    got = await jobs_of(store, plan["_id"])
    covered: list[datetime] = []
    for job in got:
        if job["status"] == "MISSED":
            fires, _ = schedule.fires_between(
                "0 * * * *", "UTC", job["missed"]["first"], job["missed"]["last"], limit=100
            )
            covered += fires
        else:
            covered.append(job["scheduled_for"])
    assert sorted(covered) == [utc(2026, 3, 1, h) for h in range(1, 6)]  # each exactly once
    assert [j["status"] for j in got] == ["MISSED", "MISSED", "QUEUED"]
    assert got[-1]["trigger"] == "CATCH_UP" and got[-1]["scheduled_for"] == utc(2026, 3, 1, 5)
