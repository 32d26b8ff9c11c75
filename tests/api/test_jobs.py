"""Manual backups, restores, jobs (list, read, cancel) and restore points."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from backup import jobs
from tests.api.conftest import (
    ITEMS,
    Api,
    ApiFactory,
    add_instance,
    insert_job,
    insert_restore_point,
    plan_body,
)
from tests.servers.broker import BROKER_PASSWORD, BROKER_USER

JOB_FIELDS = {
    "_id", "instance_id", "type", "plan_id", "destination_id", "trigger", "scheduled_for",
    "status", "reason", "items", "restore_point_id", "compression", "encryption",
    "cancel_requested", "created_at", "started_at", "ended_at", "deadline_at", "lease_owner",
    "lease_expires_at", "attempts", "version", "schema_version",
}  # fmt: skip


async def _plan(api: Api, instance: str, destination: dict, **over: Any) -> dict:
    status, plan = await api.call(
        "POST", "/plans", instance=instance, json=plan_body(destination["id"], **over)
    )
    assert status == 201, plan
    return plan


async def _job(api: Api, instance: str, **fields: Any) -> str:
    return await insert_job(api, instance, **fields)


async def _restore_point(api: Api, instance: str, destination: dict, plan_id: str) -> str:
    return await insert_restore_point(api, instance, destination["id"], plan_id)


async def test_backup_now_queues_a_manual_job(api: Api, instance: str, destination: dict) -> None:
    plan = await _plan(api, instance, destination, encryption={"enabled": True})
    status, job = await api.call("POST", f"/plans/{plan['id']}/backups", instance=instance)
    assert status == 202, job
    assert job["status"] == "QUEUED" and job["trigger"] == "MANUAL" and job["type"] == "BACKUP"
    assert [i["name"] for i in job["items"]] == ITEMS
    raw = await api.db.jobs.find_one({"_id": job["id"]})
    assert set(raw) == JOB_FIELDS
    assert raw["plan_id"] == plan["id"] and raw["destination_id"] == destination["id"]
    assert raw["scheduled_for"] is None and raw["encryption"] == {"enabled": True}
    assert raw["cancel_requested"] is False and raw["attempts"] == 0
    # one backup of a plan at a time
    status, body = await api.call("POST", f"/plans/{plan['id']}/backups", instance=instance)
    assert status == 409 and body["error"] == "job_active" and job["id"] in body["description"]
    status, body = await api.call("POST", "/plans/nope/backups", instance=instance)
    assert status == 404 and body["error"] == "plan_not_found"


async def test_backups_resource_takes_the_plan_id(
    api: Api, instance: str, destination: dict
) -> None:
    plan = await _plan(api, instance, destination)
    status, job = await api.call(
        "POST", "/backups", instance=instance, json={"plan_id": plan["id"]}
    )
    assert status == 202 and job["plan_id"] == plan["id"] and job["trigger"] == "MANUAL", job
    assert job["status"] == "QUEUED" and job["type"] == "BACKUP"
    _, shown = await api.call("GET", f"/plans/{plan['id']}", instance=instance)
    assert shown["last_job"]["id"] == job["id"] and shown["last_job"]["status"] == "QUEUED"
    for body, code, error in (
        ({"plan_id": plan["id"]}, 409, "job_active"),
        ({"plan_id": "nope"}, 404, "plan_not_found"),
        ({}, 400, "invalid_input"),
        ({"plan_id": 7}, 400, "invalid_input"),
        ({"plan_id": plan["id"], "now": True}, 400, "invalid_input"),
    ):
        status, answer = await api.call("POST", "/backups", instance=instance, json=body)
        assert (status, answer["error"]) == (code, error), (body, answer)
    other = await add_instance(api.db)  # a plan of another instance is not found here
    status, answer = await api.call(
        "POST", "/backups", instance=other, json={"plan_id": plan["id"]}
    )
    assert status == 404 and answer["error"] == "plan_not_found"
    assert await api.db.jobs.count_documents({}) == 1


async def test_list_filters_and_paginates_newest_first(api: Api, instance: str) -> None:
    other = await add_instance(api.db)
    await _job(api, other)
    for n in range(25):
        kind = "RESTORE" if n % 5 == 0 else "BACKUP"
        status = "FAILED" if n % 3 == 0 else "SUCCEEDED"
        await _job(api, instance, type=kind, status=status, plan_id=f"p{n % 2}")
    raw = await api.db.jobs.find({"instance_id": instance}).to_list()
    ids = [d["_id"] for d in sorted(raw, key=lambda d: (d["created_at"], d["_id"]), reverse=True)]
    status, page = await api.call("GET", "/jobs?limit=10", instance=instance)
    # a cursor page with more after it does not count the list (numbered pages do)
    assert status == 200 and page["total"] is None and len(page["items"]) == 10
    assert [j["id"] for j in page["items"]] == ids[:10]
    assert all("logs" not in i or i["logs"] is None for j in page["items"] for i in j["items"])
    # inserts between pages do not shift later pages
    await _job(api, instance)
    status, page2 = await api.call(
        "GET", f"/jobs?limit=10&cursor={page['next_cursor']}", instance=instance
    )
    assert [j["id"] for j in page2["items"]] == ids[10:20] and page2["total"] is None
    # the page that ends the list knows the total as of the first page, without counting
    status, page3 = await api.call(
        "GET", f"/jobs?limit=10&cursor={page2['next_cursor']}", instance=instance
    )
    assert [j["id"] for j in page3["items"]] == ids[20:25] and page3["total"] == 25
    assert page3["next_cursor"] is None
    _, page = await api.call("GET", "/jobs?type=RESTORE", instance=instance)
    assert page["total"] == 5 and {j["type"] for j in page["items"]} == {"RESTORE"}
    _, page = await api.call("GET", "/jobs?status=FAILED&plan_id=p0", instance=instance)
    assert page["total"] == len([n for n in range(25) if n % 3 == 0 and n % 2 == 0])
    for query in ("?type=FOO", "?status=done", "?limit=0", "?limit=101", "?limit=x",
                  "?limit=99999999999999999999", "?limit=\u00b2", "?cursor=%%%",
                  "?cursor=bm9wZQ", "?cursor=" + "A" * 600, "?page=0", "?page=2&cursor=x",
                  "?as_of=x", "?page=1&as_of=bm9wZQ", "?limit=5&size=6",
                  "?type=BACKUP&type=RESTORE", "?colour=red", "?page=10000&size=100"):  # fmt: skip
        status, body = await api.call("GET", "/jobs" + query, instance=instance)
        assert status == 400, (query, body)
        assert body["error"] in ("invalid_input", "invalid_cursor", "page_out_of_range"), body
        assert body["field"] and body["field"].split(".")[0] in query, (query, body)


async def test_numbered_pages_with_a_total_stay_stable(api: Api, instance: str) -> None:
    for n in range(23):
        await _job(api, instance, status="SUCCEEDED" if n % 2 else "FAILED")
    raw = await api.db.jobs.find({"instance_id": instance}).to_list()
    ids = [d["_id"] for d in sorted(raw, key=lambda d: (d["created_at"], d["_id"]), reverse=True)]
    status, first = await api.call("GET", "/jobs?page=1&size=10", instance=instance)
    assert status == 200, first
    assert first["total"] == 23 and first["page"] == 1 and first["as_of"]
    assert [j["id"] for j in first["items"]] == ids[:10]
    # new jobs arrive; pages asked with the first page's as_of do not move
    for _ in range(4):
        await _job(api, instance)
    seen = [j["id"] for j in first["items"]]
    for number in (2, 3):
        status, page = await api.call(
            "GET", f"/jobs?page={number}&size=10&as_of={first['as_of']}", instance=instance
        )
        assert status == 200 and page["total"] == 23 and page["page"] == number, page
        assert page["as_of"] == first["as_of"]
        seen += [j["id"] for j in page["items"]]
    assert seen == ids
    # beyond the last page: empty, not an error
    _, empty = await api.call(
        "GET", f"/jobs?page=4&size=10&as_of={first['as_of']}", instance=instance
    )
    assert empty["items"] == [] and empty["total"] == 23 and empty["next_cursor"] is None
    # without as_of a page counts everything; filters apply to numbered pages too
    _, now_page = await api.call("GET", "/jobs?page=1&limit=5&status=FAILED", instance=instance)
    assert now_page["total"] == 12
    assert {j["status"] for j in now_page["items"]} == {"FAILED"}
    # a numbered page hands out a cursor for the rest
    _, cont = await api.call(
        "GET", f"/jobs?limit=10&cursor={first['next_cursor']}", instance=instance
    )
    assert [j["id"] for j in cont["items"]] == ids[10:20]
    # every list pages the same way
    for path in ("/plans", "/destinations", "/restore_points"):
        status, page = await api.call("GET", f"{path}?page=1&size=5", instance=instance)
        assert status == 200 and page["page"] == 1 and page["total"] == 0, (path, page)


async def test_read_job_with_truncated_logs(api: Api, instance: str) -> None:
    long_log = "".join(f"line {n}\n" for n in range(1000))
    job_id = await _job(
        api,
        instance,
        status="FAILED",
        items=[jobs.new_item("orders", logs={"backup": long_log, "lock": "ok"}, error="boom")],
    )
    status, job = await api.call("GET", f"/jobs/{job_id}", instance=instance)
    assert status == 200
    logs = job["items"][0]["logs"]
    assert logs["lock"] == "ok"
    assert len(logs["backup"].encode()) < 1024 + 100  # JOB_LOG_MAX_BYTES=1024 in tests
    assert logs["backup"].endswith("line 999\n") and "earlier bytes cut" in logs["backup"]
    assert job["items"][0]["error"] == "boom"
    assert "agent_job_id" not in job["items"][0]
    assert (await api.call("GET", "/jobs/nope", instance=instance))[0] == 404


async def test_cancel(api: Api, instance: str) -> None:
    queued = await _job(api, instance)
    status, job = await api.call("POST", f"/jobs/{queued}/cancel", instance=instance)
    assert status == 200 and job["status"] == "CANCELLED" and job["ended_at"], job
    running = await _job(api, instance, status="RUNNING")
    status, job = await api.call("POST", f"/jobs/{running}/cancel", instance=instance)
    assert status == 202 and job["status"] == "RUNNING" and job["cancel_requested"] is True
    for final in ("SUCCEEDED", "FAILED", "CANCELLED", "MISSED"):
        done = await _job(api, instance, status=final)
        status, body = await api.call("POST", f"/jobs/{done}/cancel", instance=instance)
        assert status == 409 and body["error"] == "job_finished"
    assert (await api.call("POST", "/jobs/nope/cancel", instance=instance))[0] == 404


async def test_concurrent_cancels_end_queued_job_once(api: Api, instance: str) -> None:
    queued = await _job(api, instance)
    results = await asyncio.gather(
        *(api.call("POST", f"/jobs/{queued}/cancel", instance=instance) for _ in range(5))
    )
    codes = sorted(s for s, _ in results)
    assert codes[0] == 200 and set(codes) <= {200, 409}, results


async def test_restore(api: Api, instance: str, destination: dict) -> None:
    plan = await _plan(api, instance, destination)
    point = await _restore_point(api, instance, destination, plan["id"])
    status, job = await api.call(
        "POST",
        "/restores",
        instance=instance,
        json={"restore_point_id": point, "items": ["orders"]},
    )
    assert status == 202, job
    assert job["type"] == "RESTORE" and job["status"] == "QUEUED"
    assert job["restore_point_id"] == point and [i["name"] for i in job["items"]] == ["orders"]
    raw = await api.db.jobs.find_one({"_id": job["id"]})
    assert set(raw) == JOB_FIELDS and raw["items"][0]["key"] == "orders.gz"
    status, body = await api.call(
        "POST", "/restores", instance=instance, json={"restore_point_id": point}
    )
    assert status == 409 and body["error"] == "job_active"
    await api.db.jobs.update_one({"_id": job["id"]}, {"$set": {"status": "SUCCEEDED"}})
    for bad, code, expected in (
        ({"restore_point_id": point, "items": ["nope"]}, 400, "unknown_item"),
        ({"restore_point_id": point, "items": []}, 400, "invalid_input"),
        ({"restore_point_id": "nope"}, 404, "restore_point_not_found"),
        ({"items": ["orders"]}, 400, "invalid_input"),
        ({"restore_point_id": 5}, 400, "invalid_input"),
    ):
        status, body = await api.call("POST", "/restores", instance=instance, json=bad)
        assert (status, body["error"]) == (code, expected), (bad, body)
    status, job = await api.call(
        "POST", "/restores", instance=instance, json={"restore_point_id": point}
    )
    assert status == 202 and [i["name"] for i in job["items"]] == ITEMS


async def test_restore_points_list_read_and_failed_delete(
    api: Api, instance: str, destination: dict
) -> None:
    plan = await _plan(api, instance, destination)
    first = await _restore_point(api, instance, destination, plan["id"])
    second = await _restore_point(api, instance, destination, plan["id"])
    status, page = await api.call("GET", "/restore_points", instance=instance)
    assert status == 200 and page["total"] == 2
    assert [p["id"] for p in page["items"]] == [second, first]
    _, page = await api.call("GET", "/restore_points?plan_id=other", instance=instance)
    assert page["total"] == 0
    status, point = await api.call("GET", f"/restore_points/{first}", instance=instance)
    assert status == 200 and point["state"] == "available" and len(point["items"]) == 2
    # the destination points at a closed port: the files cannot be deleted, the record stays
    status, body = await api.call("DELETE", f"/restore_points/{first}", instance=instance)
    assert status == 503 and body["error"] == "storage_unavailable", body
    raw = await api.db.restore_points.find_one({"_id": first})
    assert raw["state"] == "deleting"
    status, body = await api.call(
        "POST", "/restores", instance=instance, json={"restore_point_id": first}
    )
    assert status == 409 and body["error"] == "restore_point_deleting"
    # in use by a restore: refused
    await api.call("POST", "/restores", instance=instance, json={"restore_point_id": second})
    status, body = await api.call("DELETE", f"/restore_points/{second}", instance=instance)
    assert status == 409 and body["error"] == "restore_point_in_use"
    assert (await api.call("DELETE", "/restore_points/nope", instance=instance))[0] == 404


async def test_a_job_with_many_items_answers_within_a_bounded_size(make_api: ApiFactory) -> None:
    api = await make_api(JOB_LOGS_TOTAL_MAX_BYTES="65536")
    instance = await add_instance(api.db)
    log = "".join(f"line {n}\n" for n in range(2000))  # ~16 KB a stage
    items = [
        jobs.new_item(f"db{n}", logs={"backup": log, "unlock": f"unlocked db{n}"})
        for n in range(200)
    ]
    job_id = await _job(api, instance, status="FAILED", items=items)
    async with api.service.http.get(
        api.base(instance) + f"/jobs/{job_id}",
        headers={"Authorization": aiohttp.encode_basic_auth(BROKER_USER, BROKER_PASSWORD)},
    ) as r:
        raw = await r.read()
    assert r.status == 200
    # 400 logs share 64 KiB: each keeps its last 256 bytes (not JOB_LOG_MAX_BYTES=1024)
    job = json.loads(raw)
    assert len(job["items"]) == 200
    assert len(raw) < 200 * 500 + 400 * (256 + 60), len(raw)
    for item in job["items"]:
        assert len(item["logs"]["backup"].encode()) <= 256 + 60
        assert item["logs"]["backup"].endswith("line 1999\n")
        assert "earlier bytes cut" in item["logs"]["backup"]
        assert item["logs"]["unlock"] == f"unlocked {item['name']}"
