"""Swift destinations through the API against the real Keystone (``keystone_swift``): an
application credential is sealed like a password and never returned, the validation answer
names the catalog endpoint it used, and a change that would send the stored secret elsewhere
needs the secret again."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.api.conftest import Api, add_instance
from tests.servers.keystone import SECOND_REGION, ApplicationCredential
from tests.servers.swift import KeystoneSwiftCluster


@pytest.fixture
async def inst(api: Api) -> AsyncIterator[str]:
    yield await add_instance(api.db)


def credential_body(
    cluster: KeystoneSwiftCluster, credential: ApplicationCredential, **over: Any
) -> dict[str, Any]:
    return {
        "type": "SWIFT",
        "name": "swift-app-credential",
        "auth_url": cluster.keystone.url,
        "auth_version": "3",
        "application_credential_id": credential.id,
        "application_credential_secret": credential.secret,
        "region_name": "RegionOne",
        "container": cluster.make_container(),
        **over,
    }


async def test_an_application_credential_is_sealed_and_never_returned(
    api: Api,
    inst: str,
    keystone_swift: KeystoneSwiftCluster,
    application_credential: ApplicationCredential,
) -> None:
    secret = application_credential.secret
    body = credential_body(keystone_swift, application_credential)
    status, checked = await api.call("POST", "/destinations/validate", instance=inst, json=body)
    assert status == 200 and checked["ok"] is True, checked
    assert keystone_swift.endpoint("public") in checked["steps"][0]["message"]
    status, dest = await api.call("POST", "/destinations", instance=inst, json=body)
    assert status == 201, dest
    assert dest["application_credential_secret_set"] is True and dest["password_set"] is False
    assert dest["application_credential_id"] == application_credential.id
    stored = await api.db.destinations.find_one({"_id": dest["id"]})
    assert stored is not None and secret not in str(stored)
    for answer in (dest, (await api.call("GET", f"/destinations/{dest['id']}", instance=inst))[1]):
        assert secret not in str(answer)
    status, again = await api.call("POST", f"/destinations/{dest['id']}/validate", instance=inst)
    assert status == 200 and again["ok"] is True, again
    # The internal endpoint, through the stored secret: same project, same route.
    status, moved = await api.call(
        "PATCH", f"/destinations/{dest['id']}", instance=inst, json={"interface": "internal"}
    )
    assert status == 400 and moved["error"] == "secret_required", moved
    status, moved = await api.call(
        "PATCH",
        f"/destinations/{dest['id']}",
        instance=inst,
        json={"interface": "internal", "application_credential_secret": secret},
    )
    assert status == 200 and moved["interface"] == "internal", moved
    status, checked = await api.call("POST", f"/destinations/{dest['id']}/validate", instance=inst)
    assert status == 200 and keystone_swift.endpoint("internal") in str(checked["steps"]), checked


async def test_a_revoked_credential_and_a_missing_endpoint_say_so(
    api: Api,
    inst: str,
    keystone_swift: KeystoneSwiftCluster,
    application_credential: ApplicationCredential,
) -> None:
    body = credential_body(keystone_swift, application_credential)
    status, answer = await api.call(
        "POST",
        "/destinations/validate",
        instance=inst,
        json={**body, "region_name": SECOND_REGION, "interface": "internal"},
    )
    assert status == 200 and answer["ok"] is False and answer["error"] == "storage_error"
    assert "internal object-store endpoint in region 'RegionTwo'" in answer["description"]
    keystone_swift.keystone.revoke(application_credential)
    status, answer = await api.call("POST", "/destinations/validate", instance=inst, json=body)
    assert status == 200 and answer["error"] == "storage_auth_failed", answer
    assert "deleted (revoked)" in answer["description"]
    assert application_credential.secret not in str(answer)
