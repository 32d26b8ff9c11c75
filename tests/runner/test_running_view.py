"""What a running job shows (issue 16, parts 2 to 4): the agent's current stage and when it was
last heard from, stage logs kept as they arrive (so that they outlive the agent), an agent
that stops answering logged once when it starts and once when it recovers or the job gives
up, reasons true of the agent's kind, agent jobs forgotten once the manager is done with
them, restores that record what they undid, and a deprovision that leaves no new restore
point. Both agent kinds: the Go protocol's stand-in (manual clock) and our agent as a real
process (real clock)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from structlog.testing import capture_logs

from backup import jobs
from backup.database import Database, Document
from backup.deprovision import Steps
from broker.api import views
from storage import S3Settings, open_store
from tests.agent.helpers import PASSWORD, USER, AgentProcess
from tests.runner.conftest import GoRig, RunnerFactory, final, seed_instance, seed_plan, until
from tests.runner.go_agent import GoAgentStandIn
from tests.servers.s3 import SeaweedS3

SLOW_BACKUP = (
    'echo "backup $*" >> "$TRACE"; sleep 3; printf data > "$BACKUP_DIRECTORY/$BACKUP_FILENAME.txt"'
    "; echo out-backup"
)
HANGING_BACKUP = 'echo "backup $*" >> "$TRACE"; sleep 60'


def api_view(doc: Document) -> dict[str, Any]:
    """The job as ``GET /v1/service_instances/{id}/jobs/{job}`` answers it."""
    return views.job(doc, 16384, 1 << 20).model_dump(mode="json")


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [x for x in logs if x.get("event") == name]


async def doc_of(store: Database, job_id: str) -> Document:
    doc = await store.jobs.find_one({"_id": job_id})
    assert doc is not None
    return doc


async def go_silent(agent: GoAgentStandIn) -> None:
    """The Go agent stops answering (its HTTP side down; its jobs go on)."""
    assert agent._runner is not None
    await agent._runner.cleanup()
    agent._runner = None


# ------------------------------------------------------------------ the Go protocol


async def test_go_running_item_shows_stage_and_last_heard_and_its_logs_outlive_a_restart(
    go: GoRig,
) -> None:
    _, _, job = await go.backup(items=["orders"])
    go.agent.hold()
    await go.make_runner().run_once()
    await go.started(job)

    async def in_backup_stage() -> Document | None:
        doc = await doc_of(go.db, job["_id"])
        item = doc["items"][0]
        logs = item.get("logs") or {}
        return doc if item.get("stage") == "backup" and logs.get("pre_backup_check_log") else None

    running = await until(in_backup_stage, clock=go.clock, what="the backup stage")
    view = api_view(running)
    (item,) = view["items"]
    assert view["status"] == "RUNNING" and item["status"] == "RUNNING"
    assert item["stage"] == "backup" and item["last_heard_at"]
    assert item["logs"]["pre_backup_lock_log"] == "out-pre_backup_lock"
    assert view["agent"] == {"kind": "go", "version": None}
    assert view["agent_unreachable_since"] is None
    heard = running["items"][0]["last_heard_at"]

    # Still heard from while it waits in one stage: last_heard_at moves on.
    async def heard_again() -> bool:
        doc = await doc_of(go.db, job["_id"])
        return doc["items"][0]["last_heard_at"] > heard

    await until(heard_again, clock=go.clock, what="last_heard_at to move")

    # The Go agent restarts and forgets the job: what finished before stays on the job, and
    # the reason says what the Go agent did not do.
    await go.agent.restart()
    done = await go.final(job["_id"])
    assert done["status"] == "FAILED"
    (item,) = api_view(done)["items"]
    assert item["logs"]["pre_backup_lock_log"] == "out-pre_backup_lock"
    assert item["logs"]["pre_backup_check_log"] == "out-pre_backup_check"
    assert item["stage"] == "backup"
    for text in (item["error"], done["reason"]):
        assert "Go agent keeps no job across a restart" in text, text
        assert "post-backup-unlock) did not run" in text
        assert "check that the database is not still locked" in text
        assert "runs its unlock script on its own" not in text


async def test_go_agent_silent_then_back_is_logged_once_each_way(go: GoRig) -> None:
    _, _, job = await go.backup(items=["orders"])
    go.agent.hold()
    with capture_logs() as logs:
        await go.make_runner().run_once()
        await go.started(job)
        await go_silent(go.agent)

        async def marked() -> Document | None:
            doc = await doc_of(go.db, job["_id"])
            return doc if doc.get("agent_unreachable_since") else None

        silent = await until(marked, clock=go.clock, what="agent_unreachable_since")
        assert api_view(silent)["agent_unreachable_since"]
        for _ in range(6):  # several polls fail meanwhile
            await go.clock.advance(5)
            await asyncio.sleep(0.05)
        await go.agent.start()

        async def cleared() -> bool:
            doc = await doc_of(go.db, job["_id"])
            return doc.get("agent_unreachable_since") is None

        await until(cleared, clock=go.clock, what="agent_unreachable_since cleared")
        go.agent.let_go()
        done = await go.final(job["_id"])
    assert done["status"] == "SUCCEEDED", done["reason"]
    assert len(events(logs, "agent_unreachable")) == 1
    (back,) = events(logs, "agent_reachable_again")
    assert back["unreachable_seconds"] >= 30 and back["log_level"] == "info"
    assert not events(logs, "agent_unreachable_gave_up")
    assert events(logs, "agent_unreachable")[0]["log_level"] == "warning"
    assert "go-agent-PW" not in repr(logs)


async def test_go_agent_silent_for_good_is_logged_when_the_job_gives_up(go: GoRig) -> None:
    _, _, job = await go.backup(items=["orders"])
    go.agent.hold()
    with capture_logs() as logs:
        await go.make_runner(agent_unreachable_seconds=60).run_once()
        await go.started(job)

        async def logged_stage() -> bool:
            doc = await doc_of(go.db, job["_id"])
            return doc["items"][0].get("stage") == "backup"

        await until(logged_stage, clock=go.clock)
        await go_silent(go.agent)
        done = await go.final(job["_id"], step=5)
    assert done["status"] == "FAILED"
    assert done["agent_unreachable_since"] is not None
    (item,) = done["items"]
    assert "no answer for 1 min" in item["error"]
    assert "if the Go agent stopped or restarted" in item["error"]
    assert "post-backup-unlock) did not run" in item["error"]
    assert item["logs"]["pre_backup_lock_log"] == "out-pre_backup_lock"
    assert len(events(logs, "agent_unreachable")) == 1
    (gave_up,) = events(logs, "agent_unreachable_gave_up")
    assert gave_up["status"] == "FAILED" and gave_up["unreachable_seconds"] >= 60
    assert not events(logs, "agent_reachable_again")
    await go.agent.start()  # for the fixture's stop


async def test_a_refused_request_is_forgotten_on_the_go_agent(go: GoRig) -> None:
    _, _, job = await go.backup(items=["orders"])
    go.agent.refuse = "body is missing essential fields: backup.host"
    await go.make_runner().run_once()
    done = await go.final(job["_id"])
    assert done["status"] == "FAILED" and "backup.host" in done["reason"]
    assert go.agent.forgotten == [f"{job['_id']}-0"]
    assert not go.agent.jobs


async def test_a_restore_records_what_it_undid(go: GoRig) -> None:
    _, _, job = await go.backup(items=["orders"], encryption=True, compression=True)
    runner = go.make_runner()
    await runner.run_once()
    assert (await go.final(job["_id"]))["status"] == "SUCCEEDED"
    point = await go.db.restore_points.find_one({"_id": job["_id"]})
    restore = await jobs.start_restore(go.db, point, None)
    await runner.run_once()
    done = await go.final(restore["_id"])
    assert done["status"] == "SUCCEEDED", done["reason"]
    (item,) = api_view(done)["items"]
    assert item["compression"] == "script" and item["encryption"] == "script"


async def test_a_deprovision_cancels_a_running_backup_without_a_new_restore_point(
    go: GoRig, s3_server: SeaweedS3
) -> None:
    instance, _, job = await go.backup(items=["orders"])
    go.agent.hold()
    runner = go.make_runner()
    await runner.run_once()
    await go.started(job)
    # What the deprovision does (backup/deprovision.py): the instance is in deletion, its
    # plans go, its running jobs are asked to stop and waited for.
    await go.db.instances.update_one(
        {"_id": instance["_id"]}, {"$set": {"state": "deprovisioning"}}
    )
    steps = Steps(go.db, go.box, go.clock, open_store, 3, 0.1)
    await steps.remove_plans(instance["_id"])
    waiting = _spawn(steps.stop_jobs(instance["_id"], go.clock.now() + timedelta(hours=1), 3600))

    async def asked() -> bool:
        return bool((await doc_of(go.db, job["_id"])).get("cancel_requested"))

    await until(asked, clock=go.clock)
    go.agent.let_go()  # the agent's stages run to their end, the unlock included
    done = await go.final(job["_id"])
    assert await until(lambda: _done(waiting), clock=go.clock) == [0]  # none abandoned
    assert done["status"] == "CANCELLED", done["reason"]
    assert done["reason"].startswith("Cancelled: the service instance is being deleted")
    assert done.get("restore_point_id") is None
    assert await go.db.restore_points.count_documents({}) == 0
    (item,) = done["items"]
    assert item["logs"]["post_backup_unlock_log"] == "out-post_backup_unlock"
    # the file it uploaded is no backup: deleted
    assert len(go.agent.uploaded) == 1 and s3_server.keys(go.s3.bucket) == []


def _spawn(coro: Any) -> Any:
    return asyncio.ensure_future(coro)


async def _done(task: Any) -> list[int] | None:
    return [task.result()] if task.done() else None


# ------------------------------------------------------------------ our agent (a process)


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
        agent_timeout_seconds=1.0,
        **settings,
    )


async def _in_stage(store: Database, job_id: str, stage: str) -> Document:
    async def check() -> Document | None:
        doc = await doc_of(store, job_id)
        item = doc["items"][0]
        return doc if item.get("stage") == stage and item.get("logs") else None

    return await until(check, what=f"stage {stage}")


async def test_our_agent_paused_then_resumed_is_logged_once_each_way(
    store: Database,
    box: Any,
    make_agent: Callable[..., AgentProcess],
    make_runner: RunnerFactory,
    s3_settings: S3Settings,
) -> None:
    agent = make_agent(backup_body=SLOW_BACKUP)
    _, job = await _ours_backup(store, box, agent, s3_settings)
    with capture_logs() as logs:
        await _runner(make_runner, agent_unreachable_seconds=60).run_once()
        running = await _in_stage(store, job["_id"], "backup")
        (item,) = api_view(running)["items"]
        assert item["stage"] == "backup" and item["last_heard_at"]
        assert "out-pre-backup-lock" in item["logs"]["pre_backup_lock_log"]
        assert api_view(running)["agent"]["kind"] == "ours"
        assert agent.proc is not None
        os.kill(agent.proc.pid, signal.SIGSTOP)  # alive, answering nothing
        try:

            async def marked() -> bool:
                return bool((await doc_of(store, job["_id"])).get("agent_unreachable_since"))

            await until(marked, what="agent_unreachable_since")
        finally:
            os.kill(agent.proc.pid, signal.SIGCONT)
        done = await final(store, job["_id"])
    assert done["status"] == "SUCCEEDED", done["reason"]
    assert done["agent_unreachable_since"] is None
    assert len(events(logs, "agent_unreachable")) == 1
    assert len(events(logs, "agent_reachable_again")) == 1
    assert not events(logs, "agent_unreachable_gave_up")


async def test_our_agent_killed_keeps_the_logs_and_says_what_it_does_on_restart(
    store: Database,
    box: Any,
    make_agent: Callable[..., AgentProcess],
    make_runner: RunnerFactory,
    s3_settings: S3Settings,
) -> None:
    agent = make_agent(backup_body=HANGING_BACKUP)
    _, job = await _ours_backup(store, box, agent, s3_settings)
    with capture_logs() as logs:
        await _runner(make_runner, agent_unreachable_seconds=3).run_once()
        await _in_stage(store, job["_id"], "backup")
        agent.kill()
        done = await final(store, job["_id"])
    assert done["status"] == "FAILED"
    (item,) = done["items"]
    assert "out-pre-backup-lock" in item["logs"]["pre_backup_lock_log"]
    assert "out-pre-backup-check" in item["logs"]["pre_backup_check_log"]
    assert "our agent stopped, it runs the unlock script (post-backup-unlock)" in item["error"]
    assert len(events(logs, "agent_unreachable")) == 1
    assert len(events(logs, "agent_unreachable_gave_up")) == 1


async def test_a_deprovision_that_abandons_a_go_agent_job_says_what_to_check(go: GoRig) -> None:
    instance, _, job = await go.backup(items=["orders"])
    go.agent.hold()
    await go.make_runner().run_once()
    await go.started(job)

    async def attached() -> bool:
        return bool((await doc_of(go.db, job["_id"])).get("agent"))

    await until(attached, clock=go.clock)
    steps = Steps(go.db, go.box, go.clock, open_store, 3, 0.1)
    assert await steps.stop_jobs(instance["_id"], go.clock.now(), 0) == 1
    done = await doc_of(go.db, job["_id"])
    assert done["status"] == "CANCELLED" and done["reason"].startswith("Abandoned")
    assert "the Go agent finishes it on its own, but skips its unlock script" in done["reason"]
    assert "check that the database is not still locked" in done["reason"]
    go.agent.let_go()
