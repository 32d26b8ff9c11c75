"""The audit trail of the /v1 API: every change leaves an entry naming who made it and the
fields sent (never their values), readable with manage rights, paged, pruned by the sweep."""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from backup.clock import ManualClock
from backup.retention import RetentionSweeper
from broker.context import SECRETS
from tests.api.conftest import S3_BODY, Api, add_instance, insert_restore_point, plan_body
from tests.servers.log_audit import audit_secret

NEW_SECRET = "n3w-s3cr3t-Value-QRS"
ENCRYPTION_KEY = "plan-encryption-key-0123456789"
BINDING_KEY = "bmk_" + "a" * 43


async def _trail(api: Api, instance: str, **kw: Any) -> list[dict[str, Any]]:
    status, page = await api.call("GET", "/audit?limit=100", instance=instance, **kw)
    assert status == 200, page
    return list(reversed(page["items"]))  # oldest first


async def test_every_api_change_is_recorded_with_its_actor_and_no_secret(api: Api) -> None:
    for secret in (NEW_SECRET, ENCRYPTION_KEY, BINDING_KEY):
        audit_secret(secret)
    instance = await add_instance(api.db)
    api.cc.grant("alice", instance)
    alice = api.uaa.token("alice")
    await api.db.bindings.insert_one(
        {
            "_id": "bind-audit",
            "instance_id": instance,
            "key_hash": hashlib.sha256(BINDING_KEY.encode()).hexdigest(),
            "state": "ready",
            "schema_version": 1,
        }
    )

    async def change(method: str, path: str, expected: int, **kw: Any) -> Any:
        status, body = await api.call(method, path, instance=instance, **kw)
        assert status == expected, (method, path, body)
        return body

    dest = await change("POST", "/destinations", 201, token=alice, json=S3_BODY)
    # a check changes nothing: no entry
    await api.call("POST", "/destinations/validate", instance=instance, token=alice, json=S3_BODY)
    await change(
        "PATCH",
        f"/destinations/{dest['id']}",
        200,
        token=BINDING_KEY,
        json={"secret_access_key": NEW_SECRET},
    )
    body = plan_body(dest["id"], encryption={"enabled": True, "key": ENCRYPTION_KEY})
    plan = await change("POST", "/plans", 201, json=body)
    await change("PATCH", f"/plans/{plan['id']}", 200, token=alice, json={"paused": True})
    job = await change("POST", f"/plans/{plan['id']}/backups", 202, token=alice)
    await change("POST", f"/jobs/{job['id']}/cancel", 200, token=alice)
    point = await insert_restore_point(api, instance, dest["id"], plan["id"])
    restore = await change(
        "POST", "/restores", 202, token=alice, json={"restore_point_id": point, "items": ["orders"]}
    )
    await change("DELETE", f"/plans/{plan['id']}", 204, token=alice)

    trail = await _trail(api, instance, token=alice)
    summary = [(e["action"], e["actor"]["kind"], e["resource"]["kind"]) for e in trail]
    assert summary == [
        ("create_destination", "user", "destinations"),
        ("update_destination", "binding", "destinations"),
        ("create_plan", "broker", "plans"),
        ("update_plan", "user", "plans"),
        ("start_plan_backup", "user", "jobs"),
        ("cancel_job", "user", "jobs"),
        ("start_restore", "user", "jobs"),
        ("delete_plan", "user", "plans"),
    ]
    by_action = {e["action"]: e for e in trail}
    create = by_action["create_destination"]
    assert create["resource"]["id"] == dest["id"] and create["outcome"] == "succeeded"
    assert create["actor"]["subject"] == "alice"
    assert set(create["fields"]) == set(S3_BODY)
    assert by_action["update_destination"]["actor"]["subject"] == "bind-audit"
    assert by_action["update_destination"]["fields"] == ["secret_access_key"]
    assert by_action["create_plan"]["resource"]["id"] == plan["id"]
    assert by_action["update_plan"]["fields"] == ["paused"]
    assert by_action["start_plan_backup"]["resource"]["id"] == job["id"]
    assert by_action["cancel_job"]["resource"]["id"] == job["id"]
    assert by_action["start_restore"]["resource"]["id"] == restore["id"]
    assert all(e["request_id"] for e in trail)

    raw = json.dumps(await api.db.audit.find({}).to_list(), default=str)
    for secret in (S3_BODY["secret_access_key"], NEW_SECRET, ENCRYPTION_KEY, BINDING_KEY):
        assert secret not in raw


