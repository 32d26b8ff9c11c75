"""The broker under test with short operation timeouts, real agents (our agent as a process,
the Go agent's stand-in in-process), and helpers to speak OSB to it."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent.helpers import PASSWORD as OUR_AGENT_PASSWORD
from tests.agent.helpers import USER as OUR_AGENT_USER
from tests.agent.helpers import AgentProcess, tracing_scripts
from tests.runner.go_agent import PASSWORD as GO_AGENT_PASSWORD
from tests.runner.go_agent import USER as GO_AGENT_USER
from tests.runner.go_agent import GoAgentStandIn
from tests.servers.broker import Service, start_service, stop_service
from tests.servers.ports import free_port

SERVICE_ID = "a2cc3ad7-d439-406d-9c62-e2be817c72fe"
STANDARD = "969e6b3d-4200-4f87-b552-cbc6882e7c95"
TRANSIENT = "476c2f8e-1af0-4d12-8e8c-b9a4e967bccd"
AGENT_PASSWORD = OUR_AGENT_PASSWORD
DB_PASSWORD = "osb-db-Pa55word-4417"  # the log audit looks for it
CF_USER = "683ea748-3092-4ff4-b656-39cacc4d5360"

# Short enough for tests, long enough for a loaded machine.
FAST = {
    "AGENT_PROBE_TIMEOUT_SECONDS": "3",
    "DEPROVISION_JOB_WAIT_SECONDS": "30",
    "TOMBSTONE_SECONDS": "3600",
}


def cf_identity(user: str = CF_USER) -> str:
    return "cloudfoundry " + base64.b64encode(json.dumps({"user_id": user}).encode()).decode()


def parameters(agent_url: str, **over: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "agent": {"url": agent_url, "username": OUR_AGENT_USER, "password": AGENT_PASSWORD},
        "database": {
            "host": "127.0.0.1",
            "port": 5432,
            "username": "postgres",
            "password": DB_PASSWORD,
            "parameters": {"PGSSLMODE": "disable"},
        },
        "items": ["orders", "customers"],
    }
    params.update(over)
    return params


def go_parameters(go_agent: GoAgentStandIn, **over: Any) -> dict[str, Any]:
    params = parameters(go_agent.url, **over)
    params["agent"] = {
        "url": go_agent.url,
        "username": GO_AGENT_USER,
        "password": GO_AGENT_PASSWORD,
    }
    return params


def provision_body(params: dict[str, Any], plan_id: str = STANDARD, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "service_id": SERVICE_ID,
        "plan_id": plan_id,
        "organization_guid": "org-guid",
        "space_guid": "space-guid",
        "context": {
            "platform": "cloudfoundry",
            "organization_guid": "org-guid",
            "space_guid": "space-guid",
            "instance_name": "orders-db-backup",
        },
        "parameters": params,
    }
    body.update(over)
    return body


def unreachable_url() -> str:
    """An agent URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


class Osb:
    """OSB calls against one service, returning (status, body, headers)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any, Any]:
        async with await self.service.osb(method, path, **kw) as r:
            raw = await r.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            return r.status, body, r.headers

    async def provision(
        self, iid: str, body: dict[str, Any], *, accepts: bool = True, **kw: Any
    ) -> tuple[int, Any]:
        q = "?accepts_incomplete=true" if accepts else ""
        status, data, _ = await self.call("PUT", f"/v2/service_instances/{iid}{q}", json=body, **kw)
        return status, data

    async def update(
        self, iid: str, body: dict[str, Any], *, accepts: bool = True
    ) -> tuple[int, Any]:
        q = "?accepts_incomplete=true" if accepts else ""
        status, data, _ = await self.call("PATCH", f"/v2/service_instances/{iid}{q}", json=body)
        return status, data

    async def deprovision(
        self, iid: str, *, accepts: bool = True, plan_id: str = STANDARD
    ) -> tuple[int, Any]:
        q = f"?service_id={SERVICE_ID}&plan_id={plan_id}"
        if accepts:
            q += "&accepts_incomplete=true"
        status, data, _ = await self.call("DELETE", f"/v2/service_instances/{iid}{q}")
        return status, data

    async def last_operation(self, iid: str, operation: str | None = None) -> tuple[int, Any]:
        q = f"?service_id={SERVICE_ID}&plan_id={STANDARD}"
        if operation:
            q += f"&operation={operation}"
        status, data, _ = await self.call("GET", f"/v2/service_instances/{iid}/last_operation{q}")
        return status, data

    async def wait(
        self, iid: str, operation: str | None = None, timeout: float = 90.0
    ) -> dict[str, Any]:
        """Poll last_operation until the operation is no longer in progress."""
        deadline = time.monotonic() + timeout
        while True:
            status, body = await self.last_operation(iid, operation)
            if status == 410:
                return {"state": "gone"}
            assert status == 200, (status, body)
            if body["state"] != "in progress":
                return body
            assert time.monotonic() < deadline, f"operation still in progress: {body}"
            await asyncio.sleep(0.1)

    async def ready_instance(self, params: dict[str, Any], plan_id: str = STANDARD) -> str:
        iid = str(uuid.uuid4())
        status, body = await self.provision(iid, provision_body(params, plan_id))
        assert status == 202, body
        result = await self.wait(iid, body["operation"])
        assert result["state"] == "succeeded", result
        return iid

    async def bind(self, iid: str, bid: str, **over: Any) -> tuple[int, Any]:
        body = {"service_id": SERVICE_ID, "plan_id": STANDARD, **over}
        status, data, _ = await self.call(
            "PUT", f"/v2/service_instances/{iid}/service_bindings/{bid}", json=body
        )
        return status, data

    async def unbind(self, iid: str, bid: str) -> tuple[int, Any]:
        q = f"?service_id={SERVICE_ID}&plan_id={STANDARD}"
        status, data, _ = await self.call(
            "DELETE", f"/v2/service_instances/{iid}/service_bindings/{bid}{q}"
        )
        return status, data


@pytest.fixture
async def broker(mongo_url: str, tmp_path: Path) -> AsyncIterator[Service]:
    svc = await start_service(mongo_url, tmp_path, **FAST)
    yield svc
    await stop_service(svc)


@pytest.fixture
def osb(broker: Service) -> Osb:
    return Osb(broker)


@pytest.fixture(scope="session")
def our_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """Our agent, a real process, for the whole session (the broker only asks its status)."""
    base = tmp_path_factory.mktemp("osb-agent")
    scripts = base / "scripts"
    tracing_scripts(scripts)
    agent = AgentProcess(base, scripts).start()
    yield agent
    agent.stop()


@pytest.fixture
def agent_url(our_agent: AgentProcess) -> str:
    return f"http://127.0.0.1:{our_agent.port}"


@pytest.fixture
async def go_agent() -> AsyncIterator[GoAgentStandIn]:
    agent = await GoAgentStandIn().start()
    yield agent
    await agent.stop()
