"""The runner driving the Go agent's protocol (stand-in: ``go_agent.py``), with a manual
clock so that backoff, bounds and deadlines are exercised without waiting."""

from __future__ import annotations

import json

import pytest

from backup import jobs, restore_points
from storage import SwiftSettings
from tests.runner.conftest import GoRig, seed_instance, seed_plan, until
from tests.runner.go_agent import BACKUP_STAGES, GoAgentStandIn
from tests.servers.s3 import SeaweedS3
from tests.servers.seed import DB_PASSWORD, ITEMS


async def test_backup_then_restore_with_the_go_protocol(go: GoRig, s3_server: SeaweedS3) -> None:
    instance, plan, job = await go.backup(encryption=True)
    runner = go.make_runner()
    assert await runner.run_once() == 1
    done = await go.final(job["_id"])
    assert done["status"] == "SUCCEEDED", done["reason"]
    assert done["reason"] is None and done["lease_owner"] is None
    assert done["started_at"] and done["ended_at"] and done["restore_point_id"] == job["_id"]
    assert done["agent"] == {"kind": "go", "version": None}

    # the old contract: compression flag and the plan's key to the scripts, no transform
    sent = [body for kind, body in go.agent.requests if kind == "backup"]
    assert [b["id"] for b in sent] == [f"{job['_id']}-0", f"{job['_id']}-1"]
    key = go.box.open_map(plan["secrets"], f"plans/{plan['_id']}")["encryption_key"]
    for n, body in enumerate(sent):
        assert "transform" not in body and body["compression"] is True
        assert body["encryption_key"] == key
        assert body["backup"]["password"] == DB_PASSWORD
        assert {"BACKUP_PORT": "5432"} in body["backup"]["parameters"]
        dest = body["destination"]
        # a folder per agent job: agents name files by the minute
        assert dest["filenamePrefix"] == f"{instance['_id']}/{plan['_id']}/{job['_id']}-{n}/"
        assert dest["bucket"] == go.s3.bucket and dest["skipSSL"] is True

    point = await go.db.restore_points.find_one({"_id": job["_id"]})
    assert point is not None and point["state"] == "available"
    assert [i["name"] for i in point["items"]] == ITEMS
    for item in point["items"]:
        assert item["key"].startswith(f"{instance['_id']}/{plan['_id']}/")
        assert item["size"] == item["stored_size"] == len(go.agent.payload)
        assert item["compression"] == "script" and item["encryption"] == "script"
    assert sorted(s3_server.keys(go.s3.bucket)) == sorted(
        [*(i["key"] for i in point["items"]), point["manifest_key"]]
    )
    # the plan's key is kept with the restore point, sealed under its own context
    assert restore_points.encryption_key(go.box, point) == key
    assert key not in json.dumps(point, default=str)
    for item in done["items"]:
        assert item["status"] == "SUCCEEDED" and item["logs"]["backup_log"] == "out-backup"
        assert item["agent_job_id"].startswith(job["_id"])

    # restore it, after the plan is gone: the key comes from the restore point
    await go.db.plans.delete_one({"_id": plan["_id"]})
    restore = await jobs.start_restore(go.db, point, ["customers"])
    assert await runner.run_once() == 1
    done = await go.final(restore["_id"])
    assert done["status"] == "SUCCEEDED", done["reason"]
    (kind, body) = go.agent.requests[-1]
    assert kind == "restore" and body["encryption_key"] == key and body["compression"] is True
    assert body["restore"]["database"] == "customers"
    stored = point["items"][1]["key"]
    assert body["destination"]["filenamePrefix"] + body["destination"]["filename"] == stored
    assert go.agent.downloaded == [stored]
    # each agent job is forgotten once its outcome is recorded (the Go agent keeps jobs in
    # memory until told so)
    assert go.agent.forgotten == [f"{job['_id']}-0", f"{job['_id']}-1", f"{restore['_id']}-0"]
    assert not go.agent.jobs
    await runner.idle()


async def test_agent_down_at_start_fails_after_the_bound(go: GoRig) -> None:
    _, _, job = await go.backup(agent_url="http://127.0.0.1:9")
    runner = go.make_runner(agent_unreachable_seconds=120)
    await runner.run_once()
    done = await go.final(job["_id"], step=5)
    assert done["status"] == "FAILED"
    assert "cannot be reached" in done["reason"] and "still so after 2 min" in done["reason"]
    assert (done["ended_at"] - done["started_at"]).total_seconds() >= 120
    assert [i["status"] for i in done["items"]] == ["CANCELLED", "CANCELLED"]
    assert await go.db.restore_points.count_documents({}) == 0
    await runner.idle()


