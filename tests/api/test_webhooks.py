"""Webhooks through the API: create, read, change, delete, the delivery log; the secret is
write-only and sealed; the URL is validated and checked against the egress policy before
anything is stored; changes are in the audit trail. Delivery itself is tested in
tests/broker/test_webhook_delivery.py."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.conftest import Api, ApiFactory, add_instance
from tests.servers.listener import Listener
from tests.servers.log_audit import audit_secret

SECRET = "whsec-test-Secret-0123456789"
NEW_SECRET = "another-Secret-9876543210"
audit_secret(SECRET, "tests.api.test_webhooks.SECRET")
audit_secret(NEW_SECRET, "tests.api.test_webhooks.NEW_SECRET")


def hook(url: str = "http://127.0.0.1:9/hooks", **over: Any) -> dict[str, Any]:
    return {"url": url, "events": ["job.failed", "restore_point.deleted"], "secret": SECRET, **over}


@pytest.fixture
async def hapi(make_api: ApiFactory) -> Api:
    return await make_api(WEBHOOK_ALLOW_HTTP="true", WEBHOOK_MAX_PER_INSTANCE="3")


async def test_a_webhook_is_created_read_changed_and_deleted_and_its_secret_never_shown(
    hapi: Api,
) -> None:
    inst = await add_instance(hapi.db)
    status, created = await hapi.call("POST", "/webhooks", instance=inst, json=hook())
    assert status == 201, created
    assert created["secret_set"] is True
    assert created["enabled"] is True
    assert created["events"] == ["job.failed", "restore_point.deleted"]
    assert SECRET not in str(created) and "secret" not in created
    stored = await hapi.db.webhooks.find_one({"_id": created["id"]})
    assert SECRET not in str(stored), "the secret is sealed at rest"
    assert isinstance(stored["secret"], dict) and stored["secret"]["ct"]

    status, listed = await hapi.call("GET", "/webhooks", instance=inst)
    assert status == 200 and listed["total"] == 1, listed
    assert [h["id"] for h in listed["items"]] == [created["id"]]
    assert SECRET not in str(listed)

    path = f"/webhooks/{created['id']}"
    status, changed = await hapi.call(
        "PATCH", path, instance=inst, json={"enabled": False, "events": ["drill.failed"]}
    )
    assert status == 200, changed
    assert changed["enabled"] is False and changed["events"] == ["drill.failed"]
    assert changed["url"] == created["url"] and changed["secret_set"] is True
    kept = await hapi.db.webhooks.find_one({"_id": created["id"]})
    assert kept["secret"] == stored["secret"], "the secret is kept unless sent"

    status, changed = await hapi.call("PATCH", path, instance=inst, json={"secret": NEW_SECRET})
    assert status == 200, changed
    assert NEW_SECRET not in str(changed)
    resealed = await hapi.db.webhooks.find_one({"_id": created["id"]})
    assert resealed["secret"] != stored["secret"]

    status, read = await hapi.call("GET", path, instance=inst)
    assert status == 200 and read["id"] == created["id"], read

    status, log = await hapi.call("GET", f"{path}/deliveries", instance=inst)
    assert status == 200 and log == {
        "items": [],
        "total": 0,
        "next_cursor": None,
        "page": None,
        "as_of": None,
    }

    status, _ = await hapi.call("DELETE", path, instance=inst)
    assert status == 204
    status, gone = await hapi.call("GET", path, instance=inst)
    assert status == 404 and gone["error"] == "webhook_not_found", gone
    status, gone = await hapi.call("GET", f"{path}/deliveries", instance=inst)
    assert status == 404, gone


async def test_another_instances_webhook_is_not_found(hapi: Api) -> None:
    mine, theirs = await add_instance(hapi.db), await add_instance(hapi.db)
    status, created = await hapi.call("POST", "/webhooks", instance=theirs, json=hook())
    assert status == 201
    for method, body in (("GET", None), ("PATCH", {"enabled": False}), ("DELETE", None)):
        status, answer = await hapi.call(
            method, f"/webhooks/{created['id']}", instance=mine, json=body
        )
        assert status == 404, (method, answer)
    assert await hapi.db.webhooks.count_documents({"_id": created["id"], "enabled": True}) == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (hook(url="ftp://example.com/x"), "url"),
        (hook(url="http://user:pw@127.0.0.1:9/x"), "url"),
        (hook(url="http://127.0.0.1:9/x#frag"), "url"),
        (hook(url="http://:9/x"), "url"),
        (hook(url="http://127.0.0.1:99999/x"), "url"),
        (hook(events=[]), "events"),
        (hook(events=["job.exploded"]), "events"),
        (hook(events=["job.failed", "job.failed"]), "events"),
        (hook(events="job.failed"), "events"),
        (hook(secret="short"), "secret"),
        (hook(secret="x" * 257), "secret"),
        (hook(enabled="yes"), "enabled"),
        (hook(colour="blue"), "colour"),
        ({"events": ["job.failed"], "secret": SECRET}, "url"),
        ({"url": "http://127.0.0.1:9/x", "events": ["job.failed"]}, "secret"),
    ],
)
async def test_invalid_webhooks_are_refused_and_nothing_is_stored(
    hapi: Api, body: dict[str, Any], field: str
) -> None:
    inst = await add_instance(hapi.db)
    status, answer = await hapi.call("POST", "/webhooks", instance=inst, json=body)
    assert status == 400, answer
    assert answer["error"] in ("invalid_input", "invalid_url"), answer
    assert field in (answer.get("field") or "") or field in str(answer.get("problems")), answer
    assert SECRET not in str(answer)
    assert await hapi.db.webhooks.count_documents({"instance_id": inst}) == 0


async def test_invalid_changes_are_refused_and_change_nothing(hapi: Api) -> None:
    inst = await add_instance(hapi.db)
    status, created = await hapi.call("POST", "/webhooks", instance=inst, json=hook())
    assert status == 201
    before = await hapi.db.webhooks.find_one({"_id": created["id"]})
    path = f"/webhooks/{created['id']}"
    for patch in (
        {"secret": None},
        {"url": None},
        {"events": ["nope"]},
        {"url": "gopher://127.0.0.1/"},
        {"colour": "red"},
        {"secret": "short"},
    ):
        status, answer = await hapi.call("PATCH", path, instance=inst, json=patch)
        assert status == 400, (patch, answer)
        assert SECRET not in str(answer)
    assert await hapi.db.webhooks.find_one({"_id": created["id"]}) == before


async def test_https_only_unless_the_operator_allows_http(make_api: ApiFactory) -> None:
    api = await make_api()
    inst = await add_instance(api.db)
    status, answer = await api.call("POST", "/webhooks", instance=inst, json=hook())
    assert status == 400, answer
    assert answer["error"] == "invalid_url" and "https://" in answer["description"], answer


async def test_a_webhook_to_a_denied_network_is_refused_before_any_connection(
    hapi: Api, denied: Listener
) -> None:
    inst = await add_instance(hapi.db)
    for url in (f"{denied.url}/hooks", "http://169.254.169.254/latest", "http://[::1]:80/"):
        status, answer = await hapi.call("POST", "/webhooks", instance=inst, json=hook(url=url))
        assert status == 400, (url, answer)
        assert answer["error"] == "egress_denied" and answer["field"] == "url", answer
        assert "EGRESS_DENY_NETWORKS" in answer["description"], answer
    status, created = await hapi.call("POST", "/webhooks", instance=inst, json=hook())
    assert status == 201
    status, answer = await hapi.call(
        "PATCH", f"/webhooks/{created['id']}", instance=inst, json={"url": f"{denied.url}/x"}
    )
    assert status == 400 and answer["error"] == "egress_denied", answer
    assert denied.connections == 0
    assert await hapi.db.webhooks.count_documents({"instance_id": inst}) == 1


async def test_an_instance_has_at_most_the_configured_number_of_webhooks(hapi: Api) -> None:
    inst = await add_instance(hapi.db)
    for _ in range(3):
        status, _answer = await hapi.call("POST", "/webhooks", instance=inst, json=hook())
        assert status == 201
    status, answer = await hapi.call("POST", "/webhooks", instance=inst, json=hook())
    assert status == 409 and answer["error"] == "too_many_webhooks", answer


async def test_webhook_changes_are_in_the_audit_trail_without_the_secret(hapi: Api) -> None:
    inst = await add_instance(hapi.db)
    status, created = await hapi.call("POST", "/webhooks", instance=inst, json=hook())
    assert status == 201
    path = f"/webhooks/{created['id']}"
    await hapi.call("PATCH", path, instance=inst, json={"secret": NEW_SECRET})
    await hapi.call("DELETE", path, instance=inst)
    status, page = await hapi.call("GET", "/audit", instance=inst)
    assert status == 200, page
    entries = list(reversed(page["items"]))
    assert [e["action"] for e in entries] == ["create_webhook", "update_webhook", "delete_webhook"]
    assert all(e["resource"] == {"kind": "webhooks", "id": created["id"]} for e in entries)
    assert entries[0]["fields"] == ["events", "secret", "url"]
    assert entries[1]["fields"] == ["secret"]
    assert SECRET not in str(page) and NEW_SECRET not in str(page)
