"""The exact request shapes of the official OSB conformance checker (openservicebrokerapi/
osb-checker, API 2.14): its generated Go client sends every struct whether filled or not, so
``"maintenance_info": {}`` (and ``"previous_values": {"maintenance_info": {}}``) come with
every provision and update, ``"bind_resource": {}`` with every bind, and ``last_operation``
carries the words ``provision``, ``update`` and ``deprovision`` as ``operation``. Each is
driven over HTTP against the real service at API 2.14 and 2.17."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from tests.broker.conftest import SERVICE_ID, STANDARD, Osb, cf_identity, parameters
from tests.servers.broker import Service

VERSIONS = ["2.14", "2.17"]


def headers(version: str) -> dict[str, str]:
    return {
        "X-Broker-API-Version": version,
        "X-Broker-API-Originating-Identity": cf_identity(),
        "X-Broker-API-Request-Identity": str(uuid.uuid4()),
    }


def checker_provision(agent_url: str, **over: Any) -> dict[str, Any]:
    """As the checker's ServiceInstanceProvisionRequest serializes (no omitempty on the
    guids, an empty struct for maintenance_info)."""
    return {
        "service_id": SERVICE_ID,
        "plan_id": STANDARD,
        "context": {"platform": "cloudfoundry", "some_field": "some-contextual-data"},
        "organization_guid": "org-guid-here",
        "space_guid": "space-guid-here",
        "parameters": parameters(agent_url),
        "maintenance_info": {},
        **over,
    }


def checker_update(**over: Any) -> dict[str, Any]:
    return {
        "context": {"platform": "cloudfoundry"},
        "service_id": SERVICE_ID,
        "plan_id": STANDARD,
        "parameters": {"items": ["orders"]},
        "previous_values": {"service_id": SERVICE_ID, "plan_id": STANDARD, "maintenance_info": {}},
        "maintenance_info": {},
        **over,
    }


class Checker:
    """The checker's calls at one API version."""

    def __init__(self, osb: Osb, version: str) -> None:
        self.osb, self.version = osb, version

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        status, body, _ = await self.osb.call(method, path, headers=headers(self.version), **kw)
        return status, body

    async def provision(self, iid: str, body: dict[str, Any]) -> tuple[int, Any]:
        return await self.call(
            "PUT", f"/v2/service_instances/{iid}?accepts_incomplete=true", json=body
        )

    async def update(self, iid: str, body: dict[str, Any]) -> tuple[int, Any]:
        return await self.call(
            "PATCH", f"/v2/service_instances/{iid}?accepts_incomplete=true", json=body
        )

    async def last_operation(self, iid: str, operation: str) -> tuple[int, Any]:
        q = f"service_id={SERVICE_ID}&plan_id={STANDARD}&operation={operation}"
        return await self.call("GET", f"/v2/service_instances/{iid}/last_operation?{q}")

    async def wait(self, iid: str, operation: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status, body = await self.last_operation(iid, operation)
            assert status == 200, (status, body)
            if body["state"] != "in progress":
                return body
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("version", VERSIONS)
async def test_the_checkers_lifecycle(
    osb: Osb, broker: Service, agent_url: str, version: str
) -> None:
    checker = Checker(osb, version)
    iid = str(uuid.uuid4())
    status, body = await checker.provision(iid, checker_provision(agent_url))
    assert status == 202, body
    # The checker polls with the word "provision", not the operation id it was given.
    result = await checker.wait(iid, "provision")
    assert result["state"] == "succeeded", result
    doc = await broker.db.instances.find_one({"_id": iid})
    assert doc["maintenance_info"] is None, "an empty maintenance_info is none"

    status, body = await checker.update(iid, checker_update())
    assert (status, body) == (200, {})
    status, body = await checker.last_operation(iid, "update")
    assert status == 200 and body["state"] == "succeeded", body
    assert "updated" in body["description"]
    assert (await broker.db.instances.find_one({"_id": iid}))["items"] == ["orders"]

    bid = str(uuid.uuid4())
    status, body = await checker.call(
        "PUT",
        f"/v2/service_instances/{iid}/service_bindings/{bid}?accepts_incomplete=true",
        json={
            "service_id": SERVICE_ID,
            "plan_id": STANDARD,
            "bind_resource": {},
            "maintenance_info": {},
        },
    )
    assert status == 201 and body["credentials"]["key"].startswith("bmk_"), body
    q = f"service_id={SERVICE_ID}&plan_id={STANDARD}&operation=bind"
    status, body = await checker.call(
        "GET", f"/v2/service_instances/{iid}/service_bindings/{bid}/last_operation?{q}"
    )
    assert status == 200 and body["state"] == "succeeded", body

    status, body = await checker.call(
        "DELETE",
        f"/v2/service_instances/{iid}?accepts_incomplete=true&service_id={SERVICE_ID}"
        f"&plan_id={STANDARD}",
    )
    assert status in (200, 202), body
    result = await checker.wait(iid, "deprovision")
    assert result["state"] == "succeeded", result


async def test_below_2_15_maintenance_info_is_ignored_whatever_it_holds(
    osb: Osb, broker: Service, agent_url: str
) -> None:
    checker = Checker(osb, "2.14")
    for held in ({"version": "9.9.9"}, {"description": "no version"}, "text", 7, []):
        iid = str(uuid.uuid4())
        status, body = await checker.provision(
            iid, checker_provision(agent_url, maintenance_info=held)
        )
        assert status == 202, (held, body)
        assert (await checker.wait(iid, "provision"))["state"] == "succeeded"
        assert (await broker.db.instances.find_one({"_id": iid}))["maintenance_info"] is None
    # Updates too, and previous_values with it.
    for held in ({"version": "9.9.9"}, {"description": "no version"}, "text"):
        status, body = await checker.update(
            iid,
            checker_update(
                maintenance_info=held, previous_values={"maintenance_info": held, "plan_id": ""}
            ),
        )
        assert (status, body) == (200, {}), held
    assert (await broker.db.instances.find_one({"_id": iid}))["maintenance_info"] is None


async def test_from_2_15_maintenance_info_counts_when_it_says_something(
    osb: Osb, broker: Service, agent_url: str
) -> None:
    checker = Checker(osb, "2.17")
    iid = str(uuid.uuid4())
    status, body = await checker.provision(
        iid, checker_provision(agent_url, maintenance_info={"version": "9.9.9"})
    )
    assert status == 422 and body["error"] == "MaintenanceInfoConflict", body
    status, body = await checker.provision(
        iid, checker_provision(agent_url, maintenance_info={"description": "no version"})
    )
    assert status == 400 and body["field"] == "maintenance_info.version", body
    assert await broker.db.instances.count_documents({"_id": iid}) == 0, "4xx stores nothing"
    status, body = await checker.provision(
        iid, checker_provision(agent_url, maintenance_info={"version": "1.0.0"})
    )
    assert status == 202, body
    await checker.wait(iid, "provision")
    status, body = await checker.update(
        iid, checker_update(previous_values={"maintenance_info": {"description": "x"}})
    )
    assert status == 400 and body["field"] == "previous_values.maintenance_info.version"
    status, body = await checker.update(iid, checker_update(maintenance_info={"version": "2"}))
    assert status == 422 and body["error"] == "MaintenanceInfoConflict", body
    # The empty one of the checker leaves the stored version as it was.
    assert (await checker.update(iid, checker_update()))[0] == 200
    doc = await broker.db.instances.find_one({"_id": iid})
    assert doc["maintenance_info"] == {"version": "1.0.0"}


@pytest.mark.parametrize("version", VERSIONS)
async def test_an_unknown_operation_reads_as_the_latest_one(
    osb: Osb, broker: Service, agent_url: str, version: str
) -> None:
    checker = Checker(osb, version)
    iid = await osb.ready_instance(parameters(agent_url))
    status, latest = await osb.last_operation(iid)
    assert status == 200
    for word in ("provision", "update", "deprovision", "provision-0000", "%E2%9C%93"):
        assert await checker.last_operation(iid, word) == (200, latest), word
    # A known id still names its own operation.
    status, body = await checker.update(iid, checker_update())
    assert status == 200
    doc = await broker.db.instances.find_one({"_id": iid})
    first = doc["previous_operations"][-1]["id"]
    assert first.startswith("provision-")
    status, body = await checker.last_operation(iid, first)
    assert status == 200 and "Registered" in body["description"], body
    status, body = await checker.last_operation(iid, "provision")
    assert status == 200 and "updated" in body["description"], "the latest: the update"
    # An unknown instance stays 410 whatever the operation.
    status, body = await checker.last_operation(str(uuid.uuid4()), "provision")
    assert status == 410 and body["error"] == "Gone"
