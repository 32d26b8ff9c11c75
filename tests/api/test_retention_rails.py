"""Retention's rails through the HTTP API: pins (and DELETE refused while pinned), the
retention preview of the saved and of a proposed retention, the confirmation a plan change
needs when it would delete many points at once, and the validation of all of it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from backup.pagination import now
from storage import S3Settings, open_store
from tests.api.conftest import Api, add_instance, insert_restore_point, plan_body
from tests.servers.seed import destination_body


async def _aged(api: Api, instance: str, dest: str, plan: str, *days: float) -> list[str]:
    """Restore points of ``plan`` made ``days`` ago, newest first as given."""
    ids = []
    for age in days:
        point = await insert_restore_point(api, instance, dest, plan, keys=[f"p{len(ids)}"])
        await api.db.restore_points.update_one(
            {"_id": point}, {"$set": {"created_at": now() - timedelta(days=age)}}
        )
        ids.append(point)
    return ids


# ------------------------------------------------------------------ pins


async def test_pin_keeps_a_point_from_delete_until_it_is_unpinned(
    api: Api, s3_settings: S3Settings
) -> None:
    instance = await add_instance(api.db)
    status, dest = await api.call(
        "POST", "/destinations", instance=instance, json=destination_body(s3_settings)
    )
    assert status == 201, dest
    point = await insert_restore_point(api, instance, dest["id"], "plan", keys=["pinned-db"])
    async with open_store(s3_settings) as objects:

        async def body() -> Any:
            yield b"dump"

        await objects.upload("pinned-db.gz", body())
    path = f"/restore_points/{point}"
    status, answer = await api.call(
        "PATCH", path, instance=instance, json={"pinned": True, "pin_reason": "audit 2026 Q4"}
    )
    assert status == 200, answer
    assert answer["pinned"] is True and answer["pin_reason"] == "audit 2026 Q4"
    assert answer["pinned_at"] is not None and answer["id"] == point
    status, shown = await api.call("GET", path, instance=instance)
    assert status == 200 and shown["pinned"] is True and shown["pin_reason"] == "audit 2026 Q4"
    status, listed = await api.call("GET", "/restore_points", instance=instance)
    assert listed["items"][0]["pinned"] is True

    status, answer = await api.call("DELETE", path, instance=instance)
    assert status == 409 and answer["error"] == "restore_point_pinned", answer
    assert "audit 2026 Q4" in answer["description"] and "unpin" in answer["description"]
    stored = await api.db.restore_points.find_one({"_id": point})
    assert stored["state"] == "available"
    async with open_store(s3_settings) as objects:
        assert [o.key async for o in objects.list()] == ["pinned-db.gz"]

    status, answer = await api.call("PATCH", path, instance=instance, json={"pinned": False})
    assert status == 200 and answer["pinned"] is False and answer["pin_reason"] is None
    status, _ = await api.call("DELETE", path, instance=instance)
    assert status == 204
    async with open_store(s3_settings) as objects:
        assert [o.key async for o in objects.list()] == []

    # the audit trail has both changes, by whom, with the field names only
    status, trail = await api.call("GET", "/audit", instance=instance)
    pins = [e for e in trail["items"] if e["action"] == "update_restore_point"]
    assert len(pins) == 2 and all(e["resource"]["id"] == point for e in pins)
    assert all(e["actor"]["kind"] == "broker" for e in pins)
    assert sorted(pins[1]["fields"]) == ["pin_reason", "pinned"]
    assert "audit 2026 Q4" not in str(trail)


async def test_invalid_pins_are_refused_and_change_nothing(
    api: Api, instance: str, destination: dict
) -> None:
    point = await insert_restore_point(api, instance, destination["id"], "plan")
    path = f"/restore_points/{point}"
    before = await api.db.restore_points.find_one({"_id": point})
    cases: list[tuple[Any, str]] = [
        ({"pinned": True}, "pin_reason"),
        ({"pinned": True, "pin_reason": None}, "pin_reason"),
        ({"pinned": True, "pin_reason": ""}, "pin_reason"),
        ({"pinned": True, "pin_reason": "   "}, "pin_reason"),
        ({"pinned": True, "pin_reason": "two\nlines"}, "pin_reason"),
        ({"pinned": True, "pin_reason": "bell\x07"}, "pin_reason"),
        ({"pinned": True, "pin_reason": "x" * 501}, "pin_reason"),
        ({"pinned": True, "pin_reason": 7}, "pin_reason"),
        ({"pinned": "yes", "pin_reason": "why"}, "pinned"),
        ({"pinned": 1, "pin_reason": "why"}, "pinned"),
        ({"pin_reason": "why"}, "pinned"),
        ({"pinned": False, "pin_reason": "why"}, "pin_reason"),
        ({"pinned": True, "pin_reason": "why", "state": "deleting"}, "state"),
        ({"pinned": True, "pin_reason": "why", "expires_at": None}, "expires_at"),
    ]
    for body, field in cases:
        status, answer = await api.call("PATCH", path, instance=instance, json=body)
        assert status == 400, (body, answer)
        assert answer["error"] == "invalid_input" and answer["field"] == field, (body, answer)
    status, answer = await api.call(
        "PATCH", path, instance=instance, data=b"[1]", headers={"Content-Type": "application/json"}
    )
    assert status == 400, answer
    assert await api.db.restore_points.find_one({"_id": point}) == before
    status, answer = await api.call(
        "PATCH", "/restore_points/nope", instance=instance, json={"pinned": False}
    )
    assert status == 404 and answer["error"] == "restore_point_not_found"
    # another instance's point is unknown here
    other = await add_instance(api.db)
    status, answer = await api.call(
        "PATCH", path, instance=other, json={"pinned": True, "pin_reason": "mine"}
    )
    assert status == 404
    # a point whose files are being deleted can no longer be pinned
    await api.db.restore_points.update_one({"_id": point}, {"$set": {"state": "deleting"}})
    status, answer = await api.call(
        "PATCH", path, instance=instance, json={"pinned": True, "pin_reason": "too late"}
    )
    assert status == 409 and answer["error"] == "restore_point_deleting", answer
    assert (await api.db.restore_points.find_one({"_id": point})).get("pinned") is None


# ------------------------------------------------------------------ preview


async def test_preview_of_the_saved_and_of_a_proposed_retention(
    api: Api, instance: str, plan: dict
) -> None:
    dest = plan["destination_id"]
    ids = await _aged(api, instance, dest, plan["id"], 0.5, 3, 6.5, 8, 20, 45, 400)
    await api.db.restore_points.update_one({"_id": ids[6]}, {"$set": {"pinned": True}})
    path = f"/plans/{plan['id']}/retention_preview"
    status, saved = await api.call("GET", path, instance=instance)
    assert status == 200, saved
    assert saved["proposed"] is False and saved["retention"] == {"style": "DAYS", "period": 7}
    assert saved["timezone"] == "Europe/Berlin" and saved["plan_id"] == plan["id"]
    assert (saved["total"], saved["to_delete"], saved["to_keep"]) == (7, 3, 4)
    assert [p["id"] for p in saved["delete"]] == ids[3:6]
    keep = {p["id"]: p["kept_by"] for p in saved["keep"]}
    assert keep == {
        ids[0]: ["newest", "age"],
        ids[1]: ["age"],
        ids[2]: ["age"],
        ids[6]: ["pinned"],
    }
    assert all(p["kept_by"] == [] for p in saved["delete"])

    status, proposed = await api.call(
        "GET", path + "?style=FILES&period=2&monthly=3&min_good=4", instance=instance
    )
    assert status == 200, proposed
    assert proposed["proposed"] is True
    assert proposed["retention"] == {"style": "FILES", "period": 2, "monthly": 3, "min_good": 4}
    kept = {p["id"]: p["kept_by"] for p in proposed["keep"]}
    assert kept[ids[0]][:2] == ["newest", "count"] and "count" in kept[ids[1]]
    assert "pinned" in kept[ids[6]] and len(kept) >= 4
    assert proposed["to_delete"] + proposed["to_keep"] == 7
    # GFS alone, in another zone
    status, gfs = await api.call("GET", path + "?daily=1&timezone=UTC", instance=instance)
    assert status == 200 and gfs["timezone"] == "UTC" and gfs["retention"] == {"daily": 1}
    assert [p["id"] for p in gfs["keep"]] == [ids[0], ids[6]]
    # nothing was changed by previewing
    status, again = await api.call("GET", f"/plans/{plan['id']}", instance=instance)
    assert again["retention"] == {"style": "DAYS", "period": 7} and again["version"] == 1
    assert await api.db.restore_points.count_documents({"plan_id": plan["id"]}) == 7


async def test_a_preview_with_an_invalid_proposal_is_refused(
    api: Api, instance: str, plan: dict
) -> None:
    path = f"/plans/{plan['id']}/retention_preview"
    cases = [
        ("?daily=-1", "invalid_input", "daily"),
        ("?daily=0", "invalid_input", "daily"),
        ("?weekly=10001", "invalid_input", "weekly"),
        ("?period=100001&style=DAYS", "invalid_input", "period"),
        ("?min_good=-2&daily=1", "invalid_input", "min_good"),
        ("?daily=seven", "invalid_input", "daily"),
        ("?style=WEEKS&period=1", "invalid_input", "style"),
        ("?style=DAYS", "invalid_input", "query"),
        ("?min_good=3", "invalid_input", "query"),
        ("?hourly=3", "invalid_input", "hourly"),
        ("?daily=1&daily=2", "invalid_input", "daily"),
        ("?timezone=Mars/Olympus", "invalid_timezone", "timezone"),
    ]
    for query, code, field in cases:
        status, answer = await api.call("GET", path + query, instance=instance)
        assert status == 400, (query, answer)
        assert answer["error"] == code and answer["field"] == field, (query, answer)
    status, answer = await api.call("GET", "/plans/nope/retention_preview", instance=instance)
    assert status == 404 and answer["error"] == "plan_not_found"


# ------------------------------------------------------------------ confirmation


async def test_a_change_that_deletes_many_points_at_once_needs_confirmation(
    api: Api, instance: str, plan: dict
) -> None:
    ids = await _aged(api, instance, plan["destination_id"], plan["id"], 0.1, 1, 2, 3, 4, 5)
    path = f"/plans/{plan['id']}"
    before = await api.db.plans.find_one({"_id": plan["id"]})
    shorter = {"retention": {"style": "FILES", "period": 1}}
    status, answer = await api.call("PATCH", path, instance=instance, json=shorter)
    assert status == 409, answer
    assert answer["error"] == "confirmation_required" and answer["field"] == "retention"
    assert (answer["would_delete"], answer["total"]) == (5, 6)
    assert "?confirm=true" in answer["description"] and "retention_preview" in answer["description"]
    assert await api.db.plans.find_one({"_id": plan["id"]}) == before
    # a time zone change alone deletes nothing here, and passes
    status, answer = await api.call("PATCH", path, instance=instance, json={"timezone": "UTC"})
    assert status == 200, answer
    # confirmed: applied, and the points stay until the sweep deletes them
    status, answer = await api.call(
        "PATCH", path + "?confirm=true", instance=instance, json=shorter
    )
    assert status == 200 and answer["retention"] == {"style": "FILES", "period": 1}, answer
    assert await api.db.restore_points.count_documents({"plan_id": plan["id"]}) == len(ids)
    # points the saved retention already deletes do not count: lengthening passes
    status, answer = await api.call(
        "PATCH", path, instance=instance, json={"retention": {"period": 2}}
    )
    assert status == 200, answer
    back = {"retention": {"style": "DAYS", "period": 7}}
    assert (await api.call("PATCH", path, instance=instance, json=back))[0] == 200
    # half of the points is not more than half: no confirmation needed
    half = {"retention": {"style": "FILES", "period": 3}}
    status, answer = await api.call("PATCH", path, instance=instance, json=half)
    assert status == 200 and answer["retention"] == {"style": "FILES", "period": 3}, answer
    status, answer = await api.call(
        "PATCH", path + "?confirm=maybe", instance=instance, json={"paused": True}
    )
    assert status == 400 and answer["field"] == "confirm", answer
    status, answer = await api.call(
        "PATCH", path + "?force=true", instance=instance, json={"paused": True}
    )
    assert status == 400 and answer["field"] == "force", answer


async def test_the_threshold_is_a_setting(make_api: Any) -> None:
    api = await make_api(RETENTION_CONFIRM_FRACTION="0.9", RETENTION_CONFIRM_MIN_POINTS="3")
    instance = await add_instance(api.db)
    status, dest = await api.call(
        "POST",
        "/destinations",
        instance=instance,
        json={
            "type": "S3",
            "name": "d",
            "endpoint": "127.0.0.1:9",
            "plain_http": True,
            "bucket": "bkt",
            "access_key_id": "a",
            "secret_access_key": "s3cr3t-value-XYZ",
        },
    )
    assert status == 201, dest
    status, plan = await api.call("POST", "/plans", instance=instance, json=plan_body(dest["id"]))
    await _aged(api, instance, dest["id"], plan["id"], 0.1, 1, 2, 3, 4)
    path = f"/plans/{plan['id']}"
    # 4 of 5 (80%) is not more than 90%
    status, answer = await api.call(
        "PATCH", path, instance=instance, json={"retention": {"style": "FILES", "period": 1}}
    )
    assert status == 200, answer


# ------------------------------------------------------------------ plans' retention field


async def test_plans_take_gfs_retention_and_stay_compatible(
    api: Api, instance: str, plan: dict
) -> None:
    path = f"/plans/{plan['id']}"
    assert plan["retention"] == {"style": "DAYS", "period": 7}
    status, answer = await api.call(
        "PATCH",
        path,
        instance=instance,
        json={"retention": {"daily": 7, "weekly": 4, "monthly": 12, "yearly": 3, "min_good": 3}},
    )
    assert status == 200, answer
    assert answer["retention"] == {
        "style": "DAYS",
        "period": 7,
        "daily": 7,
        "weekly": 4,
        "monthly": 12,
        "yearly": 3,
        "min_good": 3,
    }
    # null removes a rule (merge patch): GFS alone
    status, answer = await api.call(
        "PATCH", path, instance=instance, json={"retention": {"style": None, "period": None}}
    )
    assert status == 200, answer
    assert answer["retention"] == {
        "daily": 7,
        "weekly": 4,
        "monthly": 12,
        "yearly": 3,
        "min_good": 3,
    }
    stored = await api.db.plans.find_one({"_id": plan["id"]})
    assert stored["retention"] == answer["retention"]
    before = stored
    for retention in (
        {"daily": -1},
        {"weekly": 0},
        {"monthly": 10_001},
        {"min_good": -1},
        {"min_good": 100_000},
        {"yearly": "3"},
        {"hourly": 24},
        {"daily": None, "weekly": None, "monthly": None, "yearly": None},  # no rule left
        {"style": "DAYS"},  # without a period
    ):
        status, answer = await api.call(
            "PATCH", path, instance=instance, json={"retention": retention}
        )
        assert status == 400, (retention, answer)
        assert answer["error"] == "invalid_input", answer
        assert answer["field"].startswith("retention"), answer
    assert await api.db.plans.find_one({"_id": plan["id"]}) == before
    # a new plan with GFS only
    body = plan_body(plan["destination_id"], name="gfs", retention={"weekly": 8})
    status, created = await api.call("POST", "/plans", instance=instance, json=body)
    assert status == 201 and created["retention"] == {"weekly": 8}, created
