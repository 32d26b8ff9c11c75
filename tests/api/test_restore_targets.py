"""Restores into another item or another instance (issue 17, part 3), through the API: who
may target what (a binding key only its own instance, a user what the Cloud Controller lets
it manage, operators and the broker any), a target the caller may not see answering exactly
like an unknown one, target items that must be registered on the target, and where the job
is recorded (the target) while the restore point stays with its source. The restores
themselves, run by real agents, are in tests/e2e/test_restore_targets.py."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from tests.api.conftest import (
    S3_BODY,
    Api,
    add_instance,
    insert_restore_point,
    plan_body,
)

OPERATOR_SCOPE = ["openid", "backup_manager.admin"]


async def _source(api: Api) -> tuple[str, str]:
    """An instance (items orders, customers) with a restore point of both; (instance, point)."""
    instance = await add_instance(api.db)
    status, dest = await api.call("POST", "/destinations", instance=instance, json=S3_BODY)
    assert status == 201, dest
    status, plan = await api.call("POST", "/plans", instance=instance, json=plan_body(dest["id"]))
    assert status == 201, plan
    return instance, await insert_restore_point(api, instance, dest["id"], plan["id"])


async def _binding_key(api: Api, instance: str) -> str:
    key = "bmk_" + uuid.uuid4().hex + "k" * 11
    await api.db.bindings.insert_one(
        {
            "_id": uuid.uuid4().hex,
            "instance_id": instance,
            "key_hash": hashlib.sha256(key.encode()).hexdigest(),
            "state": "ready",
            "schema_version": 1,
        }
    )
    return key


async def _restore(api: Api, instance: str, body: dict[str, Any], **kw: Any) -> tuple[int, Any]:
    return await api.call("POST", "/restores", instance=instance, json=body, **kw)


async def _no_jobs(api: Api, *instances: str) -> None:
    for instance in instances:
        assert await api.db.jobs.count_documents({"instance_id": instance}) == 0
        assert await api.db.jobs.count_documents({"source_instance_id": instance}) == 0


def _same_404(denied: Any, unknown: Any, target: str, missing: str) -> None:
    """A refused target and an unknown one answer alike, but for the id each names."""
    assert denied["error"] == unknown["error"] == "instance_not_found"
    assert denied["description"].replace(target, "X") == unknown["description"].replace(
        missing, "X"
    )
    assert set(denied) == set(unknown)


async def test_binding_key_restores_only_into_its_own_instance(api: Api) -> None:
    a, point = await _source(api)
    b = await add_instance(api.db)
    key = await _binding_key(api, a)
    body = {"restore_point_id": point, "target_instance_id": b}
    status, denied = await _restore(api, a, body, token=key)
    assert status == 404, denied
    missing = "no-such-" + uuid.uuid4().hex
    status, unknown = await _restore(api, a, {**body, "target_instance_id": missing}, token=key)
    assert status == 404, unknown
    _same_404(denied, unknown, b, missing)
    await _no_jobs(api, a, b)
    # naming its own instance as the target is the plain restore
    status, job = await _restore(api, a, {**body, "target_instance_id": a}, token=key)
    assert status == 202, job
    assert job["source_instance_id"] is None
    assert [(i["name"], i["target"]) for i in job["items"]] == [
        ("orders", "orders"),
        ("customers", "customers"),
    ]


async def test_user_needs_manage_on_the_target_too(api: Api) -> None:
    a, point = await _source(api)
    b = await add_instance(api.db)
    c = await add_instance(api.db)
    api.cc.grant("alice", a)
    api.cc.grant("alice", b, read=True, manage=False)
    token = api.uaa.token("alice")
    body = {"restore_point_id": point}
    # read only on the target: it may see it, so it is told it may not change it
    status, forbidden = await _restore(api, a, {**body, "target_instance_id": b}, token=token)
    assert status == 403 and forbidden["error"] == "forbidden", forbidden
    assert "target" in forbidden["description"]
    # nothing on the target: exactly like an instance that does not exist
    status, denied = await _restore(api, a, {**body, "target_instance_id": c}, token=token)
    assert status == 404, denied
    missing = str(uuid.uuid4())
    status, unknown = await _restore(api, a, {**body, "target_instance_id": missing}, token=token)
    assert status == 404, unknown
    _same_404(denied, unknown, c, missing)
    # manage on the target but only read on the source: the source refuses first
    api.cc.grant("bob", a, read=True, manage=False)
    api.cc.grant("bob", b)
    status, body_b = await _restore(
        api, a, {**body, "target_instance_id": b}, token=api.uaa.token("bob")
    )
    assert status == 403, body_b
    # and a target-only user cannot even name the source
    api.cc.grant("carol", b)
    status, body_c = await _restore(
        api, a, {**body, "target_instance_id": b}, token=api.uaa.token("carol")
    )
    assert status == 404 and body_c["error"] == "instance_not_found", body_c
    await _no_jobs(api, a, b, c)


async def test_a_forbidden_target_is_refused_before_the_restore_point_is_read(api: Api) -> None:
    """Whether the restore point exists is not told to a caller refused on the target."""
    a, _point = await _source(api)
    b = await add_instance(api.db)
    key = await _binding_key(api, a)
    status, body = await _restore(
        api, a, {"restore_point_id": "nope", "target_instance_id": b}, token=key
    )
    assert status == 404 and body["error"] == "instance_not_found", body


async def test_restore_into_another_instance_is_the_targets_job(api: Api) -> None:
    a, point = await _source(api)
    b = await add_instance(api.db, items=["orders_copy", "customers"])
    api.cc.grant("alice", a)
    api.cc.grant("alice", b)
    token = api.uaa.token("alice")
    status, job = await _restore(
        api,
        a,
        {
            "restore_point_id": point,
            "target_instance_id": b,
            "items": [{"name": "orders", "target": "orders_copy"}, "customers"],
        },
        token=token,
    )
    assert status == 202, job
    assert job["type"] == "RESTORE" and job["restore_point_id"] == point
    assert job["source_instance_id"] == a
    assert [(i["name"], i["target"]) for i in job["items"]] == [
        ("orders", "orders_copy"),
        ("customers", "customers"),
    ]
    # recorded and listed under the target, read and cancelled there
    status, page = await api.call("GET", "/jobs", instance=b, token=token)
    assert status == 200 and [j["id"] for j in page["items"]] == [job["id"]]
    status, read = await api.call("GET", f"/jobs/{job['id']}", instance=b, token=token)
    assert status == 200 and read["source_instance_id"] == a
    status, page = await api.call("GET", "/jobs?type=RESTORE", instance=a, token=token)
    assert status == 200 and page["items"] == []
    assert (await api.call("GET", f"/jobs/{job['id']}", instance=a, token=token))[0] == 404
    # the restore point stays the source's
    assert (await api.call("GET", f"/restore_points/{point}", instance=a, token=token))[0] == 200
    assert (await api.call("GET", f"/restore_points/{point}", instance=b, token=token))[0] == 404
    stored = await api.db.restore_points.find_one({"_id": point})
    assert stored["instance_id"] == a and stored["state"] == "available"
    # and it is in use: it cannot be deleted while the restore is queued
    status, body = await api.call("DELETE", f"/restore_points/{point}", instance=a, token=token)
    assert status == 409 and body["error"] == "restore_point_in_use", body
    # one restore at a time per target: another into b waits, one into a does not
    status, body = await _restore(
        api,
        a,
        {"restore_point_id": point, "target_instance_id": b, "items": ["customers"]},
        token=token,
    )
    assert status == 409 and body["error"] == "job_active", body
    status, own = await _restore(api, a, {"restore_point_id": point}, token=token)
    assert status == 202 and own["source_instance_id"] is None, own
    status, _ = await api.call("POST", f"/jobs/{job['id']}/cancel", instance=b, token=token)
    assert status == 200


async def test_target_items_must_be_registered_on_the_target(api: Api) -> None:
    a, point = await _source(api)
    b = await add_instance(api.db, items=["orders_copy"])
    ops = api.uaa.token("ops", scope=OPERATOR_SCOPE)
    unknown = "unknown_item"
    cases: list[tuple[dict[str, Any], int, str]] = [
        # not an item of the target (its registration names orders_copy only)
        ({"target_instance_id": b, "items": ["orders"]}, 400, "unknown_item"),
        ({"target_instance_id": b}, 400, "unknown_item"),
        ({"target_instance_id": b, "items": [{"name": "orders", "target": "x"}]}, 400, unknown),
        # another item of the same instance must be registered there too
        ({"items": [{"name": "orders", "target": "scratch"}]}, 400, "unknown_item"),
        # not an item of the restore point
        ({"target_instance_id": b, "items": [{"name": "no", "target": "customers"}]}, 400, unknown),
        # two items into one database
        (
            {"items": [{"name": "orders", "target": "customers"}, "customers"]},
            400,
            "invalid_input",
        ),
        ({"items": [{"name": "orders", "target": ""}]}, 400, "invalid_input"),
        ({"items": [{"name": "orders", "into": "customers"}]}, 400, "invalid_input"),
        ({"items": [{"target": "customers"}]}, 400, "invalid_input"),
        ({"target_instance_id": 5}, 400, "invalid_input"),
        ({"target_instance_id": ""}, 400, "invalid_input"),
        ({"target_instance_id": "x" * 300}, 400, "invalid_input"),
    ]  # fmt: skip
    for extra, status_wanted, error in cases:
        status, body = await _restore(api, a, {"restore_point_id": point, **extra}, token=ops)
        assert (status, body["error"]) == (status_wanted, error), (extra, body)
        assert body["description"], body
    await _no_jobs(api, a, b)
    # a registered target item of the target: queued
    status, job = await _restore(
        api,
        a,
        {
            "restore_point_id": point,
            "target_instance_id": b,
            "items": [{"name": "customers", "target": "orders_copy"}],
        },
        token=ops,
    )
    assert status == 202 and job["items"][0]["target"] == "orders_copy", job


async def test_another_item_of_the_same_instance(api: Api) -> None:
    """Into another registered database of the same instance; the plain list still works."""
    a = await add_instance(api.db, items=["orders", "customers", "orders_copy"])
    status, dest = await api.call("POST", "/destinations", instance=a, json=S3_BODY)
    _, plan = await api.call("POST", "/plans", instance=a, json=plan_body(dest["id"]))
    point = await insert_restore_point(api, a, dest["id"], plan["id"])
    status, job = await _restore(
        api,
        a,
        {"restore_point_id": point, "items": [{"name": "orders", "target": "orders_copy"}]},
    )
    assert status == 202, job
    assert [(i["name"], i["target"]) for i in job["items"]] == [("orders", "orders_copy")]
    assert job["source_instance_id"] is None
    await api.call("POST", f"/jobs/{job['id']}/cancel", instance=a)
    # an item restored into itself needs no registration (as before targets existed)
    await api.db.instances.update_one({"_id": a}, {"$set": {"items": ["orders_copy"]}})
    status, job = await _restore(api, a, {"restore_point_id": point, "items": ["orders"]})
    assert status == 202 and job["items"][0]["target"] == "orders", job


async def test_targets_that_are_not_live_are_unknown(api: Api) -> None:
    a, point = await _source(api)
    for state in ("deprovisioning", "deleted"):
        gone = await add_instance(api.db, state=state)
        status, body = await _restore(
            api, a, {"restore_point_id": point, "target_instance_id": gone}
        )
        assert status == 404 and body["error"] == "instance_not_found", (state, body)
    await _no_jobs(api, a)


async def test_openapi_documents_the_targets(api: Api) -> None:
    status, doc = await api.call("GET", "/v1/openapi.json", basic=None)
    assert status == 200, doc
    schemas = doc["components"]["schemas"]
    assert "target_instance_id" in schemas["RestoreIn"]["properties"]
    assert set(schemas["RestoreItemIn"]["properties"]) == {"name", "target"}
    assert "source_instance_id" in schemas["JobOut"]["properties"]


async def test_stopping_the_sources_jobs_stops_restores_from_its_points(api: Api) -> None:
    """A deprovision of the source (here its first step, as evoila-based brokers call it)
    stops restores from its restore points into other instances too: they would otherwise
    keep its points, whose files it is about to delete, in use."""
    a, point = await _source(api)
    b = await add_instance(api.db)
    status, job = await _restore(api, a, {"restore_point_id": point, "target_instance_id": b})
    assert status == 202, job
    status, _ = await api.call("DELETE", f"/backupJobs/byInstance/{a}")
    assert status == 204
    status, read = await api.call("GET", f"/jobs/{job['id']}", instance=b)
    assert status == 200 and read["status"] == "CANCELLED", read
    assert "being deleted" in read["reason"]


async def test_deleting_the_sources_plan_leaves_the_targets_restore_alone(api: Api) -> None:
    """The source's plan deletion cancels the plan's own queued jobs, not a restore queued
    under another instance (whose managers the source's need not be)."""
    a, point = await _source(api)
    b = await add_instance(api.db)
    status, job = await _restore(api, a, {"restore_point_id": point, "target_instance_id": b})
    assert status == 202, job
    status, _ = await api.call("DELETE", f"/plans/{job['plan_id']}", instance=a)
    assert status == 204
    status, read = await api.call("GET", f"/jobs/{job['id']}", instance=b)
    assert status == 200 and read["status"] == "QUEUED", read
