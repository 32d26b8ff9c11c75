"""The server goes away in the middle of a transfer: a restart within the retry budget is
ridden out (uploads retry their parts, downloads resume from the last byte), a longer outage
ends in a clean, classified failure whose leftovers a later ``delete`` removes."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from storage import StorageError, TransferSettings
from tests.servers.s3 import SeaweedS3
from tests.servers.swift import SwiftCluster
from tests.storage.conftest import S3Backend, SwiftBackend
from tests.storage.support import MiB, digest, download_digest, stream

PART = 5 * MiB
PATIENT = TransferSettings(
    part_size=PART, max_concurrency=2, max_attempts=10, backoff_initial=0.5, backoff_max=4.0
)
"""About 25 s of retries: enough for a server restart (Swift's restarted with a new token key
here, so its uploads also show the token being renewed)."""
IMPATIENT = TransferSettings(
    part_size=PART, max_concurrency=2, max_attempts=3, backoff_initial=0.2, backoff_max=0.5,
    connect_timeout=2, read_timeout=10,
)  # fmt: skip


@pytest.fixture(params=["s3", "swift"])
def private(request: pytest.FixtureRequest) -> Any:
    """(backend, server) on a server of the test's own."""
    if request.param == "s3":
        server: SeaweedS3 = request.getfixturevalue("s3_private_server")
        return S3Backend(server), server
    cluster: SwiftCluster = request.getfixturevalue("swift_private_server")
    return SwiftBackend(cluster), cluster


async def _wait_for(condition, what: str, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


class Source:
    """A backup producer that can be paused, so the test knows what was sent when."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent = 0
        self.go = asyncio.Event()
        self.go.set()

    async def __call__(self) -> AsyncIterator[bytes]:
        async for chunk in stream(self.size, irregular=False):
            await self.go.wait()
            self.sent += len(chunk)
            yield chunk
            await asyncio.sleep(0.005)


async def _restart(server: Any) -> None:
    await asyncio.to_thread(server.kill)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(server.start)


@pytest.mark.slow
async def test_upload_rides_out_a_server_restart(private: Any) -> None:
    backend, server = private
    size = 12 * PART + 99
    source = Source(size)
    async with backend.open(PATIENT) as store:
        upload = asyncio.create_task(store.upload("through-restart", source()))
        await _wait_for(lambda: source.sent > 4 * PART or upload.done(), "parts to be sent")
        source.go.clear()  # the producer pauses while the server is down
        await _restart(server)
        source.go.set()
        stored = await upload
        assert stored.size == size and stored.sha256 == digest(size)
        assert await download_digest(store, "through-restart") == (size, stored.sha256)
    assert backend.leftovers() == []


@pytest.mark.slow
async def test_upload_fails_cleanly_when_the_server_stays_down(private: Any) -> None:
    backend, server = private
    source = Source(12 * PART)
    async with backend.open(IMPATIENT) as store:
        upload = asyncio.create_task(store.upload("outage", source()))
        await _wait_for(lambda: source.sent > 3 * PART or upload.done(), "parts to be sent")
        await asyncio.to_thread(server.kill)
        with pytest.raises(StorageError) as caught:
            await upload
        assert caught.value.transient, caught.value  # unreachable or transient: retry later
        assert caught.value.code in ("storage_unreachable", "storage_transient")
    await asyncio.to_thread(server.start)
    # The abort could not reach the server: what the upload left is found and removed by a
    # delete of its key (what the agent does for an upload interrupted by a crash).
    async with backend.open(IMPATIENT) as store:
        await store.delete("outage")
        assert [o.key async for o in store.list()] == []
    assert backend.leftovers() == []


@pytest.mark.slow
async def test_download_resumes_after_a_server_restart(private: Any) -> None:
    backend, server = private
    size = 6 * PART + 7
    async with backend.open(PATIENT) as store:
        stored = await store.upload("resume-me", stream(size))
        received, restarted, h = 0, False, hashlib.sha256()
        async for chunk in store.download("resume-me", expected_sha256=stored.sha256):
            h.update(chunk)
            received += len(chunk)
            if not restarted and received >= PART:
                restarted = True
                await _restart(server)  # the rest of the object comes from a new request
        assert restarted and received == size and h.hexdigest() == stored.sha256