async def test_wrong_agent_password_fails_at_once(go: GoRig) -> None:
    _, _, job = await go.backup(password="wrong")
    runner = go.make_runner()
    await runner.run_once()
    done = await go.final(job["_id"])
    assert done["status"] == "FAILED" and "refused the registered credentials" in done["reason"]
    assert not go.agent.starts
    await runner.idle()


async def test_agent_that_forgets_the_job_fails_it(go: GoRig) -> None:
    _, _, job = await go.backup()
    go.agent.hold()
    await go.make_runner().run_once()
    await go.started(job)
    await go.agent.restart()  # the Go agent keeps jobs in memory only
    done = await go.final(job["_id"])
    assert done["status"] == "FAILED"
    assert "Item 'orders' failed" in done["reason"] and "no longer knows" in done["reason"]
    assert done["items"][0]["status"] == "FAILED" and done["items"][1]["status"] == "CANCELLED"
    assert await go.db.restore_points.count_documents({}) == 0


async def test_a_failed_item_fails_the_backup_and_its_sibling_files_are_deleted(
    go: GoRig, s3_server: SeaweedS3
) -> None:
    _, _, job = await go.backup()
    go.agent.fail_stage, go.agent.fail_database = "backup", "customers"
    await go.make_runner().run_once()
    done = await go.final(job["_id"])
    assert done["status"] == "FAILED"
    assert done["reason"].startswith("Item 'customers' failed: Executing the shell script failed")
    first, second = done["items"]
    assert first["status"] == "SUCCEEDED" and first["key"]
    assert second["status"] == "FAILED" and "shell script failed" in second["error"]
    assert second["logs"]["pre_backup_lock_log"] == "out-pre_backup_lock"
    # a failed backup is no restore point, and its uploaded file is no orphan either
    assert await go.db.restore_points.count_documents({}) == 0
    assert len(go.agent.uploaded) == 1 and s3_server.keys(go.s3.bucket) == []
    assert "pending_deletes" not in done


async def test_a_busy_agent_is_retried_and_each_item_starts_once(go: GoRig) -> None:
    _, _, job = await go.backup()
    go.agent.busy = 3
    await go.make_runner().run_once()
    done = await go.final(job["_id"])
    assert done["status"] == "SUCCEEDED", done["reason"]
    assert dict(go.agent.starts) == {f"{job['_id']}-0": 1, f"{job['_id']}-1": 1}


async def test_deadline_fails_the_job_and_the_late_upload_is_deleted_by_the_sweep(
    go: GoRig, s3_server: SeaweedS3
) -> None:
    _, _, job = await go.backup(items=["orders"])
    go.agent.hold()
    runner = go.make_runner(job_deadline_seconds=600)
    await runner.run_once()
    done = await go.final(job["_id"], step=20)
    assert done["status"] == "FAILED"
    assert done["reason"].startswith("The job did not end within its deadline (10 min)")
    assert "still running on the agent" in done["reason"]
    (item,) = done["items"]
    assert item["status"] == "FAILED" and "unlock script" in item["error"]
    (pending,) = done["pending_deletes"]
    assert pending["agent_job_id"] == f"{job['_id']}-0" and "key" not in pending
    # the agent finishes on its own and uploads; the sweep asks it and deletes the file
    go.agent.let_go()
    await until(lambda: _agent_done(go.agent, f"{job['_id']}-0"))
    assert len(s3_server.keys(go.s3.bucket)) == 1
    result = await runner.sweeper.run_once()
    assert result.orphans_deleted == 1
    assert s3_server.keys(go.s3.bucket) == []
    assert "pending_deletes" not in await go.db.jobs.find_one({"_id": job["_id"]})


async def _agent_done(agent: GoAgentStandIn, agent_job_id: str) -> bool:
    state = agent.jobs.get(("backup", agent_job_id))
    return bool(state and state["status"] != "RUNNING")


