"""A caller who may change a destination may not thereby move its stored secret.

The attack: with manage rights but without the secret, change only where the secret is sent
(`auth_url`, `endpoint`, ...) to a host the attacker controls, then ask for a validation or wait
for a backup; the stored password (Swift v1's ``X-Auth-Key``, Keystone's password body) would
go to that host. Every such change needs the secret in the same request.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.conftest import S3_BODY, SWIFT_BODY, Api
from tests.servers.recorder import Recorder

SWIFT_PASSWORD = SWIFT_BODY["password"]
S3_SECRET = S3_BODY["secret_access_key"]


async def _swift(api: Api, instance: str, **over: Any) -> dict[str, Any]:
    status, body = await api.call(
        "POST", "/destinations", instance=instance, json={**SWIFT_BODY, **over}
    )
    assert status == 201, body
    return body


async def _stored(api: Api, dest_id: str) -> dict[str, Any]:
    doc = await api.db.destinations.find_one({"_id": dest_id})
    assert doc is not None
    return doc


@pytest.mark.parametrize("validate", [False, True])
async def test_moving_the_auth_url_without_the_password_is_refused(
    api: Api, instance: str, recorder: Recorder, validate: bool
) -> None:
    dest = await _swift(api, instance)
    before = await _stored(api, dest["id"])
    query = "?validate=true" if validate else ""
    status, body = await api.call(
        "PATCH",
        f"/destinations/{dest['id']}{query}",
        instance=instance,
        json={"auth_url": f"{recorder.url}/auth/v1.0"},
    )
    assert status == 400, body
    assert body["error"] == "secret_required" and body["field"] == "password", body
    assert "auth_url" in body["description"]
    assert recorder.requests == []
    assert await _stored(api, dest["id"]) == before
    # a later check of the stored destination still goes where it went before
    status, body = await api.call("POST", f"/destinations/{dest['id']}/validate", instance=instance)
    assert status == 200, body
    assert recorder.requests == []


@pytest.mark.parametrize(
    "change",
    [
        {"auth_version": "3", "auth_url": "http://127.0.0.1:9/v3"},
        {"username": "other:user"},
        {"user_domain_name": "Other"},
        {"project_name": "other-project"},
        {"project_domain_name": "Other"},
        {"region_name": "Elsewhere"},
        {"verify_tls": False},
    ],
)
async def test_every_swift_field_that_routes_the_password_needs_it(
    api: Api, instance: str, change: dict[str, Any]
) -> None:
    dest = await _swift(api, instance)
    path = f"/destinations/{dest['id']}"
    status, body = await api.call("PATCH", path, instance=instance, json=change)
    assert status == 400 and body["error"] == "secret_required", (change, body)
    # the same change with the secret goes through
    status, body = await api.call(
        "PATCH", path, instance=instance, json={**change, "password": SWIFT_PASSWORD}
    )
    assert status == 200, (change, body)


async def test_moving_an_s3_endpoint_needs_the_secret_key(
    api: Api, instance: str, destination: dict, recorder: Recorder
) -> None:
    path = f"/destinations/{destination['id']}"
    before = await _stored(api, destination["id"])
    for change in (
        {"endpoint": recorder.host_port},
        {"endpoint": None},  # back to AWS, with the key kept
        {"verify_tls": False},
    ):
        status, body = await api.call(
            "PATCH", path + "?validate=true", instance=instance, json=change
        )
        assert status == 400, (change, body)
        assert body["error"] == "secret_required" and body["field"] == "secret_access_key"
    assert recorder.requests == []
    assert await _stored(api, destination["id"]) == before
    # what does not move the secret still needs no secret
    status, body = await api.call("PATCH", path, instance=instance, json={"bucket": "other"})
    assert status == 200, body
    status, body = await api.call("PATCH", path, instance=instance, json={"plain_http": False})
    assert status == 200 and body["endpoint"] == "https://127.0.0.1:9", body
    # and a downgrade back to plain HTTP does
    status, body = await api.call("PATCH", path, instance=instance, json={"plain_http": True})
    assert status == 400 and body["error"] == "secret_required", body
    status, body = await api.call(
        "PATCH",
        path,
        instance=instance,
        json={"endpoint": recorder.url, "secret_access_key": "a-new-key-of-mine"},
    )
    assert status == 200 and body["endpoint"] == f"http://{recorder.host_port}", body


async def test_validating_an_edited_body_needs_the_secret_too(
    api: Api, instance: str, recorder: Recorder
) -> None:
    """``POST .../{id}/validate`` with a merge patch checks the change without saving it."""
    dest = await _swift(api, instance)
    before = await _stored(api, dest["id"])
    path = f"/destinations/{dest['id']}/validate"
    moved = {"auth_url": f"{recorder.url}/auth/v1.0"}
    status, body = await api.call("POST", path, instance=instance, json=moved)
    assert status == 400 and body["error"] == "secret_required", body
    assert recorder.requests == []
    # with the secret, the edited body is checked (against the recorder) and nothing is saved
    recorder.answer(401)
    status, body = await api.call(
        "POST", path, instance=instance, json={**moved, "password": "my-own-password"}
    )
    assert status == 200 and body["ok"] is False, body
    assert body["error"] == "storage_auth_failed", body
    assert "my-own-password" in recorder.received()
    assert SWIFT_PASSWORD not in recorder.received()
    assert await _stored(api, dest["id"]) == before
    # a change that keeps the route is checked with the stored secret
    status, body = await api.call("POST", path, instance=instance, json={"container": "elsewhere"})
    assert status == 200 and body["ok"] is False, body
    assert await _stored(api, dest["id"]) == before
