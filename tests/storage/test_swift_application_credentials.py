"""Keystone application credentials as a Swift destination's authentication, and the choice of
the catalog's endpoint (region, interface), against the real Keystone and Swift."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from storage import AuthenticationFailed, SwiftSettings, TransferSettings, open_store
from tests.servers.keystone import REGION, SECOND_REGION, ApplicationCredential
from tests.servers.listener import Listener
from tests.servers.swift import KeystoneSwiftCluster
from tests.storage.support import MiB, digest, download_digest, stream

PARTS = TransferSettings(part_size=5 * MiB, max_concurrency=3)
FAST = PARTS.model_copy(update={"max_attempts": 2, "backoff_initial": 0.05})


def credential_settings(
    cluster: KeystoneSwiftCluster,
    credential: ApplicationCredential,
    *,
    by_name: bool = False,
    **over: Any,
) -> SwiftSettings:
    """Settings that authenticate with ``credential``: by its id, or by its name and its
    owner's name and domain."""
    fields: dict[str, Any] = {
        "auth_url": cluster.keystone.url,
        "auth_version": "3",
        "application_credential_secret": credential.secret,
        "project_name": None,  # the credential is bound to its project
        "region_name": REGION,
        "container": over.pop("container", None) or cluster.make_container(),
    }
    if by_name:
        fields["application_credential_name"] = credential.name
        fields["username"] = credential.user.name
        fields["user_domain_name"] = credential.user.domain_name
    else:
        fields["application_credential_id"] = credential.id
    return SwiftSettings(**{**fields, **over})


@pytest.mark.parametrize("by_name", [False, True], ids=["id", "name-and-user"])
async def test_an_application_credential_round_trip(
    keystone_swift: KeystoneSwiftCluster,
    application_credential: ApplicationCredential,
    by_name: bool,
) -> None:
    settings = credential_settings(keystone_swift, application_credential, by_name=by_name)
    secret = application_credential.secret
    assert secret not in repr(settings) and secret not in str(settings.model_dump())
    size = 2 * PARTS.part_size + 3
    async with open_store(settings, PARTS) as store:
        assert secret not in repr(store)
        stored = await store.upload("app/large", stream(size))
        assert await download_digest(store, "app/large", expected_sha256=stored.sha256) == (
            size,
            digest(size),
        )
        assert [o.key async for o in store.list("app/")] == ["app/large"]
        report = await store.validate()
        assert report.ok, report
        await store.delete("app/large")
    assert keystone_swift.names(settings.container + "_segments") == []


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"application_credential_secret": "s3cret-value"}, "id or name"),
        (
            {"application_credential_name": "n", "application_credential_secret": "s3cret-value"},
            "username",
        ),
        (
            {
                "username": "u",
                "password": "pw-value-1",
                "application_credential_id": "i",
                "application_credential_secret": "s3cret-value",
            },
            "either",
        ),
        ({"application_credential_id": "i"}, "secret"),
        (
            {
                "application_credential_id": "i",
                "application_credential_secret": "s3cret-value",
                "project_name": "p",
            },
            "project",
        ),
        ({"username": "u"}, "password"),
        ({}, "password"),
    ],
)
def test_settings_name_one_complete_authentication(fields: dict[str, Any], problem: str) -> None:
    base = {"auth_url": "http://keystone.example/v3", "auth_version": "3", "container": "c"}
    with pytest.raises(ValidationError) as refused:
        SwiftSettings(**base, **fields)
    assert problem in str(refused.value)
    assert "s3cret-value" not in str(refused.value) and "pw-value-1" not in str(refused.value)


def test_auth_v1_takes_no_application_credential() -> None:
    with pytest.raises(ValidationError):
        SwiftSettings(
            auth_url="http://swift.example/auth/v1.0",
            auth_version="1",
            username="u",
            password="k",
            application_credential_id="i",
            application_credential_secret="s3cret-value",
            container="c",
        )


