"""Replicas that stop, restart or die while driving a job: another one finishes it, the
agent runs each item once, one restore point is written."""

from __future__ import annotations

from datetime import timedelta

import pytest

from backup import jobs
from backup.clock import ManualClock
from backup.secrets import SecretBox
from backup.store import Store
from storage import S3Settings
from tests.runner.conftest import (
    RunnerFactory,
    crash,
    final,
    item_started,
    seed_instance,
    seed_plan,
    until,
)
from tests.runner.go_agent import GoAgentStandIn
from tests.servers.s3 import SeaweedS3


async def _queued(store: Store, box: SecretBox, agent: GoAgentStandIn, s3: S3Settings) -> dict:
    instance = await seed_instance(store, box, agent_url=agent.url)
    plan = await seed_plan(store, box, instance, s3)
    return await jobs.start_backup(store, plan)


async def test_a_stopping_replica_releases_and_another_resumes_at_once(
    store: Store,
    box: SecretBox,
    clock: ManualClock,
    go_agent: GoAgentStandIn,
    s3_server: SeaweedS3,
    s3_settings: S3Settings,
    make_runner: RunnerFactory,
) -> None:
    job = await _queued(store, box, go_agent, s3_settings)
    go_agent.hold()
    a, b = make_runner("replica-a"), make_runner("replica-b")
    assert await a.run_once() == 1
    await until(lambda: item_started(go_agent, f"{job['_id']}-0"), clock=clock)
    await a.stop()  # SIGTERM: the lease is released, the job stays RUNNING
    held = await store.jobs.find_one({"_id": job["_id"]})
    assert held["status"] == "RUNNING" and held["lease_expires_at"] <= clock.now()
    assert await b.run_once() == 1  # no need to wait for an expiry
    go_agent.let_go()
    done = await final(store, job["_id"], clock)
    assert done["status"] == "SUCCEEDED", done["reason"]
    assert done["attempts"] == 2
    assert dict(go_agent.starts) == {f"{job['_id']}-0": 1, f"{job['_id']}-1": 1}
    assert await store.restore_points.count_documents({}) == 1
    assert len(s3_server.keys(s3_settings.bucket)) == 2


async def test_a_dead_replicas_job_is_taken_over_after_its_lease(
    store: Store,
    box: SecretBox,
    clock: ManualClock,
    go_agent: GoAgentStandIn,
    s3_settings: S3Settings,
    make_runner: RunnerFactory,
) -> None:
    job = await _queued(store, box, go_agent, s3_settings)
    go_agent.hold()
    a, b = make_runner("replica-a"), make_runner("replica-b")
    await a.run_once()
    await until(lambda: item_started(go_agent, f"{job['_id']}-0"), clock=clock)
    stale = jobs.Lease(job["_id"], "replica-a", 1)
    await crash(a)
    assert await b.run_once() == 0  # the lease is still live
    await clock.advance(31)
    assert await b.run_once() == 1
    with pytest.raises(jobs.LeaseLost):  # the dead holder's writes are fenced off
        await jobs.update_held(store, stale, {"reason": "stale"})
    assert not await jobs.renew(store, stale, at=clock.now(), lease_seconds=30)
    go_agent.let_go()
    done = await final(store, job["_id"], clock)
    assert done["status"] == "SUCCEEDED" and done["lease_owner"] is None
    assert done["attempts"] == 2 and done["reason"] is None
    assert all(n == 1 for n in go_agent.starts.values()) and len(go_agent.starts) == 2


async def test_a_request_that_reached_the_agent_is_re_attached_not_restarted(
    store: Store,
    box: SecretBox,
    clock: ManualClock,
    go_agent: GoAgentStandIn,
    s3_settings: S3Settings,
    make_runner: RunnerFactory,
) -> None:
    """The holder died after the agent accepted the job but before recording it: the next
    holder's request with the same id gets 409 and polls that job."""
    job = await _queued(store, box, go_agent, s3_settings)
    go_agent.hold()
    a, b = make_runner("replica-a"), make_runner("replica-b")
    await a.run_once()
    await until(lambda: item_started(go_agent, f"{job['_id']}-0"), clock=clock)
    await crash(a)
    await store.jobs.update_one({"_id": job["_id"]}, {"$set": {"items.0.status": "QUEUED"}})
    await clock.advance(31)
    assert await b.run_once() == 1
    go_agent.let_go()
    done = await final(store, job["_id"], clock)
    assert done["status"] == "SUCCEEDED", done["reason"]
    first_id = f"{job['_id']}-0"
    assert [b["id"] for k, b in go_agent.requests].count(first_id) == 2  # sent twice...
    assert go_agent.starts[first_id] == 1  # ...run once


async def test_a_restore_point_written_before_a_crash_completes_the_job(
    store: Store,
    box: SecretBox,
    clock: ManualClock,
    go_agent: GoAgentStandIn,
    s3_settings: S3Settings,
    make_runner: RunnerFactory,
) -> None:
    job = await _queued(store, box, go_agent, s3_settings)
    a, b = make_runner("replica-a"), make_runner("replica-b")
    await a.run_once()
    await final(store, job["_id"], clock)
    await crash(a)
    # as if replica-a had died right after writing the restore point
    await store.jobs.update_one(
        {"_id": job["_id"]},
        {
            "$set": {
                "status": "RUNNING",
                "lease_owner": "replica-a",
                "lease_expires_at": clock.now(),
                "ended_at": None,
                "restore_point_id": None,
            }
        },
    )
    await clock.advance(1)
    requests = len(go_agent.requests)
    assert await b.run_once() == 1
    done = await final(store, job["_id"], clock)
    assert done["status"] == "SUCCEEDED" and done["restore_point_id"] == job["_id"]
    assert len(go_agent.requests) == requests  # nothing asked of the agent again
    assert await store.restore_points.count_documents({}) == 1


async def test_a_job_whose_replicas_keep_dying_fails_after_max_attempts(
    store: Store,
    box: SecretBox,
    clock: ManualClock,
    go_agent: GoAgentStandIn,
    s3_settings: S3Settings,
    make_runner: RunnerFactory,
) -> None:
    job = await _queued(store, box, go_agent, s3_settings)
    await store.jobs.update_one(
        {"_id": job["_id"]},
        {
            "$set": {
                "status": "RUNNING",
                "attempts": 3,
                "lease_owner": "gone",
                "lease_expires_at": clock.now() - timedelta(seconds=1),
                "started_at": clock.now(),
                "deadline_at": clock.now() + timedelta(hours=1),
            }
        },
    )
    runner = make_runner(max_attempts=3)
    assert await runner.run_once() == 1
    done = await final(store, job["_id"], clock)
    assert done["status"] == "FAILED" and "taken over 3 times" in done["reason"]
    assert not go_agent.requests
