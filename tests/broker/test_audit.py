"""The audit trail of OSB: provision, update, bind, unbind and deprovision each leave an entry
naming the platform's user (its originating identity) or the broker, and the parameter names
sent, never their values."""

from __future__ import annotations

import json
import uuid

from tests.broker.conftest import (
    AGENT_PASSWORD,
    CF_USER,
    DB_PASSWORD,
    SERVICE_ID,
    Osb,
    cf_identity,
    parameters,
    provision_body,
)
from tests.servers.broker import BROKER_PASSWORD, BROKER_USER, Service
from tests.servers.log_audit import audit_secret

AS_USER = {"X-Broker-API-Originating-Identity": cf_identity()}


async def test_every_osb_change_is_recorded_with_its_actor_and_no_secret(
    osb: Osb, broker: Service, agent_url: str
) -> None:
    iid = str(uuid.uuid4())
    status, started, _ = await osb.call(
        "PUT",
        f"/v2/service_instances/{iid}?accepts_incomplete=true",
        json=provision_body(parameters(agent_url)),
        headers=AS_USER,
    )
    assert status == 202, started
    assert (await osb.wait(iid, started["operation"]))["state"] == "succeeded"
    status, body = await osb.update(iid, {"service_id": SERVICE_ID, "parameters": {"items": ["a"]}})
    assert status in (200, 202), body
    if status == 202:
        assert (await osb.wait(iid, body["operation"]))["state"] == "succeeded"
    bid = str(uuid.uuid4())
    status, bound = await osb.bind(iid, bid)
    assert status == 201, bound
    key = audit_secret(bound["credentials"]["key"], "a binding key")
    status, _ = await osb.unbind(iid, bid)
    assert status == 200
    # a read changes nothing: no entry
    assert (await osb.call("GET", f"/v2/service_instances/{iid}"))[0] == 200
    status, gone = await osb.deprovision(iid)
    assert status == 202, gone

    trail = await broker.db.audit.find({"instance_id": iid}).sort("created_at", 1).to_list()
    summary = [(e["action"], e["actor"]["kind"], e["resource"]) for e in trail]
    assert summary == [
        ("provision", "platform_user", {"kind": "instance", "id": iid}),
        ("update", "broker", {"kind": "instance", "id": iid}),
        ("bind", "broker", {"kind": "binding", "id": bid}),
        ("unbind", "broker", {"kind": "binding", "id": bid}),
        ("deprovision", "broker", {"kind": "instance", "id": iid}),
    ]
    provision, update = trail[0], trail[1]
    assert provision["actor"]["subject"] == f"cloudfoundry:{CF_USER}"
    assert provision["outcome"] == "accepted" and provision["request_id"]
    assert {"service_id", "plan_id", "parameters", "parameters.agent"} <= set(provision["fields"])
    assert "parameters.items" in update["fields"]
    assert trail[1]["actor"]["subject"] == BROKER_USER

    raw = json.dumps(trail, default=str)
    for secret in (AGENT_PASSWORD, DB_PASSWORD, BROKER_PASSWORD, key):
        assert secret not in raw


async def test_a_refused_osb_change_leaves_no_entry(osb: Osb, broker: Service) -> None:
    iid = str(uuid.uuid4())
    status, _ = await osb.provision(iid, {"service_id": SERVICE_ID})
    assert status == 400
    assert await broker.db.audit.count_documents({"instance_id": iid}) == 0