@pytest.mark.parametrize(
    ("interface", "region"),
    [("public", REGION), ("internal", REGION), ("public", SECOND_REGION)],
)
async def test_the_catalog_endpoint_follows_region_and_interface(
    keystone_swift: KeystoneSwiftCluster, interface: str, region: str
) -> None:
    settings = keystone_swift.settings(interface=interface, region_name=region)
    async with open_store(settings, FAST) as store:
        report = await store.validate()
    assert report.ok, report
    endpoint = keystone_swift.endpoint(interface, region)
    assert endpoint in (report.steps[0].message or ""), report.steps[0]
    others = {keystone_swift.endpoint(i, r) for i, r in [("public", REGION), ("internal", REGION)]}
    others |= {keystone_swift.endpoint("public", SECOND_REGION)}
    for other in others - {endpoint}:
        assert other not in (report.steps[0].message or "")


async def test_an_interface_the_region_lacks_is_a_classified_error(
    keystone_swift: KeystoneSwiftCluster,
) -> None:
    settings = keystone_swift.settings(interface="internal", region_name=SECOND_REGION)
    async with open_store(settings, FAST) as store:
        report = await store.validate()
    failure = report.failure
    assert failure is not None and failure.error_code == "storage_error"
    assert "internal object-store endpoint in region 'RegionTwo'" in (failure.message or "")


async def test_a_revoked_credential_fails_before_writing_anything(
    keystone_swift: KeystoneSwiftCluster, application_credential: ApplicationCredential
) -> None:
    settings = credential_settings(keystone_swift, application_credential)
    keystone_swift.keystone.revoke(application_credential)
    async with open_store(settings, PARTS) as store:
        with pytest.raises(AuthenticationFailed) as refused:
            await store.upload("never", stream(2 * PARTS.part_size))
    message = str(refused.value)
    assert "application credential" in message
    assert application_credential.secret not in message
    assert keystone_swift.names(settings.container) == []
    assert keystone_swift.names(settings.container + "_segments") == []


async def test_a_credential_revoked_mid_upload_fails_the_upload_clearly(
    keystone_swift: KeystoneSwiftCluster, application_credential: ApplicationCredential
) -> None:
    """Revoked while segments are being written: the upload fails with the reason, at once
    (not after retries). Its segments cannot be deleted with a revoked credential; the next
    delete of that key by a working credential removes them."""
    settings = credential_settings(keystone_swift, application_credential)
    revoked = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        sent = 0
        async for chunk in stream(4 * PARTS.part_size, irregular=False):
            yield chunk
            sent += len(chunk)
            if sent >= 2 * PARTS.part_size and not revoked.is_set():
                await asyncio.to_thread(keystone_swift.keystone.revoke, application_credential)
                revoked.set()

    async with open_store(settings, PARTS) as store:
        with pytest.raises(AuthenticationFailed) as refused:
            await store.upload("cut", source())
    assert "application credential" in str(refused.value)
    assert keystone_swift.names(settings.container) == []
    async with open_store(keystone_swift.settings(settings.container), PARTS) as owner:
        await owner.delete("cut")
    assert keystone_swift.names(settings.container + "_segments") == []


async def test_a_catalog_url_is_named_only_as_a_plain_url(allowed: Listener) -> None:
    """The catalog is the identity service's text, and the tenant chose that service: the
    answer names an endpoint only as scheme, host, port and a plain path."""
    canary = "CANARY<script>Call+us-now"
    token = {
        "token": {
            "methods": ["password"],
            "expires_at": "2999-01-01T00:00:00.000000Z",
            "project": {"id": "p", "name": "p", "domain": {"id": "default", "name": "Default"}},
            "user": {"id": "u", "name": "user", "domain": {"id": "default", "name": "Default"}},
            "catalog": [
                {
                    "type": "object-store",
                    "name": "swift",
                    "endpoints": [
                        {
                            "interface": "public",
                            "region": "r",
                            "url": f"{allowed.url}/v1/AUTH_p/{canary}",
                        }
                    ],
                }
            ],
        }
    }
    allowed.answer(
        "201 Created",
        {"X-Subject-Token": "tk", "Content-Type": "application/json"},
        json.dumps(token).encode(),
    )
    settings = SwiftSettings(
        auth_url=allowed.url + "/v3",
        auth_version="3",
        username="user",
        password=SecretStr("pw-value-1"),
        project_name="p",
        container="c",
    )
    async with open_store(settings, FAST) as store:
        report = await store.validate()
    for step in report.steps:
        assert "CANARY" not in (step.message or "") and "script" not in (step.message or "")
