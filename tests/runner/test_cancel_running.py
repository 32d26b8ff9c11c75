"""Cancelling a RUNNING job (issue 16, part 4): with our agent (a real process, real S3) the
runner asks it to stop the running item at its next stage boundary (``POST
/backup/{id}/cancel``), follows the item to its end (cleanup and unlock run there) and ends
the job CANCELLED without waiting for the stages that were still to come; a user's cancel
and a deprovision alike. With the Go protocol's stand-in, which has no cancel, the item runs
to its end as before."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from backup import jobs
from backup.clock import SystemClock
from backup.database import Database, Document
from backup.deprovision import Steps
from storage import S3Settings, open_store
from tests.agent.helpers import PASSWORD, USER, AgentProcess
from tests.agent.test_cancel import pausing, release, stages
from tests.agent.test_faults import scripts_with, wait_for
from tests.runner.conftest import GoRig, RunnerFactory, final, seed_instance, seed_plan, until
from tests.servers.s3 import SeaweedS3

# The backup script would take a minute: a job that waited for it would not end promptly.
LONG_BACKUP = 'sleep 60; echo data > "$BACKUP_DIRECTORY/$BACKUP_FILENAME.txt"'


async def _ours_backup(
    store: Database, box: Any, agent: AgentProcess, s3: S3Settings
) -> tuple[Document, Document]:
    instance = await seed_instance(
        store, box, agent_url=f"http://127.0.0.1:{agent.port}", username=USER, password=PASSWORD
    )
    plan = await seed_plan(store, box, instance, s3, items=["orders"])
    return instance, await jobs.start_backup(store, plan)


def _runner(make_runner: RunnerFactory, **settings: Any) -> Any:
    return make_runner(
        clock=None,
        agent_poll_min_seconds=0.2,
        agent_poll_max_seconds=0.5,
        agent_timeout_seconds=2.0,
        agent_unreachable_seconds=30,
        **settings,
    )


async def _agent_asked(agent: AgentProcess, job: Document) -> None:
    """Until our agent has been asked to cancel the job's first item."""

    async def asked() -> bool:
        _, body = await asyncio.to_thread(agent.request, "GET", f"/backup/{job['_id']}-0")
        return bool(body.get("cancel_requested"))

    await until(asked, what="the agent to be asked")


def _agent(make_agent: Callable[..., AgentProcess], tmp_path: Path) -> AgentProcess:
    """Our agent whose pre-backup-check waits for the test's go, and whose backup script
    would take a minute."""
    scripts = scripts_with(
        tmp_path,
        **{"pre-backup-check": pausing(tmp_path, "check"), "backup.sh": LONG_BACKUP},
    )
    return make_agent(scripts=scripts)


async def _check_started(tmp_path: Path) -> None:
    await asyncio.to_thread(wait_for, tmp_path / "check.started")


def _assert_stopped_at_the_boundary(done: Document, agent: AgentProcess, s3: S3Settings) -> None:
    (item,) = done["items"]
    assert item["status"] == "CANCELLED"
    assert "stopped by the agent at its next stage boundary" in item["error"]
    assert "cancelled by the manager" in item["error"]
    assert "out-post-backup-unlock" in item["logs"]["post_backup_unlock_log"]
    # The check that ran when the cancel came finished; the backup script never started.
    assert stages(agent) == ["pre-backup-lock", "pre-backup-check", "check", "post-backup-unlock"]
    assert done.get("restore_point_id") is None


async def test_a_users_cancel_stops_our_agent_at_the_next_stage_boundary(
    store: Database,
    box: Any,
    make_agent: Callable[..., AgentProcess],
    make_runner: RunnerFactory,
    s3_settings: S3Settings,
    s3_server: SeaweedS3,
    tmp_path: Path,
) -> None:
    agent = _agent(make_agent, tmp_path)
    instance, job = await _ours_backup(store, box, agent, s3_settings)
    with capture_logs() as logs:
        await _runner(make_runner).run_once()
        await _check_started(tmp_path)
        asked = await jobs.cancel(store, instance["_id"], job["_id"])
        assert asked["status"] == "RUNNING" and asked["cancel_requested"] is True

        await _agent_asked(agent, job)
        release(tmp_path, "check")
        began = time.monotonic()
        done = await final(store, job["_id"], timeout=30)
    assert time.monotonic() - began < 15  # not the minute the backup script would take
    assert done["status"] == "CANCELLED", done["reason"]
    assert done["reason"] == "Cancelled by a user."
    _assert_stopped_at_the_boundary(done, agent, s3_settings)
    assert await store.restore_points.count_documents({}) == 0
    assert s3_server.keys(s3_settings.bucket) == []
    assert [x["event"] for x in logs if x.get("event") == "agent_cancel_sent"] == [
        "agent_cancel_sent"
    ]
    # The manager is done with the agent's job: forgotten there.
    assert agent.request("GET", f"/backup/{job['_id']}-0")[0] == 404


