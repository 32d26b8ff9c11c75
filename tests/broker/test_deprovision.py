"""Deprovision removes the instance's plans, jobs, destinations and bindings; its restore points
are deleted (crypto-shredded: keys first, files after) only when the plan or a parameter says
so. By default they are kept as orphaned restore points, with the destinations that hold their
files, detached from the instance (backup/orphans.py). Files live on the real S3 server
(SeaweedFS)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from backup.retention import RetentionSweeper
from broker.context import SECRETS
from storage import ObjectNotFound, S3Settings, open_store
from tests.broker.conftest import TRANSIENT, Osb, parameters
from tests.broker.test_instances import running_job
from tests.servers.broker import Service
from tests.servers.ports import free_port
from tests.servers.seed import destination_body


async def api(broker: Service, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    import aiohttp

    headers = {"Authorization": aiohttp.encode_basic_auth("test-broker", "broker-pw-Zq8Vx3")}
    async with broker.http.request(method, broker.url + path, headers=headers, **kw) as r:
        return r.status, await r.json(content_type=None)


async def seed_backups(broker: Service, iid: str, s3: S3Settings, *, objects: int = 2) -> list[str]:
    """A destination and a plan through the API, and restore points whose files are really in
    the bucket (as the job runner would leave them)."""
    status, dest = await api(
        broker,
        "POST",
        f"/v1/service_instances/{iid}/destinations",
        json=destination_body(s3, name="primary"),
    )
    assert status == 201, dest
    status, plan = await api(
        broker,
        "POST",
        f"/v1/service_instances/{iid}/plans",
        json={
            "name": "nightly",
            "destination_id": dest["id"],
            "frequency": "0 3 * * *",
            "retention": {"style": "FILES", "period": 3},
        },
    )
    assert status == 201, plan
    keys = []
    async with open_store(s3) as store:
        for n in range(objects):
            key = f"{iid}/{plan['id']}/dump-{n}.sql"

            async def chunks() -> Any:
                yield b"backup bytes\n" * 100

            await store.upload(key, chunks())
            keys.append(key)
            await broker.db.restore_points.insert_one(
                {
                    "_id": uuid.uuid4().hex,
                    "instance_id": iid,
                    "plan_id": plan["id"],
                    "destination_id": dest["id"],
                    "job_id": f"job-{n}",
                    "created_at": datetime.now(UTC),
                    "expires_at": None,
                    "items": [{"name": "orders", "key": key, "filename": f"dump-{n}.sql"}],
                    "state": "available",
                    "schema_version": 1,
                }
            )
    await broker.db.jobs.insert_one(
        {**running_job(iid, "queued-1"), "status": "QUEUED", "plan_id": plan["id"]}
    )
    return keys


async def exists(s3: S3Settings, key: str) -> bool:
    async with open_store(s3) as store:
        try:
            await store.stat(key)
        except ObjectNotFound:
            return False
    return True


async def records(broker: Service, iid: str) -> dict[str, int]:
    return {
        name: await getattr(broker.db, name).count_documents({"instance_id": iid})
        for name in ("plans", "jobs", "destinations", "restore_points", "bindings")
    }


async def test_default_keeps_the_stored_backups(
    osb: Osb, broker: Service, agent_url: str, s3_settings: S3Settings
) -> None:
    iid = await osb.ready_instance(parameters(agent_url))
    keys = await seed_backups(broker, iid, s3_settings)
    assert (await osb.bind(iid, "b1"))[0] == 201
    status, data = await osb.deprovision(iid)
    assert status == 202
    result = await osb.wait(iid, data["operation"])
    assert result["state"] == "succeeded"
    assert "2 restore point(s) were kept" in result["description"]
    assert "orphaned restore points" in result["description"]
    assert await records(broker, iid) == dict.fromkeys(
        ("plans", "jobs", "destinations", "restore_points", "bindings"), 0
    )
    for key in keys:
        assert await exists(s3_settings, key), "kept"
    # The records stay, detached from the instance id (which a new instance may reuse).
    kept = await broker.db.restore_points.find({"orphaned.instance_id": iid}).to_list()
    assert len(kept) == 2 and all(p["instance_id"] is None for p in kept)
    assert all(p["state"] == "available" for p in kept)
    (dest,) = await broker.db.destinations.find({"orphaned.instance_id": iid}).to_list()
    assert dest["instance_id"] == f"orphaned/{dest['_id']}"
    assert {p["destination_id"] for p in kept} == {dest["_id"]}


@pytest.mark.parametrize("how", ["plan", "parameter"])
async def test_delete_backups_when_asked(
    osb: Osb, broker: Service, agent_url: str, s3_settings: S3Settings, how: str
) -> None:
    if how == "plan":
        iid = await osb.ready_instance(parameters(agent_url), plan_id=TRANSIENT)
    else:
        iid = await osb.ready_instance(parameters(agent_url, delete_backups_on_deprovision=True))
    keys = await seed_backups(broker, iid, s3_settings, objects=3)
    # Not synchronously: there are files to delete.
    status, data = await osb.deprovision(iid, accepts=False, plan_id=TRANSIENT)
    assert status == 422 and data["error"] == "AsyncRequired"
    assert [await exists(s3_settings, k) for k in keys] == [True] * 3, "a 4xx changes nothing"
    status, data = await osb.deprovision(iid)
    result = await osb.wait(iid, data["operation"])
    assert result["state"] == "succeeded", result
    for key in keys:
        assert not await exists(s3_settings, key)
    assert all(v == 0 for v in (await records(broker, iid)).values())
    assert await broker.db.restore_points.count_documents({"orphaned.instance_id": iid}) == 0
    assert await broker.db.destinations.count_documents({"orphaned.instance_id": iid}) == 0
    # The seeded points hold no key: the answer says they could not be crypto-shredded.
    assert "3 restore point(s) were not encrypted" in result["description"]


async def test_storage_down_leaves_shredded_files_to_the_sweep(
    osb: Osb, broker: Service, agent_url: str, s3_settings: S3Settings
) -> None:
    """The keys go first; files the storage refuses to delete no longer hold the deletion up
    (nothing can read them): the answer names them and the retention sweep deletes them."""
    iid = await osb.ready_instance(parameters(agent_url, delete_backups_on_deprovision=True))
    keys = await seed_backups(broker, iid, s3_settings, objects=1)
    box = broker.app[SECRETS]
    (point,) = await broker.db.restore_points.find({"instance_id": iid}).to_list()
    sealed = box.seal_map({"encryption_key": "a-data-key"}, f"restore_points/{point['_id']}")
    await broker.db.restore_points.update_one({"_id": point["_id"]}, {"$set": {"secrets": sealed}})
    broker.instances.storage_attempts = 2
    broker.instances.storage_retry_delay = 0.1
    # Point the destination at a port where no storage answers.
    real_endpoint = s3_settings.endpoint
    await broker.db.destinations.update_many(
        {"instance_id": iid}, {"$set": {"endpoint": f"http://127.0.0.1:{free_port()}"}}
    )
    _, data = await osb.deprovision(iid)
    result = await osb.wait(iid, data["operation"], timeout=300)
    assert result["state"] == "succeeded", result
    assert "The encryption keys of 1 restore point(s) were destroyed" in result["description"]
    assert f"could not be deleted yet ({keys[0]})" in result["description"]
    assert await exists(s3_settings, keys[0])
    (left,) = await broker.db.restore_points.find({"orphaned.instance_id": iid}).to_list()
    assert left["state"] == "deleting" and "secrets" not in left and left["shredded_at"]
    # The storage is back: the retention sweep deletes the files, the record, the destination.
    await broker.db.destinations.update_many(
        {"orphaned.instance_id": iid}, {"$set": {"endpoint": real_endpoint}}
    )
    sweeper = RetentionSweeper(broker.db, box)
    swept = await sweeper.run_once()
    assert swept.deleted == 1, swept
    assert not await exists(s3_settings, keys[0])
    assert await broker.db.restore_points.count_documents({"orphaned.instance_id": iid}) == 0
    assert await broker.db.destinations.count_documents({"orphaned.instance_id": iid}) == 0


async def test_pinned_points_are_kept_by_a_deprovision_that_deletes(
    osb: Osb, broker: Service, agent_url: str, s3_settings: S3Settings
) -> None:
    iid = await osb.ready_instance(parameters(agent_url, delete_backups_on_deprovision=True))
    keys = await seed_backups(broker, iid, s3_settings, objects=2)
    (pinned,) = await broker.db.restore_points.find(
        {"instance_id": iid, "items.key": keys[0]}
    ).to_list()
    await broker.db.restore_points.update_one({"_id": pinned["_id"]}, {"$set": {"pinned": True}})
    _, data = await osb.deprovision(iid)
    result = await osb.wait(iid, data["operation"])
    assert result["state"] == "succeeded", result
    assert "1 restore point(s) were kept" in result["description"]
    assert "1 of them are pinned" in result["description"]
    assert await exists(s3_settings, keys[0]) and not await exists(s3_settings, keys[1])
    (kept,) = await broker.db.restore_points.find({"orphaned.instance_id": iid}).to_list()
    assert kept["_id"] == pinned["_id"] and kept["state"] == "available"


async def test_webhooks_and_their_pending_deliveries_go_with_the_instance(
    osb: Osb, broker: Service, agent_url: str
) -> None:
    iid = await osb.ready_instance(parameters(agent_url))
    other = await osb.ready_instance(parameters(agent_url))
    for instance in (iid, other):
        await broker.db.webhooks.insert_one({"_id": uuid.uuid4().hex, "instance_id": instance})
        await broker.db.webhook_deliveries.insert_one(
            {"_id": uuid.uuid4().hex, "instance_id": instance, "state": "pending"}
        )
    _, data = await osb.deprovision(iid)
    if data:  # asynchronous
        assert (await osb.wait(iid, data["operation"]))["state"] == "succeeded"
    for coll in (broker.db.webhooks, broker.db.webhook_deliveries):
        assert await coll.count_documents({"instance_id": iid}) == 0
        assert await coll.count_documents({"instance_id": other}) == 1


async def test_synchronous_deprovision_when_nothing_waits(
    osb: Osb, broker: Service, agent_url: str, s3_settings: S3Settings
) -> None:
    iid = await osb.ready_instance(parameters(agent_url))
    await seed_backups(broker, iid, s3_settings, objects=1)
    status, data = await osb.deprovision(iid, accepts=False)
    assert (status, data) == (200, {})
    assert all(v == 0 for v in (await records(broker, iid)).values())
    status, body = await osb.last_operation(iid)
    assert status == 200 and body["state"] == "succeeded"


async def test_running_jobs_are_abandoned_after_the_wait(
    osb: Osb, broker: Service, agent_url: str
) -> None:
    broker.instances.job_wait = 1.0
    iid = await osb.ready_instance(parameters(agent_url))
    await broker.db.jobs.insert_one(running_job(iid))
    status, data = await osb.deprovision(iid)
    assert status == 202
    result = await osb.wait(iid, data["operation"])
    assert result["state"] == "succeeded"
    assert "1 running job(s) were abandoned" in result["description"]


async def test_files_of_failed_backups_are_deleted_even_when_backups_are_kept(
    osb: Osb, broker: Service, agent_url: str, s3_settings: S3Settings
) -> None:
    """A failed backup's upload that could not be deleted at the time is recorded on its job
    (``pending_deletes``); the job's record goes with the instance, so its file must too."""
    iid = await osb.ready_instance(parameters(agent_url))
    kept = await seed_backups(broker, iid, s3_settings, objects=1)
    dest = await broker.db.destinations.find_one({"instance_id": iid})
    orphan = f"{iid}/failed-job/dump.sql"
    async with open_store(s3_settings) as store:

        async def chunks() -> Any:
            yield b"half a backup"

        await store.upload(orphan, chunks())
    await broker.db.jobs.insert_one(
        {
            **running_job(iid, "failed-1"),
            "status": "FAILED",
            "pending_deletes": [{"destination_id": dest["_id"], "key": orphan}],
        }
    )
    status, data = await osb.deprovision(iid, accepts=False)
    assert status == 422 and data["error"] == "AsyncRequired", "storage work is asynchronous"
    status, data = await osb.deprovision(iid)
    assert status == 202
    result = await osb.wait(iid, data["operation"])
    assert result["state"] == "succeeded", result
    assert not await exists(s3_settings, orphan)
    assert await exists(s3_settings, kept[0]), "backups are kept by default"
    assert all(v == 0 for v in (await records(broker, iid)).values())


