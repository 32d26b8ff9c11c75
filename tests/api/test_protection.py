"""Protection through HTTP: an instance's state and its plans' objectives, the operators' fleet
view across many instances (paged, filtered by state), the per-plan metrics, and the background
evaluator that keeps the stored states fresh."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from backup import protection
from backup.pagination import now
from broker.context import WORK_DATABASE
from tests.api.conftest import (
    S3_BODY,
    Api,
    ApiFactory,
    add_instance,
    insert_job,
    insert_restore_point,
    plan_body,
)
from tests.servers.broker import start_service, stop_service


async def _plan(api: Api, instance: str, **over: Any) -> dict[str, Any]:
    status, dest = await api.call(
        "POST", "/destinations", instance=instance, json={**S3_BODY, "name": f"d-{time.time_ns()}"}
    )
    assert status == 201, dest
    status, plan = await api.call(
        "POST", "/plans", instance=instance, json=plan_body(dest["id"], **over)
    )
    assert status == 201, plan
    created: dict[str, Any] = plan
    return created


async def _protection(api: Api, instance: str, **kw: Any) -> dict[str, Any]:
    status, body = await api.call("GET", "/protection", instance=instance, **kw)
    assert status == 200, body
    answer: dict[str, Any] = body
    return answer


async def test_an_instance_plan_by_plan_and_its_objective(api: Api) -> None:
    instance = await add_instance(api.db)
    body = await _protection(api, instance)
    assert (body["state"], body["reason"], body["plans"]) == (
        "unprotected",
        "The instance has no backup plan.",
        [],
    )

    plan = await _plan(api, instance)  # nightly at 03:00 in Berlin: derived objective
    assert plan["rpo_seconds"] is None
    assert (plan["effective_rpo_seconds"], plan["rpo_derived"]) == (int(1.5 * 25 * 3600), True)
    body = await _protection(api, instance)
    [entry] = body["plans"]
    assert body["state"] == entry["state"] == "unprotected"
    assert entry["reason"] == "No good backup yet; the objective is 37 hours."
    assert entry["rpo_seconds"] == plan["effective_rpo_seconds"] and entry["rpo_derived"]

    job = await insert_job(
        api, instance, plan_id=plan["id"], status="SUCCEEDED", started_at=now(), ended_at=now()
    )
    await insert_restore_point(api, instance, plan["destination_id"], plan["id"])
    await api.db.restore_points.update_many({}, {"$set": {"job_id": job}})  # its backup
    body = await _protection(api, instance)
    assert body["state"] == "protected", body
    assert body["plans"][0]["reason"].startswith("The newest good backup is 0 seconds old")
    assert body["plans"][0]["last_good_at"] is not None

    # an objective of one hour cannot be met by a nightly plan: at risk, saying when it lapses
    status, changed = await api.call(
        "PATCH", f"/plans/{plan['id']}", instance=instance, json={"rpo_seconds": 3600}
    )
    assert status == 200, changed
    assert (changed["rpo_seconds"], changed["effective_rpo_seconds"]) == (3600, 3600)
    assert changed["rpo_derived"] is False
    body = await _protection(api, instance)
    assert body["state"] == "at_risk"
    assert body["reason"].startswith("The objective of 60 minutes lapses at ")

    # a second plan, paused: the instance is the worst of its plans, named
    paused = await _plan(api, instance, name="weekly", paused=True)
    body = await _protection(api, instance)
    assert body["state"] == "unprotected"
    assert body["reason"].startswith("Plan 'weekly': The plan is paused")
    assert {p["plan_id"]: p["state"] for p in body["plans"]} == {
        plan["id"]: "at_risk",
        paused["id"]: "unprotected",
    }
    # reading changes nothing: the stored state is the evaluator's
    assert await api.db.protection.count_documents({}) == 0


async def test_bad_objectives_are_refused_with_nothing_stored(api: Api) -> None:
    instance = await add_instance(api.db)
    plan = await _plan(api, instance)
    for bad in (0, 59, -1, "3600", 1.5, True, 10**12):
        status, body = await api.call(
            "PATCH", f"/plans/{plan['id']}", instance=instance, json={"rpo_seconds": bad}
        )
        assert status == 400 and body["error"] == "invalid_input", (bad, body)
        assert "rpo_seconds" in str(body), body
    stored = await api.db.plans.find_one({"_id": plan["id"]})
    assert stored.get("rpo_seconds") is None


async def test_the_fleet_view_pages_and_filters_across_many_instances(api: Api) -> None:
    wanted: dict[str, set[str]] = {"protected": set(), "at_risk": set(), "unprotected": set()}
    for n in range(24):
        instance = await add_instance(api.db)
        if n % 3 == 0:  # no plan at all
            wanted["unprotected"].add(instance)
            continue
        plan = await _plan(api, instance)
        await insert_restore_point(api, instance, plan["destination_id"], plan["id"])
        if n % 3 == 2:  # its last backup failed
            job = await insert_job(api, instance, plan_id=plan["id"], status="FAILED")
            await api.db.plans.update_one({"_id": plan["id"]}, {"$set": {"last_job_id": job}})
            wanted["at_risk"].add(instance)
        else:
            wanted["protected"].add(instance)
    await protection.refresh(api.db, now())

    for state, expected in wanted.items():
        seen: list[str] = []
        cursor = ""
        while True:
            status, page = await api.call("GET", f"/v1/protection?state={state}&limit=3{cursor}")
            assert status == 200, page
            assert all(item["state"] == state for item in page["items"])
            seen += [item["instance_id"] for item in page["items"]]
            if not page["next_cursor"]:
                break
            cursor = f"&cursor={page['next_cursor']}"
        assert len(seen) == len(set(seen)) and set(seen) == expected, state

    # numbered pages, everything: newest instance first, each with its plans and reason
    status, first = await api.call("GET", "/v1/protection?page=1&size=10")
    assert status == 200 and first["total"] == 24 and len(first["items"]) == 10
    status, third = await api.call("GET", f"/v1/protection?page=3&size=10&as_of={first['as_of']}")
    assert status == 200 and len(third["items"]) == 4
    at_risk = next(i for i in first["items"] + third["items"] if i["state"] == "at_risk")
    assert at_risk["reason"] == "The last backup failed."
    assert at_risk["plans"][0]["state"] == "at_risk" and at_risk["evaluated_at"]

    for bad in ("state=broken", "state=protected&state=at_risk", "limit=0", "cursor=xyz"):
        status, body = await api.call("GET", f"/v1/protection?{bad}")
        assert status == 400 and body["error"] in ("invalid_input", "invalid_cursor"), (bad, body)


async def test_tenants_get_403_from_the_fleet_view(api: Api) -> None:
    instance = await add_instance(api.db)
    api.cc.grant("alice", instance)
    await protection.refresh(api.db, now())
    for token in (api.uaa.token("alice"), api.uaa.token("mallory")):
        status, body = await api.call("GET", "/v1/protection", token=token)
        assert (status, body["error"]) == (403, "forbidden") and "items" not in body
    status, body = await api.call(
        "GET", "/v1/protection", token=api.uaa.token("ops", scope=["backup_manager.admin"])
    )
    assert status == 200 and body["items"][0]["instance_id"] == instance


async def _metrics(api: Api) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The scrape, parsed: (name, sorted labels) -> value."""
    async with api.service.http.get(api.service.url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_per_plan_and_their_switch(api: Api, make_api: ApiFactory) -> None:
    instance = await add_instance(api.db)
    plan = await _plan(api, instance)
    await insert_restore_point(api, instance, plan["destination_id"], plan["id"])
    bare = await add_instance(api.db)
    await protection.refresh(api.db, now())
    point = await api.db.restore_points.find_one({"plan_id": plan["id"]})
    scrape = await _metrics(api)

    def plan_series(name: str, **more: str) -> float:
        labels = {"instance_id": instance, "plan_id": plan["id"], **more}
        return scrape[(name, tuple(sorted(labels.items())))]

    last_good = plan_series("backup_plan_last_good_backup_timestamp_seconds")
    assert last_good == point["created_at"].timestamp()
    assert plan_series("backup_plan_protection_state", state="protected") == 1
    assert plan_series("backup_plan_protection_state", state="at_risk") == 0
    assert plan_series("backup_plan_protection_state", state="unprotected") == 0
    assert plan_series("backup_plan_rpo_seconds") == plan["effective_rpo_seconds"]
    assert scrape[("backup_instances_protection", (("state", "protected"),))] == 1
    assert scrape[("backup_instances_protection", (("state", "unprotected"),))] == 1
    assert 0 <= scrape[("backup_protection_evaluation_age_seconds", ())] < 60
    # an instance without plans has no per-plan series
    assert not [k for k in scrape if ("instance_id", bare) in k[1]]

    other = await make_api(METRICS_PER_PLAN="false")
    await add_instance(other.db)
    await protection.refresh(other.db, now())
    scrape = await _metrics(other)
    assert not [name for name, _ in scrape if name.startswith("backup_plan_")]
    assert scrape[("backup_instances_protection", (("state", "unprotected"),))] == 1


async def test_the_background_evaluator_stores_states_and_follows_changes(
    mongo_url: str, tmp_path: Any
) -> None:
    """A service with its background loops: the fleet view fills without anyone asking, and
    a plan's change is evaluated again within the minimum gap, not the interval."""
    service = await start_service(
        mongo_url,
        tmp_path,
        loops=True,
        PROTECTION_INTERVAL_SECONDS=3600,
        PROTECTION_MIN_GAP_SECONDS=0.2,
        RUNNER_ENABLED="false",
        SCHEDULER_ENABLED="false",
    )
    try:
        api = Api(service, None, None)  # type: ignore[arg-type]
        instance = await add_instance(service.db)

        async def stored() -> dict[str, Any] | None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                doc = await service.db.protection.find_one({"_id": instance})
                if doc is not None and (doc["plans"] or not expect_plan):
                    return doc
                await asyncio.sleep(0.1)
            return None

        expect_plan = False
        # the evaluator's first turn ran at start, maybe before the instance existed: a plan
        # (plans_changed) wakes it
        plan = await _plan(api, instance)
        expect_plan = True
        doc = await stored()
        assert doc is not None, "the evaluator did not store the instance's state"
        assert doc["plans"][0]["plan_id"] == plan["id"]
        assert doc["state"] == "unprotected"
        assert doc["evaluated_at"] > now() - timedelta(seconds=60)

        # a backup ends on this replica: its runner, on its own pool of the database, fires
        # jobs_ended, which wakes the evaluator: the new restore point is seen without
        # waiting for the interval
        await insert_restore_point(api, instance, plan["destination_id"], plan["id"])
        service.server.app[WORK_DATABASE].events.jobs_ended.fire()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            doc = await service.db.protection.find_one({"_id": instance})
            if doc is not None and doc["state"] == "protected":
                break
            await asyncio.sleep(0.1)
        assert doc is not None and doc["state"] == "protected", doc
    finally:
        await stop_service(service)


async def test_a_failed_check_of_the_destination_puts_its_plans_at_risk(api: Api) -> None:
    instance = await add_instance(api.db)
    plan = await _plan(api, instance)  # its destination is a closed port on loopback
    await insert_restore_point(api, instance, plan["destination_id"], plan["id"])
    assert (await _protection(api, instance))["state"] == "protected"

    path = f"/destinations/{plan['destination_id']}"
    status, check = await api.call("POST", path + "/validate", instance=instance)
    assert status == 200 and check["ok"] is False, check
    body = await _protection(api, instance)
    assert body["state"] == "at_risk"
    assert body["reason"] == f"The destination's last check failed: {check['description']}"

    # a check of a proposed change is not a check of the stored settings
    status, _ = await api.call(
        "POST", path + "/validate", instance=instance, json={"bucket": "other-bucket"}
    )
    assert status == 200
    assert (await _protection(api, instance))["state"] == "at_risk"
    # the settings changed unchecked: the failed check no longer says anything about them
    status, _ = await api.call("PATCH", path, instance=instance, json={"bucket": "other-bucket"})
    assert status == 200
    assert (await _protection(api, instance))["state"] == "protected"
