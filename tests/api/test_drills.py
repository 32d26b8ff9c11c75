"""Restore drills through the API: a plan's ``drill`` field (validated like its frequency,
merged by PATCH), and starting a drill of a plan or of a restore point (202 with the DRILL
job; 409 when there is nothing to drill or a drill is under way)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from backup.schedule import next_fire_time
from tests.api.conftest import Api, insert_restore_point, plan_body


async def test_a_plan_with_a_drill_schedule(api: Api, instance: str, destination: dict) -> None:
    body = plan_body(destination["id"], drill={"frequency": "0  5 * * 0"})
    status, plan = await api.call("POST", "/plans", instance=instance, json=body)
    assert status == 201, plan
    assert plan["drill"] == {"frequency": "0 5 * * 0", "enabled": True}
    expected = next_fire_time("0 5 * * 0", "Europe/Berlin", datetime.now(UTC))
    assert datetime.fromisoformat(plan["drill_next_run_at"]) == expected
    assert plan["last_drill"] is None
    status, one = await api.call("GET", f"/plans/{plan['id']}", instance=instance)
    assert status == 200 and one["drill"] == plan["drill"]

    # without a drill: null, and no drill fire
    status, other = await api.call(
        "POST", "/plans", instance=instance, json=plan_body(destination["id"], name="other")
    )
    assert status == 201 and other["drill"] is None and other["drill_next_run_at"] is None


async def test_invalid_drills_are_refused_with_a_clear_error_and_nothing_is_stored(
    api: Api, instance: str, destination: dict
) -> None:
    d = destination["id"]
    cases: list[tuple[Any, str, str]] = [
        ({"frequency": "* * *"}, "invalid_frequency", "drill.frequency"),
        ({"frequency": "99 * * * *"}, "invalid_frequency", "drill.frequency"),
        ({"frequency": "*/5 * * * *"}, "frequency_too_frequent", "drill.frequency"),
        ({"frequency": ""}, "invalid_input", "frequency"),
        ({"enabled": True}, "invalid_input", "frequency"),
        ({"frequency": "0 5 * * 0", "enabled": "yes"}, "invalid_input", "enabled"),
        ({"frequency": "0 5 * * 0", "when": "sunday"}, "invalid_input", "when"),
        ("0 5 * * 0", "invalid_input", "drill"),
    ]
    for drill, code, field in cases:
        body = plan_body(d, drill=drill)
        status, answer = await api.call("POST", "/plans", instance=instance, json=body)
        assert status == 400, (drill, answer)
        assert answer["error"] == code, (drill, answer)
        assert field in (answer.get("field") or "") or field in answer["description"], answer
        assert "Traceback" not in answer["description"]
    status, answer = await api.call(
        "POST", "/plans", instance=instance, json=plan_body(d, drill={"frequency": "61 * * * *"})
    )
    assert answer["description"].startswith("drill.frequency '61 * * * *'"), answer
    assert answer["field"] == "drill.frequency"
    assert await api.db.plans.count_documents({}) == 0


async def test_patch_merges_the_drill_and_validates_it(api: Api, instance: str, plan: dict) -> None:
    path = f"/plans/{plan['id']}"
    status, body = await api.call(
        "PATCH", path, instance=instance, json={"drill": {"frequency": "0 5 * * 0"}}
    )
    assert status == 200, body
    assert body["drill"] == {"frequency": "0 5 * * 0", "enabled": True}
    assert body["drill_next_run_at"] is not None
    status, body = await api.call(
        "PATCH", path, instance=instance, json={"drill": {"enabled": False}}
    )
    assert status == 200, body
    assert body["drill"] == {"frequency": "0 5 * * 0", "enabled": False}
    assert body["drill_next_run_at"] is None
    before = await api.db.plans.find_one({"_id": plan["id"]})
    status, answer = await api.call(
        "PATCH", path, instance=instance, json={"drill": {"frequency": "bad"}}
    )
    assert status == 400 and answer["error"] == "invalid_frequency", answer
    assert answer["field"] == "drill.frequency"
    assert await api.db.plans.find_one({"_id": plan["id"]}) == before
    status, body = await api.call("PATCH", path, instance=instance, json={"drill": None})
    assert status == 200 and body["drill"] is None and body["drill_next_run_at"] is None


async def test_starting_drills(api: Api, instance: str, destination: dict, plan: dict) -> None:
    status, answer = await api.call("POST", f"/plans/{plan['id']}/drill", instance=instance)
    assert status == 409 and answer["error"] == "no_restore_point", answer
    status, answer = await api.call("POST", "/plans/nope/drill", instance=instance)
    assert status == 404 and answer["error"] == "plan_not_found", answer
    status, answer = await api.call("POST", "/restore_points/nope/drill", instance=instance)
    assert status == 404 and answer["error"] == "restore_point_not_found", answer
    assert await api.db.jobs.count_documents({}) == 0

    older = await insert_restore_point(api, instance, destination["id"], plan["id"])
    newer = await insert_restore_point(api, instance, destination["id"], plan["id"])
    status, job = await api.call("POST", f"/plans/{plan['id']}/drill", instance=instance)
    assert status == 202, job
    assert job["type"] == "DRILL" and job["status"] == "QUEUED" and job["trigger"] == "MANUAL"
    assert job["restore_point_id"] == newer and job["plan_id"] == plan["id"]
    assert [i["name"] for i in job["items"]] == ["orders", "customers"]
    assert job["drill"] is None
    status, answer = await api.call("POST", f"/restore_points/{older}/drill", instance=instance)
    assert status == 409 and answer["error"] == "job_active", answer

    await api.db.jobs.update_one({"_id": job["id"]}, {"$set": {"status": "SUCCEEDED"}})
    status, other = await api.call("POST", f"/restore_points/{older}/drill", instance=instance)
    assert status == 202 and other["restore_point_id"] == older, other
    status, page = await api.call("GET", "/jobs?type=DRILL", instance=instance)
    assert status == 200 and {j["id"] for j in page["items"]} == {job["id"], other["id"]}
    status, point = await api.call("GET", f"/restore_points/{older}", instance=instance)
    assert status == 200 and point["last_drill"] is None
