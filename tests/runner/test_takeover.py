"""Replicas that stop, restart or die while driving a job: another one finishes it, the
agent runs each item once, one restore point is written."""

from __future__ import annotations

from datetime import timedelta

import pytest

from backup import jobs
from tests.runner.conftest import GoRig, crash
from tests.servers.s3 import SeaweedS3


async def test_a_stopping_replica_releases_and_another_resumes_at_once(
    go: GoRig, s3_server: SeaweedS3
) -> None:
    _, _, job = await go.backup()
    go.agent.hold()
    a, b = go.make_runner("replica-a"), go.make_runner("replica-b")
    assert await a.run_once() == 1
    await go.started(job)
    await a.stop()  # SIGTERM: the lease is released, the job stays RUNNING
    held = await go.db.jobs.find_one({"_id": job["_id"]})
    assert held["status"] == "RUNNING" and held["lease_expires_at"] <= go.clock.now()
    assert await b.run_once() == 1  # no need to wait for an expiry
    go.agent.let_go()
    done = await go.final(job["_id"])
    assert done["status"] == "SUCCEEDED", done["reason"]
    assert done["attempts"] == 2
    assert dict(go.agent.starts) == {f"{job['_id']}-0": 1, f"{job['_id']}-1": 1}
    assert await go.db.restore_points.count_documents({}) == 1
    assert len(s3_server.keys(go.s3.bucket)) == 3  # two items' files and the point's manifest


async def test_a_dead_replicas_job_is_taken_over_after_its_lease(go: GoRig) -> None:
    _, _, job = await go.backup()
    go.agent.hold()
    a, b = go.make_runner("replica-a"), go.make_runner("replica-b")
    await a.run_once()
    await go.started(job)
    stale = jobs.Lease(job["_id"], "replica-a", 1)
    await crash(a)
    assert await b.run_once() == 0  # the lease is still live
    await go.clock.advance(31)
    assert await b.run_once() == 1
    with pytest.raises(jobs.LeaseLost):  # the dead holder's writes are fenced off
        await jobs.update_held(go.db, stale, {"reason": "stale"})
    assert not await jobs.renew(go.db, stale, at=go.clock.now(), lease_seconds=30)
    go.agent.let_go()
    done = await go.final(job["_id"])
    assert done["status"] == "SUCCEEDED" and done["lease_owner"] is None
    assert done["attempts"] == 2 and done["reason"] is None
    assert all(n == 1 for n in go.agent.starts.values()) and len(go.agent.starts) == 2


async def test_a_request_that_reached_the_agent_is_re_attached_not_restarted(go: GoRig) -> None:
    """The holder died after the agent accepted the job but before recording it: the next
    holder's request with the same id gets 409 and polls that job."""
    _, _, job = await go.backup()
    go.agent.hold()
    a, b = go.make_runner("replica-a"), go.make_runner("replica-b")
    await a.run_once()
    await go.started(job)
    await crash(a)
    await go.db.jobs.update_one({"_id": job["_id"]}, {"$set": {"items.0.status": "QUEUED"}})
    await go.clock.advance(31)
    assert await b.run_once() == 1
    go.agent.let_go()
    done = await go.final(job["_id"])
    assert done["status"] == "SUCCEEDED", done["reason"]
    first_id = f"{job['_id']}-0"
    assert [b["id"] for k, b in go.agent.requests].count(first_id) == 2  # sent twice...
    assert go.agent.starts[first_id] == 1  # ...run once


async def test_a_restore_point_written_before_a_crash_completes_the_job(go: GoRig) -> None:
    _, _, job = await go.backup()
    a, b = go.make_runner("replica-a"), go.make_runner("replica-b")
    await a.run_once()
    await go.final(job["_id"])
    await crash(a)
    # as if replica-a had died right after writing the restore point
    await go.db.jobs.update_one(
        {"_id": job["_id"]},
        {
            "$set": {
                "status": "RUNNING",
                "lease_owner": "replica-a",
                "lease_expires_at": go.clock.now(),
                "ended_at": None,
                "restore_point_id": None,
            }
        },
    )
    await go.clock.advance(1)
    requests = len(go.agent.requests)
    assert await b.run_once() == 1
    done = await go.final(job["_id"])
    assert done["status"] == "SUCCEEDED" and done["restore_point_id"] == job["_id"]
    assert len(go.agent.requests) == requests  # nothing asked of the agent again
    assert await go.db.restore_points.count_documents({}) == 1


async def test_a_job_whose_replicas_keep_dying_fails_after_max_attempts(go: GoRig) -> None:
    _, _, job = await go.backup()
    await go.db.jobs.update_one(
        {"_id": job["_id"]},
        {
            "$set": {
                "status": "RUNNING",
                "attempts": 3,
                "lease_owner": "gone",
                "lease_expires_at": go.clock.now() - timedelta(seconds=1),
                "started_at": go.clock.now(),
                "deadline_at": go.clock.now() + timedelta(hours=1),
            }
        },
    )
    runner = go.make_runner(max_attempts=3)
    assert await runner.run_once() == 1
    done = await go.final(job["_id"])
    assert done["status"] == "FAILED" and "taken over 3 times" in done["reason"]
    assert not go.agent.requests
