"""The runner driving the Go agent's protocol (stand-in: ``go_agent.py``), with a manual
clock so that backoff, bounds and deadlines are exercised without waiting."""

from __future__ import annotations

import json

from backup import jobs, restore_points
from backup.clock import ManualClock
from backup.secrets import SecretBox
from backup.store import Store
from storage import S3Settings
from tests.runner.conftest import (
    DB_PASSWORD,
    ITEMS,
    RunnerFactory,
    final,
    seed_instance,
    seed_plan,
)
from tests.runner.go_agent import GoAgentStandIn
from tests.servers.s3 import SeaweedS3


async def test_backup_then_restore_with_the_go_protocol(
    store: Store,
    box: SecretBox,
    clock: ManualClock,
    go_agent: GoAgentStandIn,
    s3_server: SeaweedS3,
    s3_settings: S3Settings,
    make_runner: RunnerFactory,
) -> None:
    instance = await seed_instance(store, box, agent_url=go_agent.url)
    plan = await seed_plan(store, box, instance, s3_settings, encryption=True)
    job = await jobs.start_backup(store, plan)
    runner = make_runner()
    assert await runner.run_once() == 1
    done = await final(store, job["_id"], clock)
    assert done["status"] == "SUCCEEDED", done["reason"]
    assert done["reason"] is None and done["lease_owner"] is None
    assert done["started_at"] and done["ended_at"] and done["restore_point_id"] == job["_id"]
    assert done["agent"] == {"kind": "go", "version": None}

    # the old contract: compression flag and the plan's key to the scripts, no transform
    sent = [body for kind, body in go_agent.requests if kind == "backup"]
    assert [b["id"] for b in sent] == [f"{job['_id']}-0", f"{job['_id']}-1"]
    key = box.open_map(plan["secrets"], f"plans/{plan['_id']}")["encryption_key"]
    for body in sent:
        assert "transform" not in body and body["compression"] is True
        assert body["encryption_key"] == key
        assert body["backup"]["password"] == DB_PASSWORD
        assert {"BACKUP_PORT": "5432"} in body["backup"]["parameters"]
        dest = body["destination"]
        assert dest["filenamePrefix"] == f"{instance['_id']}/{plan['_id']}/"
        assert dest["bucket"] == s3_settings.bucket and dest["skipSSL"] is True

    point = await store.restore_points.find_one({"_id": job["_id"]})
    assert point is not None and point["state"] == "available"
    assert [i["name"] for i in point["items"]] == ITEMS
    for item in point["items"]:
        assert item["key"].startswith(f"{instance['_id']}/{plan['_id']}/")
        assert item["size"] == item["stored_size"] == len(go_agent.payload)
        assert item["compression"] == "script" and item["encryption"] == "script"
    assert sorted(s3_server.keys(s3_settings.bucket)) == sorted(i["key"] for i in point["items"])
    # the plan's key is kept with the restore point, sealed under its own context
    assert restore_points.encryption_key(box, point) == key
    assert key not in json.dumps(point, default=str)
    for item in done["items"]:
        assert item["status"] == "SUCCEEDED" and item["logs"]["backup_log"] == "out-backup"
        assert item["agent_job_id"].startswith(job["_id"])

    # restore it, after the plan is gone: the key comes from the restore point
    await store.plans.delete_one({"_id": plan["_id"]})
    restore = await jobs.start_restore(store, point, ["customers"])
    assert await runner.run_once() == 1
    done = await final(store, restore["_id"], clock)
    assert done["status"] == "SUCCEEDED", done["reason"]
    (kind, body) = go_agent.requests[-1]
    assert kind == "restore" and body["encryption_key"] == key and body["compression"] is True
    assert body["restore"]["database"] == "customers"
    stored = point["items"][1]["key"]
    assert body["destination"]["filenamePrefix"] + body["destination"]["filename"] == stored
    assert go_agent.downloaded == [stored]
    await runner.idle()


async def test_agent_down_at_start_fails_after_the_bound(
    store: Store,
    box: SecretBox,
    clock: ManualClock,
    s3_settings: S3Settings,
    make_runner: RunnerFactory,
) -> None:
    instance = await seed_instance(store, box, agent_url="http://127.0.0.1:9")
    plan = await seed_plan(store, box, instance, s3_settings)
    job = await jobs.start_backup(store, plan)
    runner = make_runner(agent_unreachable_seconds=120)
    await runner.run_once()
    done = await final(store, job["_id"], clock, step=5)
    assert done["status"] == "FAILED"
    assert "cannot be reached" in done["reason"] and "still so after 2 min" in done["reason"]
    assert (done["ended_at"] - done["started_at"]).total_seconds() >= 120
    assert [i["status"] for i in done["items"]] == ["CANCELLED", "CANCELLED"]
    assert await store.restore_points.count_documents({}) == 0
    await runner.idle()


async def test_wrong_agent_password_fails_at_once(
    store: Store,
    box: SecretBox,
    clock: ManualClock,
    go_agent: GoAgentStandIn,
    s3_settings: S3Settings,
    make_runner: RunnerFactory,
) -> None:
    instance = await seed_instance(store, box, agent_url=go_agent.url, password="wrong")
    plan = await seed_plan(store, box, instance, s3_settings)
    job = await jobs.start_backup(store, plan)
    runner = make_runner()
    await runner.run_once()
    done = await final(store, job["_id"], clock)
    assert done["status"] == "FAILED" and "refused the registered credentials" in done["reason"]
    assert not go_agent.starts
    await runner.idle()
