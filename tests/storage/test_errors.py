"""Failures are classified (the API shows them to users) and never carry a credential."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from storage import (
    AuthenticationFailed,
    ContainerNotFound,
    EndpointUnreachable,
    InvalidSettings,
    ObjectNotFound,
    PermissionDenied,
    S3Settings,
    StorageError,
    TransferSettings,
    open_store,
)
from tests.servers.ports import free_port
from tests.storage.conftest import SMALL_PARTS, Backend
from tests.storage.support import read_all, stream

FAST = SMALL_PARTS.model_copy(update={"max_attempts": 2, "backoff_initial": 0.05})


async def _every_operation_fails_with(store, error: type[StorageError]) -> list[StorageError]:  # type: ignore[no-untyped-def]
    raised = []
    for name, operation in [
        ("upload", lambda: store.upload("k", stream(10))),
        ("large upload", lambda: store.upload("big", stream(3 * SMALL_PARTS.part_size))),
        ("download", lambda: read_all(store, "k")),
        ("stat", lambda: store.stat("k")),
        ("list", lambda: _drain(store.list())),
        ("delete", lambda: store.delete("k")),
    ]:
        with pytest.raises(error) as caught:
            await operation()
        assert caught.value.code == error.code, (name, caught.value)
        raised.append(caught.value)
    return raised


async def _drain(items) -> list:  # type: ignore[no-untyped-def]
    return [i async for i in items]


async def test_wrong_credentials(backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = backend.with_wrong_secret()
    secret = settings.model_dump()["password" if backend.kind == "swift" else "secret_access_key"]
    secret = secret.get_secret_value()
    async with open_store(settings, FAST) as store:
        errors = await _every_operation_fails_with(store, AuthenticationFailed)
        report = await store.validate()
        assert not report.ok
        assert report.failure.name == "write" and report.failure.error_code == "storage_auth_failed"
        for text in [
            *map(str, errors),
            *map(repr, errors),
            repr(store),
            repr(settings),
            str(report),
        ]:
            assert secret not in text and backend.secret() not in text
        assert "refused the credentials" in errors[0].message
    assert secret not in caplog.text and backend.secret() not in caplog.text


async def test_missing_container(backend: Backend) -> None:
    settings = backend.with_missing_container()
    name = settings.bucket if backend.kind == "s3" else settings.container  # type: ignore[union-attr]
    async with open_store(settings, FAST) as store:
        errors = await _every_operation_fails_with(store, ContainerNotFound)
        assert all(name in e.message and "does not exist" in e.message for e in errors)
        report = await store.validate()
        assert report.failure is not None and report.failure.name == "write"
        assert report.failure.error_code == "storage_container_not_found"
    assert backend.leftovers() == []  # nothing was written for the refused large upload


async def test_read_only_credentials(backend: Backend) -> None:
    async with backend.open() as owner:
        await owner.upload("existing", stream(10))
    async with open_store(backend.read_only(), FAST) as store:
        for operation in (
            lambda: store.upload("k", stream(10)),
            lambda: store.upload("k", stream(3 * SMALL_PARTS.part_size)),
            lambda: store.delete("existing"),
        ):
            with pytest.raises(PermissionDenied) as caught:
                await operation()
            assert "may not" in caught.value.message
        report = await store.validate()
        assert report.failure is not None
        assert report.failure.error_code == "storage_permission_denied"
    async with backend.open() as owner:
        assert (await owner.stat("existing")).size == 10  # the refused delete deleted nothing
    assert backend.leftovers() == []


async def test_unreachable_endpoint_fails_after_bounded_retries(backend: Backend) -> None:
    port = free_port()
    if backend.kind == "s3":
        settings = backend.changed(endpoint=f"http://127.0.0.1:{port}")
    else:
        settings = backend.changed(auth_url=f"http://127.0.0.1:{port}/auth/v1.0")
    transfer = TransferSettings(max_attempts=3, backoff_initial=0.1, backoff_max=0.2)
    async with open_store(settings, transfer) as store:
        started = time.monotonic()
        with pytest.raises(EndpointUnreachable) as caught:
            await store.upload("k", stream(10))
        assert caught.value.transient and "cannot be reached" in caught.value.message
        assert time.monotonic() - started < 60  # bounded: not a hang
        report = await store.validate()
        assert report.failure is not None and report.failure.error_code == "storage_unreachable"


async def test_missing_object(backend: Backend) -> None:
    async with backend.open() as store:
        with pytest.raises(ObjectNotFound) as caught:
            await read_all(store, "no/such/object")
        assert "'no/such/object' does not exist" in caught.value.message
        with pytest.raises(ObjectNotFound):
            await store.stat("no/such/object")


async def test_validate_leaves_no_probe(backend: Backend) -> None:
    async with backend.open() as store:
        report = await store.validate()
        assert report.ok and [s.name for s in report.steps] == ["write", "read", "delete"]
        assert [o.key async for o in store.list()] == []


async def test_settings_the_client_refuses_are_classified() -> None:
    """Settings that bypassed validation (built without it, or stored before today's rules)
    still fail as a StorageError the API can explain, never as botocore's ValueError."""
    settings = S3Settings.model_construct(
        **{
            **S3Settings(bucket="bkt", access_key_id="a", secret_access_key="s" * 10).__dict__,
            "endpoint": "http://bad_host:9",
            "region": "bad region!",
        }
    )
    async with open_store(settings, FAST) as store:
        with pytest.raises(InvalidSettings) as caught:
            await store.upload("k", stream(1))
        assert "check the endpoint and region" in caught.value.message
        report = await store.validate()
        assert report.failure is not None
        assert report.failure.error_code == "storage_invalid_settings"


async def test_closing_does_not_wait_for_a_silent_server(backend: Backend) -> None:
    """A request stuck on a server that never answers ends by its own read timeout; a store
    closed meanwhile (a validation past its deadline) returns at once."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    if backend.kind == "s3":
        settings = backend.changed(endpoint=url)
    else:
        settings = backend.changed(auth_url=f"{url}/auth/v1.0")
    slow = TransferSettings(read_timeout=30, max_attempts=1)
    try:
        store = open_store(settings, slow)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(store.validate(), 1)
        started = time.monotonic()
        await store.aclose()
        assert time.monotonic() - started < 5  # not the 30 s read timeout
        # Given its own time, a validation ends by the request timeouts.
        quick = TransferSettings(connect_timeout=1, read_timeout=1, max_attempts=2)
        started = time.monotonic()
        async with open_store(settings, quick) as store:
            report = await store.validate()
        assert report.failure is not None and report.failure.error_code == "storage_transient"
        assert time.monotonic() - started < 15  # 2 attempts x (1 + 1) s, plus backoff
        # An upload too (S3 waited forever for a "100 Continue" that never came).
        started = time.monotonic()
        async with open_store(settings, quick) as store:
            with pytest.raises(StorageError) as caught:
                await asyncio.wait_for(store.upload("k", stream(10)), 60)
        assert caught.value.transient
        assert time.monotonic() - started < 15
    finally:
        for writer in held:
            writer.close()
        server.close()
