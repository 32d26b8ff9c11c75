"""Agent URLs over plain HTTP carry the agent's and the database's passwords in the clear:
``AGENT_REQUIRE_TLS`` refuses them, and without it the OSB answer says so."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backup.secrets import generate_master_key_spec
from tests.broker.conftest import FAST, SERVICE_ID, Osb, parameters, provision_body
from tests.servers.broker import Service, start_service, stop_service
from tests.servers.recorder import Recorder


@pytest.fixture
async def strict(mongo_url: str, tmp_path: Path) -> AsyncIterator[Service]:
    svc = await start_service(mongo_url, tmp_path, AGENT_REQUIRE_TLS="true", **FAST)
    yield svc
    await stop_service(svc)


async def test_required_tls_refuses_http_agents_without_contacting_them(
    strict: Service, recorder: Recorder
) -> None:
    osb = Osb(strict)
    iid = str(uuid.uuid4())
    status, body = await osb.provision(iid, provision_body(parameters(recorder.url)))
    assert status == 400, body
    assert body["error"] == "InvalidParameters" and body["field"] == "parameters.agent.url"
    assert "AGENT_REQUIRE_TLS" in body["description"]
    assert recorder.requests == []
    assert await strict.db.instances.find_one({"_id": iid}) is None


async def test_required_tls_refuses_an_update_to_an_http_agent(
    mongo_url: str, tmp_path: Path, agent_url: str, recorder: Recorder
) -> None:
    # registered while http:// was allowed, then the operator requires TLS
    keys = generate_master_key_spec()
    lax = await start_service(mongo_url, tmp_path, SECRETS_MASTER_KEYS=keys, **FAST)
    try:
        iid = await Osb(lax).ready_instance(parameters(agent_url))
    finally:
        await stop_service(lax)
    strict = await start_service(
        mongo_url,
        tmp_path,
        lax.settings.mongodb_database,
        SECRETS_MASTER_KEYS=keys,
        AGENT_REQUIRE_TLS="true",
        **FAST,
    )
    try:
        osb = Osb(strict)
        before = await strict.db.instances.find_one({"_id": iid})
        moved = {"service_id": SERVICE_ID, "parameters": {"agent": {"url": recorder.url}}}
        status, body = await osb.update(iid, moved)
        assert status == 400 and body["error"] == "InvalidParameters", body
        assert recorder.requests == []
        assert await strict.db.instances.find_one({"_id": iid}) == before
        # changes that keep the agent still work
        status, body = await osb.update(
            iid, {"service_id": SERVICE_ID, "parameters": {"items": ["orders"]}}
        )
        assert status == 200, body
    finally:
        await stop_service(strict)


async def test_without_the_setting_the_answer_warns_about_cleartext(
    osb: Osb, agent_url: str
) -> None:
    assert agent_url.startswith("http://")
    iid = str(uuid.uuid4())
    status, body = await osb.provision(iid, provision_body(parameters(agent_url)))
    assert status == 202, body
    result = await osb.wait(iid, body["operation"])
    assert result["state"] == "succeeded", result
    assert "plain http://" in result["description"]
    assert "AGENT_REQUIRE_TLS" in result["description"]
