"""The OSB contract around the operations: catalog, authentication, the version header,
request and originating identities, and clear 400s for malformed or wrong input with nothing
stored."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from tests.broker.conftest import (
    AGENT_PASSWORD,
    CF_USER,
    DB_PASSWORD,
    SERVICE_ID,
    STANDARD,
    Osb,
    cf_identity,
    parameters,
    provision_body,
)
from tests.servers.broker import Service


async def test_catalog(osb: Osb) -> None:
    status, body, headers = await osb.call("GET", "/v2/catalog")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    (service,) = body["services"]
    assert service["id"] == SERVICE_ID and service["name"] == "backup"
    assert service["instances_retrievable"] is True and service["bindings_retrievable"] is True
    assert service["bindable"] is True and service["plan_updateable"] is True
    plans = {p["name"]: p for p in service["plans"]}
    assert set(plans) == {"standard", "transient"}
    for plan in plans.values():
        schema = plan["schemas"]["service_instance"]["create"]["parameters"]
        assert schema["$schema"] == "http://json-schema.org/draft-04/schema#"
        assert set(schema["required"]) == {"agent", "database", "items"}
        assert plan["maintenance_info"]["version"] == "1.0.0"
    assert plans["standard"]["metadata"]["delete_backups_on_deprovision"] is False
    assert "x-schemas" not in body


@pytest.mark.parametrize(
    "auth",
    [None, ("test-broker", "wrong"), ("someone", "broker-pw-Zq8Vx3")],
    ids=["none", "wrong-password", "wrong-user"],
)
async def test_authentication_is_required_everywhere(osb: Osb, auth: Any) -> None:
    iid = str(uuid.uuid4())
    for method, path in [
        ("GET", "/v2/catalog"),
        ("PUT", f"/v2/service_instances/{iid}"),
        ("DELETE", f"/v2/service_instances/{iid}?service_id=s&plan_id=p"),
        ("GET", f"/v2/service_instances/{iid}/last_operation"),
        ("PUT", f"/v2/service_instances/{iid}/service_bindings/b"),
    ]:
        status, body, headers = await osb.call(method, path, auth=auth)
        assert status == 401, (method, path)
        assert body["error"] == "Unauthorized"
        assert headers["WWW-Authenticate"].startswith("Basic")


async def test_malformed_authorization_header(osb: Osb) -> None:
    for header in ["Basic !!!", "Basic " + "QQ==", "Bearer abc", "Basic"]:
        status, _, _ = await osb.call(
            "GET", "/v2/catalog", auth=None, headers={"Authorization": header}
        )
        assert status == 401, header


@pytest.mark.parametrize("version", ["2.13", "2.14", "2.16", "2.17", "2.99"])
async def test_every_2x_version_from_213_is_accepted(osb: Osb, version: str) -> None:
    status, _, _ = await osb.call("GET", "/v2/catalog", headers={"X-Broker-API-Version": version})
    assert status == 200


@pytest.mark.parametrize("version", ["2.12", "2.0", "1.17", "3.0", "two", "", "2"])
async def test_other_versions_are_412(osb: Osb, version: str) -> None:
    status, body, _ = await osb.call(
        "GET", "/v2/catalog", headers={"X-Broker-API-Version": version}
    )
    assert status == 412 and body["error"] == "PreconditionFailed"
    assert "2.13" in body["description"]


async def test_missing_version_header_is_412(broker: Service) -> None:
    url = broker.url + "/v2/catalog"
    async with broker.http.get(url, headers={"Authorization": _basic()}) as r:
        assert r.status == 412
        assert "missing" in (await r.json())["description"]


def _basic() -> str:
    import aiohttp

    return aiohttp.encode_basic_auth("test-broker", "broker-pw-Zq8Vx3")


async def test_identities(osb: Osb, agent_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    iid = str(uuid.uuid4())
    capsys.readouterr()
    status, _, headers = await osb.call(
        "PUT",
        f"/v2/service_instances/{iid}?accepts_incomplete=true",
        json=provision_body(parameters(agent_url)),
        headers={
            "X-Broker-API-Request-Identity": "req-4711",
            "X-Broker-API-Originating-Identity": cf_identity(),
        },
    )
    assert status == 202
    assert headers["X-Broker-API-Request-Identity"] == "req-4711"
    await osb.wait(iid)
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    mine = [x for x in lines if x.get("request_id") == "req-4711"]
    assert any(x["event"] == "instance_provisioning" for x in mine), mine
    assert all(x.get("acting_user") == f"cloudfoundry:{CF_USER}" for x in mine), mine
    # The operation's own lines carry the request id that started it.
    assert any(x["event"] == "instance_provisioned" for x in mine), mine
    # A malformed identity is ignored, not fatal.
    status, _, _ = await osb.call(
        "GET", "/v2/catalog", headers={"X-Broker-API-Originating-Identity": "kubernetes !!"}
    )
    assert status == 200


def _bodies() -> list[tuple[str, Any, str]]:
    good = provision_body(parameters("http://127.0.0.1:9"))

    def without(*path: str) -> dict[str, Any]:
        body = json.loads(json.dumps(good))
        node = body
        for p in path[:-1]:
            node = node[p]
        del node[path[-1]]
        return body

    def with_(value: Any, *path: str) -> dict[str, Any]:
        body = json.loads(json.dumps(good))
        node = body
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        return body

    p, a, d = "parameters", "agent", "database"
    return [
        ("missing service_id", without("service_id"), "service_id"),
        ("service_id a number", with_(7, "service_id"), "service_id"),
        ("unknown plan", with_("gold", "plan_id"), "plan_id"),
        ("unknown service", with_("nope", "service_id"), "service_id"),
        ("parameters not an object", with_([], p), p),
        ("context not an object", with_("cf", "context"), "context"),
        ("no agent password", without(p, a, "password"), "parameters.agent.password"),
        ("no items", without(p, "items"), "parameters.items"),
        ("empty items", with_([], p, "items"), "parameters.items"),
        ("item twice", with_(["a", "a"], p, "items"), "parameters.items"),
        ("item not a string", with_(["a", 1], p, "items"), "parameters.items[1]"),
        ("port a string", with_("5432", p, d, "port"), "parameters.database.port"),
        ("port too big", with_(70000, p, d, "port"), "parameters.database.port"),
        ("url with user info", with_("http://u:p@h:8000", p, a, "url"), "parameters.agent.url"),
        ("url not http", with_("ftp://h", p, a, "url"), "parameters.agent.url"),
        ("unknown parameter", with_(1, p, "cron"), "parameters.cron"),
        ("bad env name", with_({"1X": "v"}, p, d, p), "parameters.database.parameters.1X"),
        (
            "delete flag a string",
            with_("yes", p, "delete_backups_on_deprovision"),
            "parameters.delete_backups_on_deprovision",
        ),
        (
            # An empty one is none (see test_osb_checker_shapes.py); this one is not empty.
            "maintenance_info without version",
            with_({"description": "no version"}, "maintenance_info"),
            "maintenance_info.version",
        ),
    ]


@pytest.mark.parametrize(("case", "body", "field"), _bodies(), ids=[c for c, _, _ in _bodies()])
async def test_wrong_input_is_a_clear_400_and_nothing_is_stored(
    osb: Osb, broker: Service, case: str, body: Any, field: str
) -> None:
    iid = str(uuid.uuid4())
    status, data = await osb.provision(iid, body)
    assert status == 400, (case, data)
    assert data["field"] == field, data
    assert data["error"] in ("BadRequest", "InvalidParameters")
    assert field.split("[")[0] in data["description"]
    assert AGENT_PASSWORD not in json.dumps(data) and DB_PASSWORD not in json.dumps(data)
    assert "u:p" not in json.dumps(data)
    assert await broker.db.instances.count_documents({}) == 0


@pytest.mark.parametrize(
    "raw",
    [b"{", b"not json", b"[1, 2]", b'"text"', b"", b"\xff\xfe", b'{"service_id": ' * 100],
    ids=["truncated", "text", "array", "string", "empty", "binary", "deep"],
)
async def test_malformed_bodies(osb: Osb, broker: Service, raw: bytes) -> None:
    iid = str(uuid.uuid4())
    for method, path in [
        ("PUT", f"/v2/service_instances/{iid}?accepts_incomplete=true"),
        ("PATCH", f"/v2/service_instances/{iid}?accepts_incomplete=true"),
        ("PUT", f"/v2/service_instances/{iid}/service_bindings/b1"),
    ]:
        status, data, _ = await osb.call(
            method, path, data=raw, headers={"Content-Type": "application/json"}
        )
        assert status == 400, (method, raw, data)
        assert data["error"] in ("MalformedRequest", "BadRequest")
        assert data["description"]
    assert await broker.db.instances.count_documents({}) == 0
    assert await broker.db.bindings.count_documents({}) == 0


async def test_query_flags_and_required_query_parameters(osb: Osb) -> None:
    iid = str(uuid.uuid4())
    status, data, _ = await osb.call(
        "PUT",
        f"/v2/service_instances/{iid}?accepts_incomplete=maybe",
        json=provision_body(parameters("http://127.0.0.1:9")),
    )
    assert status == 400 and data["field"] == "accepts_incomplete"
    status, data, _ = await osb.call("DELETE", f"/v2/service_instances/{iid}?plan_id={STANDARD}")
    assert status == 400 and data["field"] == "service_id"
    status, data, _ = await osb.call(
        "DELETE", f"/v2/service_instances/{iid}/service_bindings/b?service_id={SERVICE_ID}"
    )
    assert status == 400 and data["field"] == "plan_id"


async def test_ids_too_long(osb: Osb) -> None:
    status, data, _ = await osb.call("GET", f"/v2/service_instances/{'x' * 300}")
    assert status == 400 and data["field"] == "instance_id"


async def test_unknown_fields_are_ignored(osb: Osb, agent_url: str) -> None:
    """Vendor extension fields: the spec says receivers ignore them."""
    iid = str(uuid.uuid4())
    body = provision_body(parameters(agent_url), x_vendor_field={"a": 1})
    status, data = await osb.provision(iid, body)
    assert status == 202
    assert (await osb.wait(iid, data["operation"]))["state"] == "succeeded"
