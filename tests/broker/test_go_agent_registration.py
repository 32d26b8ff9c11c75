"""The Go osb-backup-agent answers 400 to every backup and restore whose database username or
password is empty, which the registration otherwise allows. Once the first probe shows the
agent is a Go one, such a provision or update fails and says what the Go agent needs."""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp
import pytest

from tests.broker.conftest import SERVICE_ID, Osb, go_parameters, parameters, provision_body
from tests.runner.go_agent import PASSWORD, USER, GoAgentStandIn
from tests.servers.broker import Service


def _database(**over: Any) -> dict[str, Any]:
    db: dict[str, Any] = {"host": "127.0.0.1", "port": 5432, "username": "postgres"}
    db.update(over)
    return db


@pytest.mark.parametrize(
    ("database", "missing"),
    [
        (_database(), ["parameters.database.password"]),
        (_database(password=""), ["parameters.database.password"]),
        (_database(username="", password="pw"), ["parameters.database.username"]),
        (
            {"host": "127.0.0.1"},
            ["parameters.database.username", "parameters.database.password"],
        ),
    ],
)
async def test_a_go_agent_without_database_credentials_fails_the_provision(
    broker: Service, osb: Osb, go_agent: GoAgentStandIn, database: dict, missing: list[str]
) -> None:
    iid = str(uuid.uuid4())
    status, body = await osb.provision(
        iid, provision_body(go_parameters(go_agent, database=database))
    )
    assert status == 202, body
    result = await osb.wait(iid, body["operation"])
    assert result["state"] == "failed", result
    text = result["description"]
    assert "Go osb-backup-agent" in text and "database username and password" in text
    for name in missing:
        assert name in text
    status, _, _ = await osb.call("GET", f"/v2/service_instances/{iid}")
    assert status == 404
    assert go_agent.requests == []  # no job was ever sent


async def test_our_agent_without_database_credentials_is_registered(
    osb: Osb, agent_url: str
) -> None:
    await osb.ready_instance(parameters(agent_url, database={"host": "127.0.0.1"}))


async def test_a_go_agent_with_credentials_is_registered(
    osb: Osb, go_agent: GoAgentStandIn
) -> None:
    await osb.ready_instance(go_parameters(go_agent))


@pytest.mark.parametrize(
    "change", [{"username": ""}, {"password": ""}], ids=["no-username", "no-password"]
)
async def test_an_update_that_empties_them_is_refused_for_a_go_agent(
    broker: Service, osb: Osb, go_agent: GoAgentStandIn, change: dict
) -> None:
    iid = await osb.ready_instance(go_parameters(go_agent))
    before = await broker.db.instances.find_one({"_id": iid})
    status, body = await osb.update(
        iid, {"service_id": SERVICE_ID, "parameters": {"database": change}}
    )
    assert status == 400, body
    assert body["error"] == "InvalidParameters" and body["field"] == "parameters.database"
    assert "Go osb-backup-agent" in body["description"]
    assert await broker.db.instances.find_one({"_id": iid}) == before
    # other changes still work
    status, body = await osb.update(
        iid, {"service_id": SERVICE_ID, "parameters": {"items": ["orders"]}}
    )
    assert status == 200, body


async def test_moving_to_a_go_agent_without_them_fails_and_keeps_the_old_agent(
    broker: Service, osb: Osb, agent_url: str, go_agent: GoAgentStandIn
) -> None:
    iid = await osb.ready_instance(parameters(agent_url, database={"host": "127.0.0.1"}))
    before = await broker.db.instances.find_one({"_id": iid})
    moved = {"service_id": SERVICE_ID, "parameters": {"agent": go_parameters(go_agent)["agent"]}}
    status, body = await osb.update(iid, moved)
    assert status == 202, body
    result = await osb.wait(iid, body["operation"])
    assert result["state"] == "failed", result
    assert "database username and password" in result["description"]
    after = await broker.db.instances.find_one({"_id": iid})
    assert after["agent"] == before["agent"] and after["state"] == "ready"
    assert after["secrets"] == before["secrets"]


async def test_why_the_go_agent_stand_in_refuses_such_a_job(go_agent: GoAgentStandIn) -> None:
    """What such an instance would meet at its first backup: the Go agent's 400 with a failed
    job kept under the id."""
    body = {
        "id": "job-1-0",
        "compression": False,
        "encryption_key": "none",
        "destination": {"type": "S3", "bucket": "b", "region": "r", "authKey": "k"},
        "backup": {"host": "127.0.0.1", "username": "postgres", "password": "", "database": "d"},
    }
    headers = {"Authorization": aiohttp.encode_basic_auth(USER, PASSWORD)}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(f"{go_agent.url}/backup", json=body) as r:
            assert r.status == 400
            state = await r.json()
        assert state["state"] == "Body Deserialization"
        assert state["error_message"].endswith("backup(password)")
        async with http.get(f"{go_agent.url}/backup/job-1-0") as r:
            assert r.status == 200 and (await r.json())["status"] == "FAILED"
