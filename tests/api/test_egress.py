"""The egress policy through the API and OSB: a destination or agent on an address the manager
may not reach on a tenant's behalf is refused with 422 ``egress_denied`` (400 for an agent URL
written as a denied IP) before any connection, and no storage client follows a redirect.

Listeners on loopback stand in for the attacker's hosts. The services run with the tests' policy
(tests/servers/broker.py TEST_EGRESS: the default list except 127.0.0.1), so 127.0.0.2 is denied
and 127.0.0.1 plays an allowed host."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from storage.egress import DEFAULT_DENY
from tests.api.conftest import S3_BODY, SWIFT_BODY, Api, ApiFactory, add_instance
from tests.servers.listener import Listener, start_listener

SECRETS = (S3_BODY["secret_access_key"], SWIFT_BODY["password"])


@pytest.fixture
async def inst(api: Api) -> str:
    return await add_instance(api.db)


def s3_body(url: str) -> dict[str, Any]:
    return {**S3_BODY, "endpoint": url.removeprefix("http://")}


def swift_v1_body(url: str) -> dict[str, Any]:
    return {**SWIFT_BODY, "auth_url": url + "/auth/v1.0"}


def keystone_body(url: str) -> dict[str, Any]:
    return {**SWIFT_BODY, "auth_url": url + "/v3", "auth_version": "3", "project_name": "p"}


BODIES = {"s3": s3_body, "swift-v1": swift_v1_body, "swift-keystone": keystone_body}


def assert_refused(status: int, answer: Any, host: str) -> None:
    assert status == 422, answer
    assert answer["error"] == "egress_denied", answer
    assert host in answer["description"], answer
    assert "EGRESS_DENY_NETWORKS" in answer["description"], answer
    assert not any(secret in str(answer) for secret in SECRETS)


@pytest.mark.parametrize("kind", list(BODIES))
async def test_validating_a_destination_on_a_denied_address_connects_nowhere(
    api: Api, inst: str, denied: Listener, kind: str
) -> None:
    body = BODIES[kind](denied.url)
    status, answer = await api.call("POST", "/destinations/validate", instance=inst, json=body)
    assert_refused(status, answer, "127.0.0.2")
    status, answer = await api.call("POST", "/destinations?validate=true", instance=inst, json=body)
    assert_refused(status, answer, "127.0.0.2")
    # Stored without a check, it is refused when checked later.
    status, created = await api.call("POST", "/destinations", instance=inst, json=body)
    assert status == 201, created
    status, answer = await api.call(
        "POST", f"/destinations/{created['id']}/validate", instance=inst
    )
    assert_refused(status, answer, "127.0.0.2")
    assert denied.connections == 0


@pytest.mark.parametrize("kind", list(BODIES))
async def test_the_metadata_address_is_refused(api: Api, inst: str, kind: str) -> None:
    body = BODIES[kind]("http://169.254.169.254")
    status, answer = await api.call("POST", "/destinations/validate", instance=inst, json=body)
    assert_refused(status, answer, "169.254.169.254")


@pytest.mark.parametrize("kind", list(BODIES))
async def test_a_name_that_resolves_to_a_denied_address_is_refused(
    make_api: ApiFactory, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """With the default list (loopback denied), ``localhost`` is refused by what it resolves
    to, and the answer names it as written."""
    monkeypatch.setenv("EGRESS_DENY_NETWORKS", ",".join(DEFAULT_DENY))
    api = await make_api()
    inst = await add_instance(api.db)
    listener = await start_listener("127.0.0.1")
    try:
        body = BODIES[kind](f"http://localhost:{listener.port}")
        status, answer = await api.call("POST", "/destinations/validate", instance=inst, json=body)
    finally:
        await listener.close()
    assert_refused(status, answer, "localhost")
    assert "127.0.0.1" not in answer["description"]
    assert listener.connections == 0


@pytest.mark.parametrize("kind", list(BODIES))
async def test_a_redirect_is_not_followed(
    api: Api, inst: str, allowed: Listener, second: Listener, kind: str
) -> None:
    allowed.answer("302 Found", {"Location": second.url + "/collect"})
    body = BODIES[kind](allowed.url)
    status, answer = await api.call("POST", "/destinations/validate", instance=inst, json=body)
    assert status == 200, answer
    assert answer["ok"] is False and answer["error"] not in (None, "egress_denied"), answer
    assert second.connections == 0, second.text()
    assert "/collect" not in str(answer)
    assert not any(secret in str(answer) for secret in SECRETS)


def provision_body(agent_url: str) -> dict[str, Any]:
    from tests.broker.conftest import parameters, provision_body

    return provision_body(parameters(agent_url))


async def test_an_agent_written_as_a_denied_ip_is_refused_at_once(
    api: Api, denied: Listener
) -> None:
    iid = uuid.uuid4().hex
    async with await api.service.osb(
        "PUT",
        f"/v2/service_instances/{iid}?accepts_incomplete=true",
        json=provision_body(denied.url),
    ) as r:
        answer = await r.json()
    assert r.status == 400, answer
    assert answer["error"] == "InvalidParameters", answer
    assert "agent.url" in answer["description"] and "127.0.0.2" in answer["description"]
    assert denied.connections == 0


async def test_an_agent_whose_name_resolves_to_a_denied_address_fails_the_provision(
    make_api: ApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EGRESS_DENY_NETWORKS", ",".join(DEFAULT_DENY))
    api = await make_api(AGENT_PROBE_TIMEOUT_SECONDS="30")
    listener = await start_listener("127.0.0.1")
    iid = uuid.uuid4().hex
    try:
        async with await api.service.osb(
            "PUT",
            f"/v2/service_instances/{iid}?accepts_incomplete=true",
            json=provision_body(f"http://localhost:{listener.port}"),
        ) as r:
            assert r.status == 202, await r.text()
        state: dict[str, Any] = {}
        for _ in range(100):  # refused at once, not after the 30 s probe timeout
            async with await api.service.osb(
                "GET", f"/v2/service_instances/{iid}/last_operation"
            ) as r:
                state = await r.json()
            if state.get("state") != "in progress":
                break
            await asyncio.sleep(0.1)
    finally:
        await listener.close()
    assert state.get("state") == "failed", state
    assert "localhost" in state["description"] and "agent.url" in state["description"], state
    assert listener.connections == 0