async def test_cancel_waits_for_the_running_item_then_discards_it(
    go: GoRig, s3_server: SeaweedS3
) -> None:
    instance, _, job = await go.backup()
    go.agent.hold()
    await go.make_runner().run_once()
    await go.started(job)
    cancelled = await jobs.cancel(go.db, instance["_id"], job["_id"])
    assert cancelled["status"] == "RUNNING" and cancelled["cancel_requested"] is True
    await go.clock.advance(10)
    go.agent.let_go()
    done = await go.final(job["_id"])
    assert done["status"] == "CANCELLED"
    assert done["reason"] == "Cancelled by a user; the files already uploaded (orders) are deleted."
    assert [i["status"] for i in done["items"]] == ["SUCCEEDED", "CANCELLED"]
    assert set(go.agent.starts) == {f"{job['_id']}-0"}  # the second item never started
    assert s3_server.keys(go.s3.bucket) == []
    assert await go.db.restore_points.count_documents({}) == 0


async def test_logs_are_bounded(go: GoRig) -> None:
    go.agent.log_text = "".join(f"line {n}\n" for n in range(20000))
    _, _, job = await go.backup(items=["orders"])
    await go.make_runner(log_max_bytes=2048).run_once()
    done = await go.final(job["_id"])
    logs = done["items"][0]["logs"]
    assert set(logs) == {f"{s}_log" for s in BACKUP_STAGES}
    for text in logs.values():
        assert len(text.encode()) < 2048 + 64 and text.endswith("line 19999\n")
        assert "earlier bytes cut" in text


async def test_an_upload_the_storage_does_not_have_is_no_restore_point(go: GoRig) -> None:
    _, _, job = await go.backup(items=["orders"])
    go.agent.lose_uploads = True
    await go.make_runner().run_once()
    done = await go.final(job["_id"])
    assert done["status"] == "FAILED"
    assert done["reason"] == (
        "The agent reported 'orders' uploaded, but the storage has no such object."
    )
    assert await go.db.restore_points.count_documents({}) == 0


async def test_retention_runs_after_each_successful_backup(go: GoRig, s3_server: SeaweedS3) -> None:
    _, plan, first = await go.backup(items=["orders"], retention={"style": "FILES", "period": 1})
    runner = go.make_runner()
    await runner.run_once()
    assert (await go.final(first["_id"]))["status"] == "SUCCEEDED"
    await runner.idle()
    await go.clock.advance(60)  # the agent names files by the minute
    go.agent.payload = b"second backup\n"
    second = await jobs.start_backup(go.db, plan)
    await runner.run_once()
    assert (await go.final(second["_id"]))["status"] == "SUCCEEDED"
    await runner.idle()  # the sweep of the plan runs right after the backup
    points = await go.db.restore_points.find({}).to_list()
    assert [p["_id"] for p in points] == [second["_id"]]
    assert sorted(s3_server.keys(go.s3.bucket)) == sorted(
        [points[0]["items"][0]["key"], points[0]["manifest_key"]]
    )


async def test_concurrency_limit_per_replica(go: GoRig) -> None:
    queued = [(await go.backup())[2] for _ in range(3)]
    go.agent.hold()
    one, other = go.make_runner("one", concurrency=2), go.make_runner("other", concurrency=2)
    assert await one.run_once() == 2
    assert await one.run_once() == 0  # full
    assert await other.run_once() == 1
    go.agent.let_go()
    for job in queued:
        assert (await go.final(job["_id"]))["status"] == "SUCCEEDED"


@pytest.mark.parametrize(
    ("swift", "named"),
    [
        (
            {"application_credential_id": "ac-1", "application_credential_secret": "ac-secret"},
            "application credential",
        ),
        (
            {"username": "u", "password": "p", "project_name": "p", "interface": "internal"},
            "interface",
        ),
        (
            {"username": "u", "password": "p", "project_name": "p", "region_name": "RegionTwo"},
            "region",
        ),
    ],
)
async def test_the_go_agent_is_not_sent_swift_settings_it_would_ignore(
    go: GoRig, swift: dict[str, str], named: str
) -> None:
    """The Go agent knows a Swift user's password and the catalog's default endpoint only: a
    job whose destination needs more fails at once, saying why, instead of the agent failing
    to authenticate or writing to another region's endpoint."""
    instance = await seed_instance(go.db, go.box, agent_url=go.agent.url)
    settings = SwiftSettings(auth_url="https://keystone.example/v3", container="c", **swift)
    plan = await seed_plan(go.db, go.box, instance, settings)
    job = await jobs.start_backup(go.db, plan)
    runner = go.make_runner()
    await runner.run_once()
    done = await go.final(job["_id"])
    assert done["status"] == "FAILED", done
    assert "Go agent" in done["reason"] and named in done["reason"], done["reason"]
    assert not go.agent.starts
    await runner.idle()