async def test_operators_see_restore_and_delete_orphaned_points(
    osb: Osb, broker: Service, agent_url: str, s3_settings: S3Settings
) -> None:
    """The API of orphaned restore points: operators only, validated, and a delete that
    destroys the key before the files and says what it did."""
    iid = await osb.ready_instance(parameters(agent_url))
    keys = await seed_backups(broker, iid, s3_settings, objects=2)
    box = broker.app[SECRETS]
    points = await broker.db.restore_points.find({"instance_id": iid}).to_list()
    for p in points:  # both of one plan: the same key, each point its own sealed copy
        sealed = box.seal_map({"encryption_key": "plan-key"}, f"restore_points/{p['_id']}")
        await broker.db.restore_points.update_one({"_id": p["_id"]}, {"$set": {"secrets": sealed}})
    _, data = await osb.deprovision(iid)
    assert (await osb.wait(iid, data["operation"]))["state"] == "succeeded"
    target = await osb.ready_instance(parameters(agent_url))
    status, binding = await osb.bind(target, "b-tenant")
    assert status == 201, binding
    tenant = {"Authorization": f"Bearer {binding['credentials']['key']}"}

    # A tenant (even of a live instance) may not see them: 403, never a list.
    for method, path, kw in (
        ("GET", "/v1/orphaned_restore_points", {}),
        ("GET", f"/v1/orphaned_restore_points/{points[0]['_id']}", {}),
        ("DELETE", f"/v1/orphaned_restore_points/{points[0]['_id']}", {}),
        (
            "POST",
            f"/v1/orphaned_restore_points/{points[0]['_id']}/restores",
            {"json": {"target_instance_id": target}},
        ),
    ):
        async with broker.http.request(method, broker.url + path, headers=tenant, **kw) as r:
            assert r.status == 403, (method, path, await r.text())
            assert (await r.json())["error"] == "forbidden"

    status, page = await api(broker, "GET", f"/v1/orphaned_restore_points?instance_id={iid}")
    assert status == 200 and page["total"] == 2, page
    assert {p["id"] for p in page["items"]} == {p["_id"] for p in points}
    assert all(p["orphaned"]["instance_id"] == iid for p in page["items"])
    assert all(p["encryption_key_set"] for p in page["items"])
    status, page = await api(broker, "GET", "/v1/orphaned_restore_points?instance_id=other")
    assert (status, page["total"]) == (200, 0)
    first = points[0]["_id"]
    status, one = await api(broker, "GET", f"/v1/orphaned_restore_points/{first}")
    assert status == 200 and one["id"] == first and "secrets" not in one

    # Validation: each refusal is a clear JSON error and queues nothing.
    restores = f"/v1/orphaned_restore_points/{first}/restores"
    for body, code, error in (
        ({}, 400, "invalid_input"),
        ({"target_instance_id": target, "extra": 1}, 400, "invalid_input"),
        ({"target_instance_id": 5}, 400, "invalid_input"),
        ({"target_instance_id": str(uuid.uuid4())}, 404, "instance_not_found"),
        ({"target_instance_id": iid}, 404, "instance_not_found"),  # deleted
        ({"target_instance_id": target, "items": ["not-in-it"]}, 400, "unknown_item"),
        ({"target_instance_id": target, "items": [{"name": "orders", "target": "x"}]}, 400,
         "unknown_item"),
    ):  # fmt: skip
        status, answer = await api(broker, "POST", restores, json=body)
        assert (status, answer["error"]) == (code, error), (body, answer)
    status, answer = await api(
        broker,
        "POST",
        "/v1/orphaned_restore_points/nope/restores",
        json={"target_instance_id": target},
    )
    assert (status, answer["error"]) == (404, "restore_point_not_found"), answer
    assert await broker.db.jobs.count_documents({"instance_id": target}) == 0

    # A restore into a live instance is that instance's job (run by the runner elsewhere).
    status, job = await api(broker, "POST", restores, json={"target_instance_id": target})
    assert status == 202, job
    assert job["type"] == "RESTORE" and job["restore_point_id"] == first
    assert job["source_instance_id"] == iid
    assert (await broker.db.jobs.find_one({"_id": job["id"]}))["instance_id"] == target
    # ... and keeps its point from being deleted meanwhile.
    status, answer = await api(broker, "DELETE", f"/v1/orphaned_restore_points/{first}")
    assert (status, answer["error"]) == (409, "restore_point_in_use"), answer
    await broker.db.jobs.delete_one({"_id": job["id"]})

    # The delete: key first, files after; the other point still holds the same key.
    status, shred = await api(broker, "DELETE", f"/v1/orphaned_restore_points/{first}")
    assert status == 200, shred
    assert shred["key_destroyed"] and shred["encrypted"] and shred["files_deleted"], shred
    assert shred["key_still_held_by"] == [f"restore_points/{points[1]['_id']}"]
    assert shred["files_remaining"] == []
    assert "still held" in shred["description"]
    first_key, second_key = (p["items"][0]["key"] for p in points)
    assert {first_key, second_key} == set(keys)
    assert not await exists(s3_settings, first_key) and await exists(s3_settings, second_key)
    status, answer = await api(broker, "GET", f"/v1/orphaned_restore_points/{first}")
    assert (status, answer["error"]) == (404, "restore_point_not_found")
    # The last one: its key held by nobody; then its destination goes too.
    status, shred = await api(broker, "DELETE", f"/v1/orphaned_restore_points/{points[1]['_id']}")
    assert status == 200 and shred["key_still_held_by"] == [], shred
    assert await broker.db.destinations.count_documents({"orphaned.instance_id": iid}) == 0
    entries = await broker.db.audit.find({"action": "delete_orphaned_restore_point"}).to_list()
    assert len(entries) == 2