async def test_the_trail_needs_manage_rights_and_is_paged(api: Api) -> None:
    instance = await add_instance(api.db)
    other = await add_instance(api.db)
    for name in ("first", "second", "third"):
        status, _ = await api.call(
            "POST", "/destinations", instance=instance, json={**S3_BODY, "name": name}
        )
        assert status == 201
    api.cc.grant("reader", instance, read=True, manage=False)
    status, body = await api.call("GET", "/audit", instance=instance, token=api.uaa.token("reader"))
    assert status == 403, body
    status, page = await api.call("GET", "/audit?limit=2", instance=instance)
    assert status == 200 and page["total"] is None and len(page["items"]) == 2
    status, rest = await api.call(
        "GET", f"/audit?limit=2&cursor={page['next_cursor']}", instance=instance
    )
    assert status == 200 and len(rest["items"]) == 1 and rest["next_cursor"] is None
    assert rest["total"] == 3
    assert rest["items"][0]["actor"] == {
        "kind": "broker",
        "subject": page["items"][0]["actor"]["subject"],
    }
    # another instance's trail is its own
    status, empty = await api.call("GET", "/audit", instance=other)
    assert status == 200 and empty["total"] == 0


async def test_a_refused_change_leaves_no_entry(api: Api) -> None:
    instance = await add_instance(api.db)
    status, _ = await api.call("POST", "/destinations", instance=instance, json={"type": "S3"})
    assert status == 400
    assert await api.db.audit.count_documents({"instance_id": instance}) == 0


async def test_the_sweep_prunes_entries_past_the_retention(api: Api) -> None:
    instance = await add_instance(api.db)
    status, _ = await api.call("POST", "/destinations", instance=instance, json=S3_BODY)
    assert status == 201
    later = datetime.now(UTC) + timedelta(days=31)
    keep = RetentionSweeper(
        api.db, api.service.app[SECRETS], clock=ManualClock(later), audit_retention_days=60
    )
    assert (await keep.run_once()).audit_pruned == 0
    prune = RetentionSweeper(
        api.db, api.service.app[SECRETS], clock=ManualClock(later), audit_retention_days=30
    )
    assert (await prune.run_once()).audit_pruned >= 1
    assert await api.db.audit.count_documents({"instance_id": instance}) == 0


# --- the operators' view across the platform ------------------------------------------------


async def test_the_operator_wide_trail_filters_by_instance_actor_and_time(api: Api) -> None:
    a = await add_instance(api.db)
    b = await add_instance(api.db)
    api.cc.grant("alice", a)
    api.cc.grant("bob", b)
    await api.call("POST", "/destinations", instance=a, token=api.uaa.token("alice"), json=S3_BODY)
    # entries keep milliseconds: step off the boundary so that each side is unambiguous
    await asyncio.sleep(0.005)
    middle = datetime.now(UTC)
    await asyncio.sleep(0.005)
    await api.call("POST", "/destinations", instance=b, token=api.uaa.token("bob"), json=S3_BODY)
    status, dest = await api.call(
        "POST", "/destinations", instance=a, json={**S3_BODY, "name": "x"}
    )
    assert status == 201, dest

    async def trail(query: str, **kw: Any) -> list[dict[str, Any]]:
        status, page = await api.call("GET", f"/v1/audit?limit=100{query}", **kw)
        assert status == 200, (query, page)
        return list(page["items"])

    everything = await trail("")
    assert [(e["instance_id"], e["actor"]["subject"]) for e in everything] == [
        (a, "test-broker"),
        (b, "bob"),
        (a, "alice"),
    ]  # newest first
    assert [e["actor"]["subject"] for e in await trail(f"&instance_id={a}")] == [
        "test-broker",
        "alice",
    ]
    assert [e["instance_id"] for e in await trail("&actor=bob")] == [b]
    assert [e["actor"]["subject"] for e in await trail("&actor_kind=user")] == ["bob", "alice"]
    since = middle.isoformat().replace("+00:00", "Z")
    assert [e["actor"]["subject"] for e in await trail(f"&since={since}")] == [
        "test-broker",
        "bob",
    ]
    until = middle.isoformat().replace("+", "%2B")
    assert [e["actor"]["subject"] for e in await trail(f"&until={until}")] == ["alice"]
    assert await trail(f"&instance_id={a}&actor=bob") == []
    # paged like every list
    status, first = await api.call("GET", "/v1/audit?limit=2")
    assert status == 200 and len(first["items"]) == 2 and first["next_cursor"]
    status, rest = await api.call("GET", f"/v1/audit?limit=2&cursor={first['next_cursor']}")
    assert [e["id"] for e in first["items"] + rest["items"]] == [e["id"] for e in everything]

    for bad in (
        "since=yesterday",
        "since=2026-01-01T00:00:00",  # no offset: ambiguous
        "actor_kind=robot",
        "instance_id=" + "x" * 300,
        "cursor=nope",
        "actor=a&actor=b",
    ):
        status, body = await api.call("GET", f"/v1/audit?{bad}")
        assert status == 400 and body["error"] in ("invalid_input", "invalid_cursor"), (bad, body)

    # a tenant, even one that manages an instance, is refused: not a filtered list
    for token in (api.uaa.token("alice"), api.uaa.token("bob")):
        status, body = await api.call("GET", f"/v1/audit?instance_id={a}", token=token)
        assert (status, body["error"]) == (403, "forbidden"), body
    status, body = await api.call(
        "GET", "/v1/audit", token=api.uaa.token("ops", scope=["backup_manager.admin"])
    )
    assert status == 200 and len(body["items"]) == 3
