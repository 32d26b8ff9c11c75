"""The egress policy at the storage level: a destination pointing at a denied address is refused
before any connection, and no client follows a redirect (which would carry the signature, key,
token or password to wherever it points).

Listeners on loopback stand in for the attacker's hosts; the policy in force is the default
list except 127.0.0.1, so that 127.0.0.2 (and ``localhost``'s ::1) stay denied while
127.0.0.1 plays an allowed host."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from storage import S3Settings, SwiftSettings, TransferSettings, egress, open_store
from storage.base import ValidationStep
from tests.servers.listener import Listener, start_listener

SECRET = "egress-test-secret-7Hq2"
FAST = TransferSettings(connect_timeout=2, read_timeout=5, max_attempts=1, backoff_initial=0.01)


@pytest.fixture(autouse=True)
def policy() -> Iterator[egress.EgressPolicy]:
    """The test policy: the default deny list except 127.0.0.1."""
    policy = egress.EgressPolicy.from_settings(
        ",".join(egress.networks_except(egress.DEFAULT_DENY, "127.0.0.1")), ""
    )
    previous = egress.install(policy)
    yield policy
    egress.install(previous)


def s3(endpoint: str) -> S3Settings:
    return S3Settings(
        endpoint=endpoint,
        bucket="bucket",
        access_key_id="AKIDEGRESS",
        secret_access_key=SecretStr(SECRET),
        addressing_style="path",
    )


def swift(auth_url: str, version: str) -> SwiftSettings:
    return SwiftSettings(
        auth_url=auth_url,
        auth_version=version,  # type: ignore[arg-type]
        username="tenant:user",
        password=SecretStr(SECRET),
        project_name="p",
        container="c",
    )


async def failed_step(settings: S3Settings | SwiftSettings) -> ValidationStep:
    async with open_store(settings, FAST) as store:
        report = await store.validate()
    assert not report.ok and report.failure is not None
    return report.failure


TARGETS = {
    "s3": lambda url: s3(url),
    "swift-v1": lambda url: swift(url + "/auth/v1.0", "1"),
    "swift-keystone": lambda url: swift(url + "/v3", "3"),
}


@pytest.mark.parametrize("kind", list(TARGETS))
async def test_a_denied_address_is_refused_without_a_connection(
    kind: str, denied: Listener
) -> None:
    step = await failed_step(TARGETS[kind](denied.url))
    assert step.error_code == "egress_denied"
    assert "127.0.0.2" in (step.message or "") and "EGRESS_DENY_NETWORKS" in (step.message or "")
    assert denied.connections == 0


@pytest.mark.parametrize("kind", list(TARGETS))
async def test_a_name_resolving_to_denied_addresses_is_refused(kind: str) -> None:
    egress.install(egress.EgressPolicy())  # loopback denied altogether: localhost is too
    listener = await start_listener("127.0.0.1")
    try:
        step = await failed_step(TARGETS[kind](f"http://localhost:{listener.port}"))
    finally:
        await listener.close()
    assert step.error_code == "egress_denied"
    assert "localhost" in (step.message or "")
    assert "127.0.0.1" not in (step.message or "")  # what it resolved to is not told
    assert listener.connections == 0


@pytest.mark.parametrize("kind", list(TARGETS))
async def test_the_metadata_address_is_refused(kind: str) -> None:
    step = await failed_step(TARGETS[kind]("http://169.254.169.254"))
    assert step.error_code == "egress_denied"
    step = await failed_step(TARGETS[kind]("http://[::ffff:169.254.169.254]"))
    assert step.error_code == "egress_denied"


@pytest.mark.parametrize("kind", list(TARGETS))
@pytest.mark.parametrize("status", ["301 Moved Permanently", "302 Found", "307 Temporary Redirect"])
async def test_a_redirect_is_not_followed(
    kind: str, status: str, allowed: Listener, second: Listener
) -> None:
    allowed.answer(status, {"Location": second.url + "/elsewhere", "x-amz-bucket-region": "eu"})
    step = await failed_step(TARGETS[kind](allowed.url))
    assert second.connections == 0, second.text()
    assert step.error_code not in (None, "egress_denied")
    assert "/elsewhere" not in (step.message or "")
    # Each request went out once: not again to a region the answer named either.
    assert len(allowed.received) == allowed.connections


async def test_a_storage_url_handed_out_by_auth_v1_is_checked(
    allowed: Listener, denied: Listener
) -> None:
    """The auth service is the tenant's too: the storage URL it answers is checked like the
    auth URL, before the token is sent there."""
    allowed.answer("200 OK", {"X-Storage-Url": denied.url + "/v1/AUTH_t", "X-Auth-Token": "tk"})
    step = await failed_step(swift(allowed.url + "/auth/v1.0", "1"))
    assert step.error_code == "egress_denied"
    assert denied.connections == 0


async def test_an_object_store_endpoint_in_the_keystone_catalog_is_checked(
    allowed: Listener, denied: Listener
) -> None:
    token: dict[str, Any] = {
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
                        {"interface": "public", "region": "r", "url": denied.url + "/v1/AUTH_p"}
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
    step = await failed_step(swift(allowed.url + "/v3", "3"))
    assert step.error_code == "egress_denied"
    assert denied.connections == 0