async def test_orphaned_points_expire_by_their_retention(
    osb: Osb, broker: Service, agent_url: str, s3_settings: S3Settings
) -> None:
    """Their plan is gone: the retention sweep applies the retention recorded on each point
    (never deleting the newest), and removes the orphaned destination with the last one."""
    iid = await osb.ready_instance(parameters(agent_url))
    keys = await seed_backups(broker, iid, s3_settings, objects=2)
    old, new = sorted(
        await broker.db.restore_points.find({"instance_id": iid}).to_list(),
        key=lambda p: p["created_at"],
    )
    long_ago = datetime(2020, 1, 1, tzinfo=UTC)
    days = {"style": "DAYS", "period": 7}
    await broker.db.restore_points.update_one(
        {"_id": old["_id"]}, {"$set": {"created_at": long_ago, "retention": days}}
    )
    await broker.db.restore_points.update_one(
        {"_id": new["_id"]}, {"$set": {"created_at": long_ago.replace(day=2), "retention": days}}
    )
    _, data = await osb.deprovision(iid)
    assert (await osb.wait(iid, data["operation"]))["state"] == "succeeded"
    sweeper = RetentionSweeper(broker.db, broker.app[SECRETS])
    swept = await sweeper.run_once()
    assert swept.deleted == 1, swept
    (left,) = await broker.db.restore_points.find({"orphaned.instance_id": iid}).to_list()
    assert left["_id"] == new["_id"], "the newest point is never deleted by retention"
    assert not await exists(s3_settings, old["items"][0]["key"])
    assert await exists(s3_settings, new["items"][0]["key"])
    assert {old["items"][0]["key"], new["items"][0]["key"]} == set(keys)
    assert await broker.db.destinations.count_documents({"orphaned.instance_id": iid}) == 1
    # An operator deletes the last one; the next sweep has nothing left to keep the
    # destination for (the delete prunes it already).
    status, _ = await api(broker, "DELETE", f"/v1/orphaned_restore_points/{new['_id']}")
    assert status == 200
    await sweeper.run_once()
    assert await broker.db.destinations.count_documents({"orphaned.instance_id": iid}) == 0


