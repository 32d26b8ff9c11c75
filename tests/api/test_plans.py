"""Plans: validation of every field, next_run_at, merge-patch, encryption keys, deletion."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from backup.schedule import next_fire_time
from broker.context import SECRETS
from tests.api.conftest import ITEMS, Api, plan_body


async def test_create_plan_defaults_and_next_run(
    api: Api, instance: str, destination: dict
) -> None:
    status, plan = await api.call(
        "POST", "/plans", instance=instance, json=plan_body(destination["id"])
    )
    assert status == 201, plan
    assert plan["items"] == ITEMS
    assert plan["compression"] is True and plan["paused"] is False
    assert plan["encryption"] == {"enabled": False, "key_set": False}
    assert plan["last_job"] is None
    expected = next_fire_time("0 3 * * *", "Europe/Berlin", datetime.now(UTC))
    assert datetime.fromisoformat(plan["next_run_at"]) == expected
    raw = await api.db.plans.find_one({"_id": plan["id"]})
    assert raw["next_run_at"] == expected and raw["instance_id"] == instance
    assert raw["destination_id"] == destination["id"] and raw["last_job_id"] is None
    assert raw["retention"] == {"style": "DAYS", "period": 7} and raw["version"] == 1
    status, one = await api.call("GET", f"/plans/{plan['id']}", instance=instance)
    assert status == 200 and one == plan


async def test_paused_plan_has_no_next_run(api: Api, instance: str, destination: dict) -> None:
    body = plan_body(destination["id"], paused=True, items=["orders"])
    status, plan = await api.call("POST", "/plans", instance=instance, json=body)
    assert status == 201 and plan["next_run_at"] is None and plan["items"] == ["orders"]
    status, plan = await api.call(
        "PATCH", f"/plans/{plan['id']}", instance=instance, json={"paused": False}
    )
    assert status == 200 and plan["next_run_at"] is not None and plan["version"] == 2


async def test_invalid_plans_are_refused_and_nothing_is_stored(
    api: Api, instance: str, destination: dict
) -> None:
    d = destination["id"]
    cases: list[tuple[dict[str, Any], str, str]] = [
        (plan_body(d, frequency="* * *"), "invalid_frequency", "frequency"),
        (plan_body(d, frequency="99 * * * *"), "invalid_frequency", "frequency"),
        (plan_body(d, frequency="*/5 * * * *"), "frequency_too_frequent", "frequency"),
        (plan_body(d, timezone="Mars/Olympus"), "invalid_timezone", "timezone"),
        (plan_body(d, items=["nope"]), "unknown_item", "items"),
        (plan_body(d, items=[]), "invalid_items", "items"),
        (plan_body(d, items=["orders", "orders"]), "invalid_items", "items"),
        (plan_body("missing"), "unknown_destination", "destination_id"),
        (plan_body(d, retention={"style": "DAYS", "period": 0}), "invalid_input", "period"),
        (plan_body(d, retention={"style": "WEEKS", "period": 1}), "invalid_input", "style"),
        (plan_body(d, retention={"style": "DAYS", "period": 10**30}), "invalid_input", "period"),
        (plan_body(d, name=""), "invalid_input", "name"),
        (plan_body(d, name="   "), "invalid_input", "name"),
        (plan_body(d, compression="yes"), "invalid_input", "compression"),
        (plan_body(d, encryption={"enabled": True, "key": "short"}), "invalid_input", "key"),
        (plan_body(d, color="red"), "invalid_input", "color"),
    ]
    for body, code, field in cases:
        status, answer = await api.call("POST", "/plans", instance=instance, json=body)
        assert status == 400, (body, answer)
        assert answer["error"] == code, (body, answer)
        assert field in answer.get("field", "") or field in answer["description"], answer
    assert await api.db.plans.count_documents({}) == 0


async def test_name_unique_per_instance(api: Api, instance: str, destination: dict) -> None:
    body = plan_body(destination["id"])
    assert (await api.call("POST", "/plans", instance=instance, json=body))[0] == 201
    status, answer = await api.call("POST", "/plans", instance=instance, json=body)
    assert status == 409 and answer["error"] == "duplicate_name"


async def test_patch_merges_and_validates_the_whole(api: Api, instance: str, plan: dict) -> None:
    path = f"/plans/{plan['id']}"
    status, body = await api.call(
        "PATCH",
        path,
        instance=instance,
        json={"retention": {"period": 30}, "frequency": "0 4 * * *"},
    )
    assert status == 200, body
    assert body["retention"] == {"style": "DAYS", "period": 30}
    assert body["frequency"] == "0 4 * * *"
    expected = next_fire_time("0 4 * * *", "Europe/Berlin", datetime.now(UTC))
    assert datetime.fromisoformat(body["next_run_at"]) == expected
    before = await api.db.plans.find_one({"_id": plan["id"]})
    for patch in (
        {"frequency": "* * * * *"},
        {"items": ["x"]},
        {"name": None},
        {"retention": {"style": "FOO"}},
        {"unknown": 1},
        {"paused": "no"},
    ):
        status, answer = await api.call("PATCH", path, instance=instance, json=patch)
        assert status == 400, (patch, answer)
    assert await api.db.plans.find_one({"_id": plan["id"]}) == before
    # null restores a default: all items, UTC
    status, body = await api.call(
        "PATCH", path, instance=instance, json={"items": None, "timezone": None}
    )
    assert status == 200 and body["items"] == ITEMS and body["timezone"] == "UTC"


async def test_encryption_key_is_generated_sealed_and_never_replaced(
    api: Api, instance: str, destination: dict
) -> None:
    body = plan_body(destination["id"], encryption={"enabled": True})
    status, plan = await api.call("POST", "/plans", instance=instance, json=body)
    assert status == 201 and plan["encryption"] == {"enabled": True, "key_set": True}
    raw = await api.db.plans.find_one({"_id": plan["id"]})
    assert set(raw["secrets"]) == {"encryption_key"} and raw["encryption"] == {"enabled": True}
    path = f"/plans/{plan['id']}"
    status, answer = await api.call(
        "PATCH", path, instance=instance, json={"encryption": {"key": "a-new-key-0123456789"}}
    )
    assert status == 409 and answer["error"] == "encryption_key_set"
    status, answer = await api.call(
        "PATCH", path, instance=instance, json={"encryption": {"enabled": False}}
    )
    assert status == 200 and answer["encryption"] == {"enabled": False, "key_set": True}
    user_key = "my-own-key-material-42"
    status, other = await api.call(
        "POST",
        "/plans",
        instance=instance,
        json=plan_body(destination["id"], name="p2", encryption={"enabled": True, "key": user_key}),
    )
    assert status == 201 and user_key not in str(other)
    raw = await api.db.plans.find_one({"_id": other["id"]})
    assert user_key.encode() not in repr(raw).encode()
    box = api.service.server.app[SECRETS]
    assert box.open_map(raw["secrets"], f"plans/{other['id']}") == {"encryption_key": user_key}


async def test_delete_keeps_restore_points_and_cancels_queued_jobs(
    api: Api, instance: str, plan: dict
) -> None:
    status, job = await api.call("POST", f"/plans/{plan['id']}/backups", instance=instance)
    assert status == 202
    await api.db.restore_points.insert_one(
        {"_id": "rp", "instance_id": instance, "plan_id": plan["id"]}
    )
    assert (await api.call("DELETE", f"/plans/{plan['id']}", instance=instance))[0] == 204
    assert (await api.call("GET", f"/plans/{plan['id']}", instance=instance))[0] == 404
    assert await api.db.restore_points.count_documents({"plan_id": plan["id"]}) == 1
    stored = await api.db.jobs.find_one({"_id": job["id"]})
    assert stored["status"] == "CANCELLED" and stored["ended_at"] is not None


async def test_plan_shows_its_last_job(api: Api, instance: str, plan: dict) -> None:
    _, job = await api.call("POST", f"/plans/{plan['id']}/backups", instance=instance)
    _status, body = await api.call("GET", "/plans", instance=instance)
    last = body["items"][0]["last_job"]
    assert last == {
        "id": job["id"], "status": "QUEUED", "created_at": job["created_at"], "ended_at": None
    }  # fmt: skip


async def test_pagination_of_plans(api: Api, instance: str, destination: dict) -> None:
    for n in range(7):
        body = plan_body(destination["id"], name=f"p{n}")
        assert (await api.call("POST", "/plans", instance=instance, json=body))[0] == 201
    seen: list[str] = []
    cursor = None
    while True:
        q = f"?limit=3&cursor={cursor}" if cursor else "?limit=3"
        status, page = await api.call("GET", "/plans" + q, instance=instance)
        seen += [p["name"] for p in page["items"]]
        cursor = page["next_cursor"]
        # counted only where it is known for free: on the page that ends the list
        assert status == 200 and page["total"] == (7 if cursor is None else None)
        if cursor is None:
            break
    assert seen == [f"p{n}" for n in reversed(range(7))]


async def test_concurrent_creations_with_one_name_make_one_plan(
    api: Api, instance: str, destination: dict
) -> None:
    body = plan_body(destination["id"], name="race")
    results = await asyncio.gather(
        *(api.call("POST", "/plans", instance=instance, json=body) for _ in range(8))
    )
    assert sorted(s for s, _ in results) == [201] + [409] * 7
    assert await api.db.plans.count_documents({"name": "race"}) == 1
