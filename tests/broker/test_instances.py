"""Service instances over OSB: provision, fetch, update, deprovision, last_operation, with
the spec's statuses, against real agents and the real database."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import yaml

from broker.config import DEFAULT_CATALOG
from tests.broker.conftest import (
    AGENT_PASSWORD,
    DB_PASSWORD,
    FAST,
    SERVICE_ID,
    STANDARD,
    TRANSIENT,
    Osb,
    go_parameters,
    parameters,
    provision_body,
    unreachable_url,
)
from tests.runner.go_agent import GoAgentStandIn
from tests.servers.broker import Service, start_service, stop_service


async def test_full_lifecycle_with_our_agent(osb: Osb, broker: Service, agent_url: str) -> None:
    iid = str(uuid.uuid4())
    body = provision_body(parameters(agent_url))

    status, data = await osb.provision(iid, body)
    assert status == 202 and data["operation"].startswith("provision-")
    operation = data["operation"]
    # Fetching while provisioning: 404 (the spec's "provisioning still in progress").
    result = await osb.wait(iid, operation)
    assert result["state"] == "succeeded", result
    assert "our agent" in result["description"]

    status, view, _ = await osb.call("GET", f"/v2/service_instances/{iid}")
    assert status == 200
    assert view["service_id"] == SERVICE_ID and view["plan_id"] == STANDARD
    assert view["metadata"]["attributes"]["agent_kind"] == "ours"
    assert view["metadata"]["attributes"]["delete_backups_on_deprovision"] is False
    assert view["parameters"]["agent"] == {"url": agent_url, "username": "agent-user"}
    assert view["parameters"]["items"] == ["orders", "customers"]
    text = str(view)
    assert AGENT_PASSWORD not in text and DB_PASSWORD not in text

    # The stored document: what the job runner reads, the secrets sealed.
    doc = await broker.db.instances.find_one({"_id": iid})
    assert doc["state"] == "ready" and doc["agent"]["kind"] == "ours"
    assert doc["agent"]["url"] == agent_url and doc["agent"]["username"] == "agent-user"
    assert doc["database"] == {
        "host": "127.0.0.1",
        "port": 5432,
        "username": "postgres",
        "parameters": {"PGSSLMODE": "disable"},
    }
    assert doc["items"] == ["orders", "customers"]
    assert doc["context"]["platform"] == "cloudfoundry"
    assert doc["space_guid"] == "space-guid" and doc["schema_version"] == 1
    assert AGENT_PASSWORD not in str(doc) and DB_PASSWORD not in str(doc)
    from broker.context import SECRETS

    opened = broker.app[SECRETS].open_map(doc["secrets"], f"instances/{iid}")
    assert opened == {"agent_password": AGENT_PASSWORD, "database_password": DB_PASSWORD}

    # An identical repeat is 200, a different one 409.
    assert (await osb.provision(iid, body))[0] == 200
    other = provision_body(parameters(agent_url, items=["orders"]))
    status, data = await osb.provision(iid, other)
    assert status == 409 and data["error"] == "Conflict"

    # Deprovision: asynchronous, then succeeded, then the instance is gone.
    status, data = await osb.deprovision(iid)
    assert status == 202
    result = await osb.wait(iid, data["operation"])
    assert result["state"] == "succeeded"
    status, _, _ = await osb.call("GET", f"/v2/service_instances/{iid}")
    assert status == 404
    # Polled again later (tombstone): still succeeded; DELETE again: 410 Gone.
    assert (await osb.last_operation(iid, data["operation"])) == (200, result)
    assert (await osb.deprovision(iid))[0] == 410
    assert (await osb.deprovision(iid, accepts=False))[0] == 410
    doc = await broker.db.instances.find_one({"_id": iid})
    assert doc["state"] == "deleted" and "secrets" not in doc


async def test_go_agent_is_recognised(osb: Osb, go_agent: GoAgentStandIn) -> None:
    iid = await osb.ready_instance(go_parameters(go_agent))
    status, view, _ = await osb.call("GET", f"/v2/service_instances/{iid}")
    assert status == 200 and view["metadata"]["attributes"]["agent_kind"] == "go"
    result = await osb.wait(iid)
    assert "Go osb-backup-agent" in result["description"]


async def test_provision_needs_accepts_incomplete(
    osb: Osb, broker: Service, agent_url: str
) -> None:
    iid = str(uuid.uuid4())
    status, data = await osb.provision(iid, provision_body(parameters(agent_url)), accepts=False)
    assert status == 422 and data["error"] == "AsyncRequired"
    assert "accepts_incomplete=true" in data["description"]
    assert await broker.db.instances.count_documents({"_id": iid}) == 0


async def test_wrong_agent_credentials_fail_the_provision(
    osb: Osb, broker: Service, agent_url: str
) -> None:
    iid = str(uuid.uuid4())
    params = parameters(agent_url)
    params["agent"]["password"] = "not-the-agent-Pa55"
    status, data = await osb.provision(iid, provision_body(params))
    assert status == 202
    result = await osb.wait(iid, data["operation"])
    assert result["state"] == "failed"
    assert "401" in result["description"] and "agent.password" in result["description"]
    assert "not-the-agent-Pa55" not in result["description"]
    # A failed instance does not exist for fetch; its orphan mitigation DELETE is synchronous.
    assert (await osb.call("GET", f"/v2/service_instances/{iid}"))[0] == 404
    assert (await osb.deprovision(iid, accepts=False))[0] == 200
    assert (await osb.deprovision(iid))[0] == 410


async def test_unreachable_agent_fails_after_the_probe_timeout(osb: Osb) -> None:
    iid = str(uuid.uuid4())
    status, data = await osb.provision(iid, provision_body(parameters(unreachable_url())))
    assert status == 202
    result = await osb.wait(iid, data["operation"])
    assert result["state"] == "failed"
    assert "cannot be reached" in result["description"] and "gave up" in result["description"]


async def test_retry_after_while_in_progress(broker: Service, osb: Osb) -> None:
    iid = str(uuid.uuid4())
    await start_slow_provision(broker, osb, iid)
    status, body, headers = await osb.call("GET", f"/v2/service_instances/{iid}/last_operation")
    assert status == 200 and body["state"] == "in progress"
    assert int(headers["Retry-After"]) > 0
    # The description says where it is; the first attempt may still be under way.
    assert body["description"] in ("Checking the agent.",) or (
        body["description"].startswith("Waiting for the agent: the agent at http://127.0.0.1:")
    )


async def start_slow_provision(broker: Service, osb: Osb, iid: str) -> str:
    """A provision that stays in progress: the agent does not answer and the probe timeout
    is long."""
    broker.instances.probe_timeout = 600
    status, data = await osb.provision(iid, provision_body(parameters(unreachable_url())))
    assert status == 202, data
    return data["operation"]


async def test_repeats_and_conflicts_while_provisioning(broker: Service, osb: Osb) -> None:
    iid = str(uuid.uuid4())
    url = unreachable_url()
    broker.instances.probe_timeout = 600
    body = provision_body(parameters(url))
    status, first = await osb.provision(iid, body)
    assert status == 202
    # Re-sent identical PUT: 202 with the same operation; different: 409.
    assert await osb.provision(iid, body) == (202, first)
    status, data = await osb.provision(iid, provision_body(parameters(url, items=["x"])))
    assert status == 409
    # Not fetchable yet; an update must wait: ConcurrencyError.
    assert (await osb.call("GET", f"/v2/service_instances/{iid}"))[0] == 404
    status, data = await osb.update(iid, {"service_id": SERVICE_ID, "parameters": {"items": ["a"]}})
    assert status == 422 and data["error"] == "ConcurrencyError"
    # A binding must wait too.
    status, data = await osb.bind(iid, str(uuid.uuid4()))
    assert status == 422 and data["error"] == "ConcurrencyError"
    # Deprovisioning halts the provision; the provision operation then reads as failed.
    status, gone = await osb.deprovision(iid)
    assert status == 202
    assert (await osb.wait(iid, gone["operation"]))["state"] == "succeeded"
    status, halted = await osb.last_operation(iid, first["operation"])
    assert status == 200 and halted["state"] == "failed" and "Halted" in halted["description"]
    # An operation id it did not hand out is ignored: the answer is the latest operation's.
    status, data = await osb.last_operation(iid, "provision-unknown")
    assert status == 200 and data == await osb.wait(iid), data


async def test_concurrent_conflicting_provisions(broker: Service, osb: Osb) -> None:
    broker.instances.probe_timeout = 600
    iid = str(uuid.uuid4())
    url = unreachable_url()
    bodies = [provision_body(parameters(url, items=[f"db{n}"])) for n in range(6)]
    results = await asyncio.gather(*(osb.provision(iid, b) for b in bodies))
    statuses = sorted(s for s, _ in results)
    assert statuses == [202, 409, 409, 409, 409, 409], results
    winner = next(b for b, (s, _) in zip(bodies, results, strict=True) if s == 202)
    doc = await broker.db.instances.find_one({"_id": iid})
    assert doc["items"] == winner["parameters"]["items"]
    # Identical concurrent repeats all answer 202 with one operation.
    same = await asyncio.gather(*(osb.provision(iid, winner) for _ in range(4)))
    assert {s for s, _ in same} == {202}
    assert len({d["operation"] for _, d in same}) == 1
    await osb.deprovision(iid)


async def test_deprovision_of_unknown_instance_is_gone(osb: Osb) -> None:
    iid = str(uuid.uuid4())
    assert (await osb.deprovision(iid))[0] == 410
    assert (await osb.deprovision(iid, accepts=False))[0] == 410
    assert (await osb.last_operation(iid))[0] == 410
    assert (await osb.call("GET", f"/v2/service_instances/{iid}"))[0] == 404


async def test_repeated_delete_while_deleting_answers_the_same_operation(
    broker: Service, osb: Osb, agent_url: str
) -> None:
    iid = await osb.ready_instance(parameters(agent_url))
    # A running job keeps the deletion in progress until the runner stops it.
    await broker.db.jobs.insert_one(running_job(iid))
    status, first = await osb.deprovision(iid)
    assert status == 202
    again = await asyncio.gather(*(osb.deprovision(iid) for _ in range(3)))
    assert again == [(202, first)] * 3
    status, data = await osb.deprovision(iid, accepts=False)
    assert status == 422 and data["error"] == "AsyncRequired"
    status, data = await osb.update(iid, {"service_id": SERVICE_ID, "parameters": {"items": ["a"]}})
    assert status == 422 and data["error"] == "ConcurrencyError"
    # The job was asked to stop; the runner (here: the test) ends it.
    job = await wait_for(broker, {"_id": "job-running", "cancel_requested": True})
    assert job["status"] == "RUNNING"
    await broker.db.jobs.update_one(
        {"_id": "job-running"}, {"$set": {"status": "CANCELLED", "reason": "stopped"}}
    )
    result = await osb.wait(iid, first["operation"])
    assert result["state"] == "succeeded"
    assert await broker.db.jobs.count_documents({"instance_id": iid}) == 0


def running_job(iid: str, job_id: str = "job-running") -> dict[str, Any]:
    return {
        "_id": job_id,
        "instance_id": iid,
        "type": "BACKUP",
        "plan_id": "p1",
        "destination_id": "d1",
        "status": "RUNNING",
        "cancel_requested": False,
        "items": [],
        "version": 1,
        "schema_version": 1,
    }


async def wait_for(broker: Service, query: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        doc = await broker.db.jobs.find_one(query)
        if doc is not None:
            return doc
        assert asyncio.get_running_loop().time() < deadline, f"no job matches {query}"
        await asyncio.sleep(0.05)


async def test_update_parameters_synchronously(osb: Osb, broker: Service, agent_url: str) -> None:
    iid = await osb.ready_instance(parameters(agent_url))
    body = {
        "service_id": SERVICE_ID,
        "parameters": {"items": ["orders"], "database": {"port": 6432}},
        "context": {"platform": "cloudfoundry", "instance_name": "renamed"},
    }
    status, data = await osb.update(iid, body, accepts=False)
    assert (status, data) == (200, {})
    doc = await broker.db.instances.find_one({"_id": iid})
    assert doc["items"] == ["orders"]
    assert doc["database"]["port"] == 6432 and doc["database"]["username"] == "postgres"
    assert doc["context"]["instance_name"] == "renamed"
    from broker.context import SECRETS

    opened = broker.app[SECRETS].open_map(doc["secrets"], f"instances/{iid}")
    assert opened["database_password"] == DB_PASSWORD, "merged, not dropped"
    # A plan change decides what happens to stored backups unless a parameter does.
    status, _ = await osb.update(iid, {"service_id": SERVICE_ID, "plan_id": TRANSIENT})
    assert status == 200
    doc = await broker.db.instances.find_one({"_id": iid})
    assert doc["plan_id"] == TRANSIENT and doc["delete_backups_on_deprovision"] is True
    status, _ = await osb.update(
        iid, {"service_id": SERVICE_ID, "parameters": {"delete_backups_on_deprovision": False}}
    )
    doc = await broker.db.instances.find_one({"_id": iid})
    assert doc["delete_backups_on_deprovision"] is False


async def test_update_of_the_agent_is_checked_first(
    osb: Osb, broker: Service, agent_url: str
) -> None:
    iid = await osb.ready_instance(parameters(agent_url))
    broker.instances.probe_timeout = 600
    go_agent = GoAgentStandIn()  # not answering yet: the update stays in progress
    new_agent = go_parameters(go_agent)["agent"]
    change = {"service_id": SERVICE_ID, "parameters": {"agent": new_agent}}
    status, data = await osb.update(iid, change, accepts=False)
    assert status == 422 and data["error"] == "AsyncRequired"
    status, data = await osb.update(iid, change)
    assert status == 202
    # Re-sent identical PATCH: 202 with the same operation; a different one must wait.
    assert (await osb.update(iid, change)) == (202, data)
    other = {"service_id": SERVICE_ID, "parameters": {"items": ["x"]}}
    status, error = await osb.update(iid, other)
    assert status == 422 and error["error"] == "ConcurrencyError"
    # The old agent stays in force until the new one answers; fetching must wait.
    doc = await broker.db.instances.find_one({"_id": iid})
    assert doc["state"] == "updating" and doc["agent"]["url"] == agent_url
    assert (await osb.call("GET", f"/v2/service_instances/{iid}"))[0] == 422
    await go_agent.start()
    try:
        result = await osb.wait(iid, data["operation"])
        assert result["state"] == "succeeded"
        doc = await broker.db.instances.find_one({"_id": iid})
        assert doc["agent"]["kind"] == "go" and doc["agent"]["url"] == go_agent.url
        assert doc["pending_update"] is None and doc["state"] == "ready"

        # A failing check keeps the old agent: the update failed, the instance usable.
        bad = {"service_id": SERVICE_ID, "parameters": {"agent": {"password": "wrong-Pa55word"}}}
        status, data = await osb.update(iid, bad)
        assert status == 202
        result = await osb.wait(iid, data["operation"])
    finally:
        await go_agent.stop()
    assert result["state"] == "failed" and result["instance_usable"] is True
    assert result["update_repeatable"] is True
    doc = await broker.db.instances.find_one({"_id": iid})
    assert doc["agent"]["url"] == go_agent.url and doc["state"] == "ready"
    from broker.context import SECRETS

    opened = broker.app[SECRETS].open_map(doc["secrets"], f"instances/{iid}")
    assert opened["agent_password"] == new_agent["password"]


async def test_concurrent_conflicting_updates(broker: Service, osb: Osb, agent_url: str) -> None:
    iid = await osb.ready_instance(parameters(agent_url))
    broker.instances.probe_timeout = 600
    changes = [
        {"service_id": SERVICE_ID, "parameters": {"agent": {"url": unreachable_url()}}}
        for _ in range(5)
    ]
    results = await asyncio.gather(*(osb.update(iid, c) for c in changes))
    statuses = sorted(s for s, _ in results)
    assert statuses == [202, 422, 422, 422, 422], results
    assert all(d["error"] == "ConcurrencyError" for s, d in results if s == 422)
    await osb.deprovision(iid)


async def test_maintenance_info(osb: Osb, broker: Service, agent_url: str) -> None:
    iid = str(uuid.uuid4())
    body = provision_body(parameters(agent_url), maintenance_info={"version": "0.9.0"})
    status, data = await osb.provision(iid, body)
    assert status == 422 and data["error"] == "MaintenanceInfoConflict"
    assert await broker.db.instances.count_documents({"_id": iid}) == 0
    body["maintenance_info"] = {"version": "1.0.0"}
    status, data = await osb.provision(iid, body)
    assert status == 202
    await osb.wait(iid, data["operation"])
    status, view, _ = await osb.call("GET", f"/v2/service_instances/{iid}")
    assert view["maintenance_info"] == {"version": "1.0.0"}
    status, data = await osb.update(
        iid, {"service_id": SERVICE_ID, "maintenance_info": {"version": "2.0.0"}}
    )
    assert status == 422 and data["error"] == "MaintenanceInfoConflict"


async def test_update_of_unknown_instance(osb: Osb) -> None:
    status, data = await osb.update(str(uuid.uuid4()), {"service_id": SERVICE_ID})
    assert status == 404 and data["error"] == "InstanceNotFound"


async def test_a_plan_that_is_not_updateable_is_kept(
    mongo_url: str, tmp_path: Path, agent_url: str
) -> None:
    catalog = yaml.safe_load(DEFAULT_CATALOG.read_text())
    for plan in catalog["services"][0]["plans"]:
        plan["plan_updateable"] = plan["id"] != STANDARD
    path = tmp_path / "catalog" / "catalog.yml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(catalog))
    service = await start_service(mongo_url, tmp_path, CATALOG_PATH=str(path), **FAST)
    try:
        osb = Osb(service)
        iid = await osb.ready_instance(parameters(agent_url))
        status, data = await osb.update(iid, {"service_id": SERVICE_ID, "plan_id": TRANSIENT})
        assert (status, data["error"], data["field"]) == (422, "PlanChangeNotSupported", "plan_id")
        assert data["description"] == "Plan 'standard' cannot be changed to another plan."
        doc = await service.db.instances.find_one({"_id": iid})
        assert doc["plan_id"] == STANDARD
        # Naming the plan it is on is no change.
        status, data = await osb.update(iid, {"service_id": SERVICE_ID, "plan_id": STANDARD})
        assert (status, data) == (200, {})
    finally:
        await stop_service(service)


async def test_provision_parameters_are_stored_in_clear_only_without_secrets(
    osb: Osb, agent_url: str, broker: Service
) -> None:
    iid = await osb.ready_instance(parameters(agent_url), plan_id=TRANSIENT)
    doc = await broker.db.instances.find_one({"_id": iid})
    assert doc["delete_backups_on_deprovision"] is True, "the transient plan's default"
    assert "password" not in doc["parameters"]["agent"]
    assert "password" not in doc["parameters"]["database"]