async def test_a_locked_point_is_shredded_now_and_its_files_deleted_when_the_lock_lapses(
    osb: Osb, broker: Service, agent_url: str, s3_settings: S3Settings
) -> None:
    """S3 Object Lock keeps the files until their date; the key goes at once, and the
    keyless record stays 'deleting' (never 'available' again) until the sweep can delete."""
    iid = await osb.ready_instance(parameters(agent_url, delete_backups_on_deprovision=True))
    (key,) = await seed_backups(broker, iid, s3_settings, objects=1)
    box = broker.app[SECRETS]
    (point,) = await broker.db.restore_points.find({"instance_id": iid}).to_list()
    sealed = box.seal_map({"encryption_key": "a-data-key"}, f"restore_points/{point['_id']}")
    until = datetime(2999, 1, 1, tzinfo=UTC)
    await broker.db.restore_points.update_one(
        {"_id": point["_id"]}, {"$set": {"secrets": sealed, "locked_until": until}}
    )
    _, data = await osb.deprovision(iid)
    result = await osb.wait(iid, data["operation"])
    assert result["state"] == "succeeded", result
    assert "The encryption keys of 1 restore point(s) were destroyed" in result["description"]
    assert key in result["description"]
    sweeper = RetentionSweeper(broker.db, box)
    await sweeper.run_once()
    left = await broker.db.restore_points.find_one({"_id": point["_id"]})
    assert left["state"] == "deleting" and "secrets" not in left, left
    assert await exists(s3_settings, key)
    # The lock lapses: the next sweep deletes the files and the record.
    await broker.db.restore_points.update_one(
        {"_id": point["_id"]}, {"$set": {"locked_until": datetime(2000, 1, 1, tzinfo=UTC)}}
    )
    swept = await sweeper.run_once()
    assert swept.deleted == 1, swept
    assert not await exists(s3_settings, key)
    assert await broker.db.restore_points.find_one({"_id": point["_id"]}) is None
