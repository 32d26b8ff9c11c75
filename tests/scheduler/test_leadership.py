"""One scheduler leads, the others stand by (scheduler/leadership.py): the leader writes
every job, a clean stop hands over at once, a dead leader is replaced within the lease and
the fires due meanwhile are late SCHEDULE jobs, not missed ones."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from backup.clock import ManualClock
from backup.database import Database, Document
from backup.secrets import SecretBox
from scheduler import Scheduler
from tests.scheduler.conftest import START, SchedulerFactory, jobs_of, seed_plan
from tests.scheduler.test_scheduler import finish_queued, follow, idle

LEASE = 30.0  # renewed every 10 s; the loop never moves the clock more than 5 s at once


async def minutes(clock: ManualClock, s: Scheduler, store: Database, first: int, last: int) -> None:
    """Follow ``s`` through the fires of minutes ``first`` to ``last``, each job run (ended)
    before the next fire, as a runner would (a fire whose last job waits is skipped)."""
    for m in range(first, last + 1):
        await follow(clock, s, START + timedelta(minutes=m, seconds=1))
        await finish_queued(store)


async def crash(s: Scheduler) -> None:
    """The replica dies: its loops stop and nothing is given up (unlike ``stop``)."""
    assert s.leadership is not None
    for task in (s._task, s.leadership._task):  # private: a crash skips what stop() does
        assert task is not None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def until_leading(clock: ManualClock, s: Scheduler, most: float) -> timedelta:
    """Move the clock second by second until ``s`` leads; how long that took (clock time).
    Each step leaves time for the attempt it may trigger (a database round trip)."""
    start = clock.now()
    while not s.leading:
        assert clock.now() - start <= timedelta(seconds=most), f"{s.replica_id} never led"
        await clock.advance(1)
        for _ in range(20):
            if s.leading:
                break
            await asyncio.sleep(0.01)
    return clock.now() - start


async def two_replicas(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> tuple[Document, Scheduler, Scheduler]:
    """A minute-frequency plan, and schedulers a then b started on it (a leads)."""
    _, plan = await seed_plan(store, box, frequency="* * * * *", at=clock.now())
    a = make_scheduler("replica-a", lease_seconds=LEASE)
    b = make_scheduler("replica-b", lease_seconds=LEASE)
    await a.start()
    await b.start()
    return plan, a, b


async def test_one_replica_leads_and_a_clean_stop_hands_over_at_once(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    plan, a, b = await two_replicas(store, box, clock, make_scheduler)
    assert a.leading and not b.leading
    await minutes(clock, a, store, 1, 3)
    assert len(await jobs_of(store, plan["_id"])) == 3
    assert a.stats.queued == 3
    assert b.stats.passes == 0  # standing by: not even a read of the plans

    await a.stop()  # gives the lease up
    # b leads at its next attempt (every third of the lease), not once the lease expires
    assert await until_leading(clock, b, LEASE) <= timedelta(seconds=LEASE / 3 + 1)
    await minutes(clock, b, store, 4, 5)
    got = await jobs_of(store, plan["_id"])
    assert [j["scheduled_for"] for j in got] == [START + timedelta(minutes=m) for m in range(1, 6)]
    assert b.stats.queued == 2


async def test_a_dead_leader_is_replaced_within_the_lease_and_no_fire_is_missed(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    plan, a, b = await two_replicas(store, box, clock, make_scheduler)
    await minutes(clock, a, store, 1, 1)
    await follow(clock, a, START + timedelta(minutes=1, seconds=59))
    await crash(a)  # a second before the next fire

    crashed_at = clock.now()
    await until_leading(clock, b, LEASE + 10)
    assert clock.now() - crashed_at <= timedelta(seconds=LEASE + 5)
    await idle(b, 0)
    got = await jobs_of(store, plan["_id"])
    assert [j["scheduled_for"] for j in got] == [START + timedelta(minutes=m) for m in (1, 2)]
    late = got[1]
    assert late["trigger"] == "SCHEDULE" and late["status"] == "QUEUED"  # late, not missed
    assert late["created_at"] - late["scheduled_for"] <= timedelta(seconds=LEASE + 5)


async def test_without_a_lease_every_replica_schedules(
    store: Database, box: SecretBox, clock: ManualClock, make_scheduler: SchedulerFactory
) -> None:
    a = make_scheduler("replica-a", lease_seconds=0)
    b = make_scheduler("replica-b", lease_seconds=0)
    await a.start()
    await b.start()
    assert a.leadership is None and a.leading and b.leading
    assert await store.leases.count_documents({}) == 0
