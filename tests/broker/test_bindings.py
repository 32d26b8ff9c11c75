"""Bindings: a key for the backup-manager API of one instance, shown once, stored as a hash,
revoked by unbind."""

from __future__ import annotations

import asyncio
import hashlib
import uuid

from tests.broker.conftest import SERVICE_ID, STANDARD, Osb, parameters
from tests.servers.broker import Service
from tests.servers.log_audit import audit_secret


async def api_get(broker: Service, key: str, instance_id: str, path: str = "/plans") -> int:
    url = f"{broker.url}/v1/service_instances/{instance_id}{path}"
    async with broker.http.get(url, headers={"Authorization": f"Bearer {key}"}) as r:
        await r.read()
        return r.status


async def test_bind_use_fetch_unbind(osb: Osb, broker: Service, agent_url: str) -> None:
    iid = await osb.ready_instance(parameters(agent_url))
    other = await osb.ready_instance(parameters(agent_url))
    bid = str(uuid.uuid4())

    status, data = await osb.bind(iid, bid, bind_resource={"app_guid": "app-1"})
    assert status == 201, data
    creds = data["credentials"]
    key = audit_secret(creds["key"], "a binding key")
    assert key.startswith("bmk_") and len(key) == 47
    assert creds["instance_id"] == iid
    assert creds["api_url"] == broker.url
    assert creds["uri"] == f"{broker.url}/v1/service_instances/{iid}"

    # Stored as a hash only.
    doc = await broker.db.bindings.find_one({"_id": bid})
    assert doc["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert key not in str(doc)
    assert doc["bind_resource"] == {"app_guid": "app-1"} and doc["instance_id"] == iid

    # The key opens this instance's API, and only this one's.
    assert await api_get(broker, key, iid) == 200
    assert await api_get(broker, key, other) == 404

    # Fetch and identical repeat: the address, never the key again.
    status, fetched, _ = await osb.call(
        "GET", f"/v2/service_instances/{iid}/service_bindings/{bid}"
    )
    assert status == 200 and "key" not in fetched["credentials"]
    assert fetched["credentials"]["uri"] == creds["uri"] and fetched["parameters"] == {}
    status, again = await osb.bind(iid, bid, bind_resource={"app_guid": "app-1"})
    assert status == 200 and "key" not in again["credentials"]
    status, data = await osb.bind(iid, bid, bind_resource={"app_guid": "app-2"})
    assert status == 409 and data["error"] == "Conflict"
    status, data, _ = await osb.call(
        "GET", f"/v2/service_instances/{iid}/service_bindings/{bid}/last_operation"
    )
    assert status == 200 and data["state"] == "succeeded"

    # Unbind revokes the key at once; every later DELETE is 410.
    assert await osb.unbind(iid, bid) == (200, {})
    assert await api_get(broker, key, iid) == 401
    assert (await osb.unbind(iid, bid))[0] == 410
    status, _, _ = await osb.call("GET", f"/v2/service_instances/{iid}/service_bindings/{bid}")
    assert status == 404
    status, _, _ = await osb.call(
        "GET", f"/v2/service_instances/{iid}/service_bindings/{bid}/last_operation"
    )
    assert status == 410


async def test_binding_belongs_to_its_instance(osb: Osb, agent_url: str) -> None:
    iid = await osb.ready_instance(parameters(agent_url))
    other = await osb.ready_instance(parameters(agent_url))
    bid = str(uuid.uuid4())
    assert (await osb.bind(iid, bid))[0] == 201
    # The same binding id under another instance: conflict, not a second binding.
    assert (await osb.bind(other, bid))[0] == 409
    assert (await osb.unbind(other, bid))[0] == 410
    status, _, _ = await osb.call("GET", f"/v2/service_instances/{other}/service_bindings/{bid}")
    assert status == 404
    assert (await osb.unbind(iid, bid))[0] == 200


async def test_bind_to_unknown_instance(osb: Osb) -> None:
    status, data = await osb.bind(str(uuid.uuid4()), str(uuid.uuid4()))
    assert status == 404 and data["error"] == "InstanceNotFound"


async def test_bind_validates_body_and_parameters(
    osb: Osb, broker: Service, agent_url: str
) -> None:
    iid = await osb.ready_instance(parameters(agent_url))
    bid = str(uuid.uuid4())
    status, data = await osb.bind(iid, bid, parameters={"read_only": True})
    assert status == 400 and data["field"] == "parameters.read_only"
    status, data = await osb.bind(iid, bid, plan_id="nope")
    assert status == 400 and data["field"] == "plan_id"
    status, data, _ = await osb.call(
        "PUT",
        f"/v2/service_instances/{iid}/service_bindings/{bid}",
        json={"service_id": SERVICE_ID, "plan_id": STANDARD, "bind_resource": "app"},
    )
    assert status == 400 and data["field"] == "bind_resource"
    assert await broker.db.bindings.count_documents({}) == 0


async def test_concurrent_binds_with_one_id(osb: Osb, broker: Service, agent_url: str) -> None:
    iid = await osb.ready_instance(parameters(agent_url))
    bid = str(uuid.uuid4())
    results = await asyncio.gather(
        *(osb.bind(iid, bid, bind_resource={"app_guid": f"app-{n}"}) for n in range(5))
    )
    statuses = sorted(s for s, _ in results)
    assert statuses == [201, 409, 409, 409, 409], results
    for status, data in results:
        if status == 201:
            audit_secret(data["credentials"]["key"])
    assert await broker.db.bindings.count_documents({"_id": bid}) == 1


async def test_deprovision_revokes_bindings(osb: Osb, broker: Service, agent_url: str) -> None:
    iid = await osb.ready_instance(parameters(agent_url))
    status, data = await osb.bind(iid, "b-1")
    key = audit_secret(data["credentials"]["key"])
    assert await api_get(broker, key, iid) == 200
    status, data = await osb.deprovision(iid)
    assert status == 202
    assert (await osb.wait(iid, data["operation"]))["state"] == "succeeded"
    assert await api_get(broker, key, iid) == 401
    assert await broker.db.bindings.count_documents({"instance_id": iid}) == 0
