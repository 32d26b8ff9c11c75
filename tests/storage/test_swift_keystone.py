"""Swift behind a real Keystone v3 (``tests/servers/keystone.py``): Keystone's own token API,
catalog, scoping and application credentials, Swift's ``authtoken`` and ``keystoneauth``.
The Keystone stand-in of ``tests/servers/swift_runner.py`` stays for the fast API tests only."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from keystoneauth1 import exceptions as ka
from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3
from pydantic import SecretStr
from swiftclient.client import Connection
from swiftclient.exceptions import ClientException

from storage import (
    AuthenticationFailed,
    EndpointUnreachable,
    PermissionDenied,
    StorageError,
    SwiftSettings,
    TransferSettings,
    open_store,
)
from tests.servers.keystone import (
    REGION,
    SECOND_REGION,
    SHORT_TOKEN_SECONDS,
    ApplicationCredential,
    Identities,
    KeystoneServer,
)
from tests.servers.ports import free_port
from tests.servers.swift import KeystoneSwiftCluster
from tests.storage.support import MiB, digest, download_digest, stream

PARTS = TransferSettings(part_size=5 * MiB, max_concurrency=3)
FAST = PARTS.model_copy(update={"max_attempts": 2, "backoff_initial": 0.05})


def app_credential_session(keystone_url: str, credential: ApplicationCredential, **how: Any) -> Any:
    """A keystoneauth1 session authenticated by ``credential``: by id (default) or, with
    ``by_name=True``, by its name and its owner's name and domain."""
    if how.get("by_name"):
        auth = v3.ApplicationCredential(
            auth_url=keystone_url,
            application_credential_name=credential.name,
            application_credential_secret=credential.secret,
            username=credential.user.name,
            user_domain_name=credential.user.domain_name,
        )
    else:
        auth = v3.ApplicationCredential(
            auth_url=keystone_url,
            application_credential_id=credential.id,
            application_credential_secret=credential.secret,
        )
    return ks_session.Session(auth=auth, timeout=30)


def swift_connection(session: Any, **os_options: str) -> Connection:
    options = {"service_type": "object-store", "region_name": REGION, **os_options}
    return Connection(session=session, os_options=options, retries=0, timeout=30)


# --- the test cloud itself ------------------------------------------------------------------


def test_the_catalog_lists_object_store_endpoints_by_region_and_interface(
    keystone_swift: KeystoneSwiftCluster,
) -> None:
    ids = keystone_swift.identities
    access = keystone_swift.keystone.session(ids.member, ids.project)
    catalog = access.auth.get_access(access).service_catalog
    found = {
        (e["region_id"], e["interface"]): e["url"]
        for e in catalog.get_endpoints(service_type="object-store")["object-store"]
    }
    assert found == {
        (REGION, "public"): keystone_swift.endpoint("public"),
        (REGION, "internal"): keystone_swift.endpoint("internal"),
        (SECOND_REGION, "public"): keystone_swift.endpoint("public", SECOND_REGION),
    }
    assert len(set(found.values())) == 3  # three ports: a client's choice shows
    # Keystone's endpoint filter: this project's catalog has no object store.
    bare = keystone_swift.keystone.session(ids.member, ids.no_swift_project)
    assert not bare.auth.get_access(bare).service_catalog.get_endpoints(service_type="object-store")


def test_scoping_and_roles_as_keystone_and_swift_decide(
    keystone_swift: KeystoneSwiftCluster,
) -> None:
    keystone, ids = keystone_swift.keystone, keystone_swift.identities
    for user, project in (
        (ids.no_role, ids.project),  # no role on the project: no project-scoped token
        (ids.member, ids.other_domain_project),  # same project name, other domain
    ):
        with pytest.raises(ka.Unauthorized):
            keystone.session(user, project).get_token()
    # A reader gets a token, but keystoneauth lets only operator roles use the account.
    reader = swift_connection(keystone.session(ids.reader, ids.project))
    with pytest.raises(ClientException) as refused:
        reader.get_account()
    assert refused.value.http_status == 403
    # Every interface and region serves the member.
    for interface, region in (("internal", REGION), ("public", SECOND_REGION)):
        session = keystone.session(ids.member, ids.project)
        conn = swift_connection(session, endpoint_type=interface, region_name=region)
        assert conn.get_auth()[0] == keystone_swift.endpoint(interface, region)
        conn.head_account()