async def test_a_deprovision_stops_our_agents_backup_at_the_next_stage_boundary(
    store: Database,
    box: Any,
    make_agent: Callable[..., AgentProcess],
    make_runner: RunnerFactory,
    s3_settings: S3Settings,
    s3_server: SeaweedS3,
    tmp_path: Path,
) -> None:
    agent = _agent(make_agent, tmp_path)
    instance, job = await _ours_backup(store, box, agent, s3_settings)
    await _runner(make_runner).run_once()
    await _check_started(tmp_path)
    # What the deprovision does (backup/deprovision.py): the instance is in deletion, its
    # plans go, its running jobs are asked to stop and waited for.
    await store.instances.update_one(
        {"_id": instance["_id"]}, {"$set": {"state": "deprovisioning"}}
    )
    clock = SystemClock()
    steps = Steps(store, box, clock, open_store, 3, 0.1)
    await steps.remove_plans(instance["_id"])
    waiting = asyncio.ensure_future(
        steps.stop_jobs(instance["_id"], clock.now() + timedelta(seconds=60), 60)
    )

    await _agent_asked(agent, job)
    release(tmp_path, "check")
    began = time.monotonic()
    abandoned = await asyncio.wait_for(waiting, 30)
    assert abandoned == 0  # it ended within the wait: none abandoned
    assert time.monotonic() - began < 15
    done = await final(store, job["_id"])
    assert done["status"] == "CANCELLED", done["reason"]
    assert done["reason"] == "Cancelled: the service instance is being deleted."
    _assert_stopped_at_the_boundary(done, agent, s3_settings)
    assert await store.restore_points.count_documents({}) == 0
    assert s3_server.keys(s3_settings.bucket) == []


async def test_the_go_agent_has_no_cancel_its_item_runs_to_its_end(go: GoRig) -> None:
    """The Go agent keeps its behaviour: a cancel during the last item lets it complete (no
    cancel request reaches the agent, whose stages all run), and the reason says so."""
    instance, _, job = await go.backup(items=["orders"])
    go.agent.hold()
    with capture_logs() as logs:
        await go.make_runner().run_once()
        await go.started(job)
        await jobs.cancel(go.db, instance["_id"], job["_id"])
        await go.clock.advance(10)
        go.agent.let_go()
        done = await go.final(job["_id"])
    assert not [x for x in logs if str(x.get("event")).startswith("agent_cancel")]
    assert done["status"] == "SUCCEEDED", done["reason"]
    assert done["reason"].startswith("A cancel was requested while the last item ran")
    (item,) = done["items"]
    assert item["status"] == "SUCCEEDED"
    assert item["logs"]["backup_log"] and item["logs"]["post_backup_unlock_log"]


async def test_at_its_deadline_our_agents_item_is_asked_to_stop_not_left_running(
    store: Database,
    box: Any,
    make_agent: Callable[..., AgentProcess],
    make_runner: RunnerFactory,
    s3_settings: S3Settings,
    s3_server: SeaweedS3,
    tmp_path: Path,
) -> None:
    """A job that outlives its deadline ends FAILED at once; an item still running on our
    agent is asked to stop at its next stage boundary rather than left to run its remaining
    stages unwatched (the backup script would take a minute here): the unlock still runs."""
    agent = _agent(make_agent, tmp_path)
    _, job = await _ours_backup(store, box, agent, s3_settings)
    # The deadline passes while the check waits for the test's go.
    await _runner(make_runner, job_deadline_seconds=3).run_once()
    await _check_started(tmp_path)
    done = await final(store, job["_id"], timeout=30)
    assert done["status"] == "FAILED", done
    assert "did not end within its deadline" in done["reason"]
    assert "asked to stop it at its next stage boundary" in done["reason"]
    assert "post-backup-unlock" in done["reason"]

    await _agent_asked(agent, job)
    release(tmp_path, "check")

    async def agent_done() -> bool:
        _, body = await asyncio.to_thread(agent.request, "GET", f"/backup/{job['_id']}-0")
        return body.get("status") in ("SUCCEEDED", "FAILED")

    await until(agent_done, what="the agent's job to end", timeout=30)
    _, body = await asyncio.to_thread(agent.request, "GET", f"/backup/{job['_id']}-0")
    assert body["status"] == "FAILED" and body.get("cancelled") is True, body
    assert stages(agent) == ["pre-backup-lock", "pre-backup-check", "check", "post-backup-unlock"]
    assert s3_server.keys(s3_settings.bucket) == []
