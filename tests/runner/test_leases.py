"""The job state machine in the database: claims, leases, fencing, per-instance order."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from structlog.testing import capture_logs

from backup import backpressure, jobs
from backup.clock import ManualClock
from backup.database import Database
from tests.runner.conftest import GoRig, job_in, until


async def _queue(store: Database, instance_id: str, n: int = 1, **fields) -> list[str]:
    ids = []
    for _ in range(n):
        doc = jobs.new_job(
            instance_id=instance_id,
            type="BACKUP",
            plan_id="plan",
            destination_id="dest",
            trigger="MANUAL",
            items=[jobs.new_item("orders")],
            compression=False,
            encryption={"enabled": False},
        )
        doc.update(fields)
        await store.jobs.insert_one(doc)
        ids.append(doc["_id"])
        await asyncio.sleep(0.002)  # distinct created_at, so "oldest first" is defined
    return ids


async def _claim_all(store: Database, clock: ManualClock, owner: str) -> list[jobs.Lease]:
    leases = []
    for cand in await jobs.claimable(store, clock.now(), limit=10):
        lease = await jobs.claim(
            store, cand, owner=owner, at=clock.now(), lease_seconds=30, deadline_seconds=600
        )
        if lease:
            leases.append(lease)
    return leases


async def test_one_claim_wins(store: Database, clock: ManualClock) -> None:
    (job_id,) = await _queue(store, "i1")
    (cand,) = await jobs.claimable(store, clock.now(), limit=5)
    leases = await asyncio.gather(
        *(
            jobs.claim(
                store, cand, owner=f"r{n}", at=clock.now(), lease_seconds=30, deadline_seconds=600
            )
            for n in range(8)
        )
    )
    won = [lease for lease in leases if lease is not None]
    assert len(won) == 1 and won[0].token == 1
    doc = await store.jobs.find_one({"_id": job_id})
    assert doc["status"] == "RUNNING" and doc["lease_owner"] == won[0].owner
    assert doc["started_at"] == clock.now()
    assert doc["deadline_at"] == clock.now() + timedelta(seconds=600)
    assert doc["lease_expires_at"] == clock.now() + timedelta(seconds=30)
    assert doc["attempts"] == 1


async def test_one_running_job_per_instance_in_order(store: Database, clock: ManualClock) -> None:
    first, second, third = await _queue(store, "busy", 3)
    (other,) = await _queue(store, "quiet")
    # three replicas race over every candidate at once
    results = await asyncio.gather(*(_claim_all(store, clock, f"r{n}") for n in range(3)))
    claimed = sorted(lease.job_id for leases in results for lease in leases)
    assert claimed == sorted([first, other])  # the oldest of "busy", and "quiet"'s
    # the index refuses a second RUNNING job of an instance even to a direct claim
    doc = await store.jobs.find_one({"_id": second})
    assert (
        await jobs.claim(
            store, doc, owner="x", at=clock.now(), lease_seconds=30, deadline_seconds=60
        )
        is None
    )
    (lease,) = [lease for leases in results for lease in leases if lease.job_id == first]
    await jobs.finish(store, lease, "SUCCEEDED", None, at=clock.now())
    (next_lease,) = await _claim_all(store, clock, "r9")
    assert next_lease.job_id == second  # then the next oldest, never the third first
    assert third not in [lease.job_id for lease in await _claim_all(store, clock, "r9")]


async def test_leases_expire_renew_and_fence(store: Database, clock: ManualClock) -> None:
    (job_id,) = await _queue(store, "i1")
    (lease,) = await _claim_all(store, clock, "a")
    await clock.advance(20)
    assert await _claim_all(store, clock, "b") == []
    assert await jobs.renew(store, lease, at=clock.now(), lease_seconds=30)
    await clock.advance(29)
    assert await _claim_all(store, clock, "b") == []  # renewed at 20 s: live until 50 s
    await clock.advance(1)
    (taken,) = await _claim_all(store, clock, "b")  # expired at exactly 50 s
    assert taken.token == 2 and taken.owner == "b"
    doc = await store.jobs.find_one({"_id": job_id})
    assert doc["deadline_at"] == doc["started_at"] + timedelta(seconds=600)  # kept
    with pytest.raises(jobs.LeaseLost):
        await jobs.update_held(store, lease, {"reason": "late write"})
    with pytest.raises(jobs.LeaseLost):
        await jobs.finish(store, lease, "FAILED", "late", at=clock.now())
    assert not await jobs.renew(store, lease, at=clock.now(), lease_seconds=30)
    assert not await jobs.release(store, lease, at=clock.now())
    # the same replica claiming again gets a new token: its old claim stays fenced off
    assert await jobs.release(store, taken, at=clock.now())
    (again,) = await _claim_all(store, clock, "b")
    assert again.token == 3
    with pytest.raises(jobs.LeaseLost):
        await jobs.update_held(store, taken, {"reason": "late write"})
    with pytest.raises(ValueError):
        await jobs.finish(store, again, "RUNNING", None, at=clock.now())
    await jobs.finish(store, again, "FAILED", "because", at=clock.now())
    doc = await store.jobs.find_one({"_id": job_id})
    assert doc["status"] == "FAILED" and doc["reason"] == "because"
    assert doc["lease_owner"] is None and doc["ended_at"] == clock.now()
    assert await _claim_all(store, clock, "c") == []  # final states are never claimed


async def test_a_running_job_nobody_holds_is_taken_over(
    store: Database, clock: ManualClock
) -> None:
    (job_id,) = await _queue(store, "i1", status="RUNNING", lease_expires_at=None)
    (lease,) = await _claim_all(store, clock, "a")
    assert lease.job_id == job_id and lease.token == 1


async def test_cancelled_and_final_jobs_are_not_claimed(
    store: Database, clock: ManualClock
) -> None:
    queued, *_ = await _queue(store, "i1")
    await jobs.cancel(store, "i1", queued)
    for status in ("SUCCEEDED", "FAILED", "CANCELLED", "MISSED"):
        await _queue(store, f"i-{status}", status=status)
    assert await jobs.claimable(store, clock.now(), limit=10) == []


async def test_a_replica_that_loses_its_lease_stops_driving(go: GoRig) -> None:
    _, _, job = await go.backup()
    go.agent.hold()
    runner = go.make_runner("replica-a", poll_seconds=3600)
    await runner.start()
    await go.started(job)
    assert runner.active == 1
    # another replica took it over (as if this one had been paused past its lease)
    await go.db.jobs.update_one(
        {"_id": job["_id"]}, {"$set": {"lease_owner": "replica-b"}, "$inc": {"attempts": 1}}
    )

    async def stopped() -> bool:
        return runner.active == 0

    await until(stopped, clock=go.clock, step=5)
    doc = await go.db.jobs.find_one({"_id": job["_id"]})
    assert doc["status"] == "RUNNING" and doc["lease_owner"] == "replica-b"


async def test_a_job_that_just_ended_is_not_taken_for_a_lost_lease(go: GoRig) -> None:
    """A renewal can race the job's last write: it then fails because the job ended, under
    this very lease. The job's task must finish what follows (forgetting the agent job,
    retention), not be cancelled as if another replica held the job."""
    _, _, job = await go.backup()
    go.agent.hold()
    runner = go.make_runner("replica-a", poll_seconds=3600)
    await runner.start()
    await go.started(job)
    doc = await go.db.jobs.find_one({"_id": job["_id"]})
    lease = jobs.Lease(job["_id"], doc["lease_owner"], doc["attempts"])
    await jobs.finish(go.db, lease, jobs.JobStatus.SUCCEEDED, None, at=go.clock.now())
    with capture_logs() as logs:
        await runner.renew_once()
        await asyncio.sleep(0.1)
    assert runner.active == 1  # its task goes on
    assert "lease_lost" not in [e["event"] for e in logs]

    # whereas a job another replica took over is given up at the next renewal
    _, _, other = await go.backup()
    runner2 = go.make_runner("replica-c", poll_seconds=3600)
    await runner2.start()
    await go.started(other)
    await go.db.jobs.update_one(
        {"_id": other["_id"]}, {"$set": {"lease_owner": "replica-b"}, "$inc": {"attempts": 1}}
    )
    with capture_logs() as logs:
        await runner2.renew_once()
        await asyncio.sleep(0.1)
    assert runner2.active == 0
    assert "lease_lost" in [e["event"] for e in logs]
    go.agent.let_go()


async def test_the_queue_view_reads_new_jobs_drops_stale_ones_and_refreshes(
    store: Database, clock: ManualClock
) -> None:
    view = jobs.QueueView(refresh_seconds=30, overlap_seconds=5, full_read_share=1.0)
    first, second = await _queue(store, "i1") + await _queue(store, "i2")
    assert [c["_id"] for c in await view.candidates(store, clock.now(), limit=10)] == [
        first,
        second,
    ]
    # a pass that looks for nothing new claims from what it read
    (third,) = await _queue(store, "i3")
    listed = await view.candidates(store, clock.now(), limit=10, new_jobs=False)
    assert [c["_id"] for c in listed] == [first, second]
    listed = await view.candidates(store, clock.now(), limit=10, new_jobs=True)
    assert [c["_id"] for c in listed] == [first, second, third]
    # another replica claims one: the claim here is refused, and the entry goes
    taken = await jobs.claim(
        store, listed[0], owner="other", at=clock.now(), lease_seconds=3600, deadline_seconds=7200
    )
    assert taken is not None
    refused = await jobs.try_claim(
        store, listed[0], owner="me", at=clock.now(), lease_seconds=30, deadline_seconds=60
    )
    assert refused == jobs.ClaimRefusal.TAKEN
    view.forget(first)
    listed = await view.candidates(store, clock.now(), limit=10, new_jobs=False)
    assert [c["_id"] for c in listed] == [second, third]
    # a job written with a clock far behind the newest seen is out of reach of the reads
    # of new jobs; the next full read finds it, in its place
    newest = (await store.jobs.find_one({"_id": third}))["created_at"]
    (late,) = await _queue(store, "i4", created_at=newest - timedelta(minutes=1))
    listed = await view.candidates(store, clock.now(), limit=10, new_jobs=True)
    assert late not in [c["_id"] for c in listed]
    await clock.advance(30)
    listed = await view.candidates(store, clock.now(), limit=10, new_jobs=False)
    assert [c["_id"] for c in listed] == [late, second, third]
    # a job of an instance with a RUNNING job waits; the instance's next job is not skipped to
    (busy_next,) = await _queue(store, "i1")
    listed = await view.candidates(store, clock.now(), limit=10, new_jobs=True)
    assert busy_next not in [c["_id"] for c in listed]
    refused = await jobs.try_claim(
        store,
        await store.jobs.find_one({"_id": busy_next}),
        owner="me",
        at=clock.now(),
        lease_seconds=30,
        deadline_seconds=60,
    )
    assert refused == jobs.ClaimRefusal.BUSY


async def test_runners_start_nothing_while_the_scheduler_is_behind(go: GoRig) -> None:
    """backup.backpressure: a notice from a scheduler that is behind holds every runner's claims
    until it lapses; while it lasts, one job starts every MAX_YIELD_SECONDS."""
    go.agent.hold()
    await backpressure.announce_behind(go.db, at=go.clock.now(), replica="leader")
    _, _, job = await go.backup()
    runner = go.make_runner("replica-a", poll_seconds=3600)
    await runner.start()
    for _ in range(3):
        await asyncio.sleep(0.2)
        await go.clock.advance(0.5)
    assert (await go.db.jobs.find_one({"_id": job["_id"]}))["status"] == "QUEUED"
    await go.clock.advance(backpressure.HOLD_SECONDS)  # the notice lapsed: claimed at once
    await until(lambda: job_in(go.db, job["_id"], "RUNNING"), what="the claim")

    # a scheduler that stays behind: one job starts every MAX_YIELD_SECONDS, not a burst
    others = [(await go.backup())[2]["_id"] for _ in range(2)]
    runner2 = go.make_runner("replica-b", poll_seconds=3600)
    await backpressure.announce_behind(go.db, at=go.clock.now(), replica="leader")
    await runner2.start()

    async def running() -> list[str]:
        docs = await go.db.jobs.find({"_id": {"$in": others}, "status": "RUNNING"}).to_list()
        return [d["_id"] for d in docs]

    waited = 0.0
    while waited < backpressure.MAX_YIELD_SECONDS - 1:
        await backpressure.announce_behind(go.db, at=go.clock.now(), replica="leader")
        await asyncio.sleep(0.05)
        await go.clock.advance(1)
        waited += 1
        assert await running() == []

    async def claimed() -> list[str]:
        await backpressure.announce_behind(go.db, at=go.clock.now(), replica="leader")
        return await running()

    await until(claimed, clock=go.clock, step=1, what="a claim despite the notice")
    await asyncio.sleep(0.3)
    assert len(await running()) == 1  # one, though two instances wait and slots are free
    go.agent.let_go()