@pytest.mark.parametrize("by_name", [False, True], ids=["id", "name-and-user"])
def test_application_credentials_reach_swift_until_revoked(
    keystone_swift: KeystoneSwiftCluster,
    application_credential: ApplicationCredential,
    by_name: bool,
) -> None:
    keystone = keystone_swift.keystone
    session = app_credential_session(keystone.url, application_credential, by_name=by_name)
    url, token = swift_connection(session).get_auth()
    assert url == keystone_swift.storage_url  # the project it belongs to
    held = Connection(preauthurl=url, preauthtoken=token, retries=0, timeout=30)
    held.head_account()
    keystone.revoke(application_credential)
    # Swift's authtoken caches nothing: the token already held is refused at once...
    with pytest.raises(ClientException) as refused:
        held.head_account()
    assert refused.value.http_status == 401
    # ...and Keystone issues no new one: by id it answers 404 (no such credential), by name 401.
    again = app_credential_session(keystone.url, application_credential, by_name=by_name)
    with pytest.raises(ka.Unauthorized if by_name else ka.NotFound):
        again.get_token()


# --- the store through Keystone -------------------------------------------------------------


async def test_keystone_v3_round_trip(keystone_swift: KeystoneSwiftCluster) -> None:
    settings = keystone_swift.settings()
    assert settings.auth_url.endswith("/v3") and settings.project_name
    size = 3 * PARTS.part_size + 1
    async with open_store(settings, PARTS) as store:
        stored = await store.upload("ks/large", stream(size))
        assert await download_digest(store, "ks/large", expected_sha256=stored.sha256) == (
            size,
            digest(size),
        )
        assert [o.key async for o in store.list("ks/")] == ["ks/large"]
        assert (await store.validate()).ok
        await store.delete("ks/large")
    assert keystone_swift.names(settings.container + "_segments") == []
    # The auth URL may be given without its version, as many operators write it.
    bare = settings.model_copy(update={"auth_url": settings.auth_url.removesuffix("/v3")})
    async with open_store(bare, PARTS) as store:
        assert (await store.validate()).ok


def failure(case: str, ids: Identities) -> tuple[dict[str, Any], type[StorageError]]:
    """The settings' change that makes ``case`` happen, and the error it must raise."""
    password = {"password": SecretStr("not-the-password")}
    as_no_role = {"username": ids.no_role.name, "password": SecretStr(ids.no_role.password)}
    as_reader = {"username": ids.reader.name, "password": SecretStr(ids.reader.password)}
    other_domain = {"project_domain_name": ids.other_domain_project.domain_name}
    cases: dict[str, tuple[dict[str, Any], type[StorageError]]] = {
        "wrong password": (password, AuthenticationFailed),
        "unknown project": ({"project_name": "someone-elses"}, AuthenticationFailed),
        "unknown user domain": ({"user_domain_name": "Other"}, AuthenticationFailed),
        "project of another domain": (other_domain, AuthenticationFailed),
        "no role on the project": (as_no_role, AuthenticationFailed),
        "a role Swift does not accept": (as_reader, PermissionDenied),
        "unknown region": ({"region_name": "Nowhere"}, StorageError),
        "no object-store endpoint": ({"project_name": ids.no_swift_project.name}, StorageError),
    }
    return cases[case]


@pytest.mark.parametrize(
    "case",
    [
        "wrong password",
        "unknown project",
        "unknown user domain",
        "project of another domain",
        "no role on the project",
        "a role Swift does not accept",
        "unknown region",
        "no object-store endpoint",
    ],
)
async def test_keystone_v3_failures(keystone_swift: KeystoneSwiftCluster, case: str) -> None:
    change, error = failure(case, keystone_swift.identities)
    settings = keystone_swift.settings(container="never-created")
    settings = settings.model_copy(update=change)
    async with open_store(settings, FAST) as store:
        with pytest.raises(error) as caught:
            await store.upload("x", stream(1))
        assert type(caught.value) is error
        for secret in (keystone_swift.identities.member.password, settings.password):
            plain = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
            assert plain not in str(caught.value)
        if case == "unknown region":
            assert "object-store endpoint in region 'Nowhere'" in str(caught.value)
        if case == "no object-store endpoint":
            assert "object-store endpoint" in str(caught.value)
        report = await store.validate()
        assert report.failure is not None and report.failure.error_code == caught.value.code


async def test_keystone_unreachable(keystone_swift: KeystoneSwiftCluster) -> None:
    settings = keystone_swift.settings(
        container="never-created", auth_url=f"http://127.0.0.1:{free_port()}/v3"
    )
    async with open_store(settings, FAST) as store:
        with pytest.raises(EndpointUnreachable):
            await store.upload("x", stream(1))


# --- tokens that expire, credentials that are revoked --------------------------------------


async def pausing(size: int, pause_after: int, pause: float) -> AsyncIterator[bytes]:
    """:func:`stream`'s bytes, with one pause of ``pause`` seconds after ``pause_after``."""
    sent = 0
    async for chunk in stream(size, irregular=False):
        yield chunk
        if sent < pause_after <= sent + len(chunk):
            await asyncio.sleep(pause)
        sent += len(chunk)


async def test_a_token_that_expires_mid_transfer_is_renewed(
    keystone_swift: KeystoneSwiftCluster, short_token_keystone: KeystoneServer
) -> None:
    """Tokens of this Keystone live SHORT_TOKEN_SECONDS. The upload pauses longer than that
    after its first segments, the download after its first chunk, so each outlasts the token
    it started with, and both go on. Whether a connection meets a refusal (and renews) or
    keystoneauth renews first (it re-authenticates a token that expires within two minutes)
    depends on which pooled connection carries the next request: the refusal path itself is
    pinned down by the race test below, not counted here."""
    ids = keystone_swift.identities
    session = short_token_keystone.session(ids.member, ids.project)
    access = session.auth.get_access(session)
    assert (access.expires - access.issued).total_seconds() == pytest.approx(
        SHORT_TOKEN_SECONDS, abs=1
    )
    settings = keystone_swift.settings(auth_url=short_token_keystone.url)
    size = 4 * PARTS.part_size + 1  # five segments: an SLO
    async with open_store(settings, PARTS) as store:
        stored = await store.upload(
            "renewed", pausing(size, 2 * PARTS.part_size, SHORT_TOKEN_SECONDS + 1)
        )
        read, got = hashlib.sha256(), 0
        async for chunk in store.download("renewed", expected_sha256=stored.sha256):
            if not got:
                await asyncio.sleep(SHORT_TOKEN_SECONDS + 1)  # the download outlasts its token
            read.update(chunk)
            got += len(chunk)
        assert (got, read.hexdigest()) == (size, digest(size))
        assert [o.key async for o in store.list()] == ["renewed"]
        await store.delete("renewed")
    assert keystone_swift.names(settings.container + "_segments") == []


def test_every_refused_token_is_renewed_once_even_when_workers_race() -> None:
    """Worker threads share one Keystone session. When several get a 401 for the same expired
    token, each must still be allowed its one retry with a new token: keystoneauth's own
    ``invalidate`` answers False to all but the first, and swiftclient then gives up."""
    from storage.swift import _KeystoneAuth

    settings = SwiftSettings(
        auth_url="http://127.0.0.1:1/v3",
        username="u",
        password=SecretStr("pw-value-1"),
        project_name="p",
        container="c",
    )
    auth = _KeystoneAuth(settings, FAST)
    assert auth.invalidate() and auth.invalidate()  # no request is made
