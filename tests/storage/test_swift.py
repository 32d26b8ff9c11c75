"""What only Swift has: nested static large object manifests, the segments container (Keystone
v3 is in ``test_swift_keystone.py``)."""

from __future__ import annotations

import json

import pytest
from swiftclient.exceptions import ClientException

from storage import (
    PermissionDenied,
    SwiftSettings,
    TransferSettings,
    TransientStorageError,
    open_store,
)
from storage.swift import SwiftStore
from tests.servers.swift import MAX_MANIFEST_SEGMENTS, SwiftCluster
from tests.storage.conftest import SwiftBackend
from tests.storage.support import MiB, digest, download_digest, stream

PARTS = TransferSettings(part_size=5 * MiB, max_concurrency=3)
FAST = PARTS.model_copy(update={"max_attempts": 2, "backoff_initial": 0.05})


async def test_nested_manifests_past_the_clusters_segment_limit(swift_server: SwiftCluster) -> None:
    backend = SwiftBackend(swift_server)
    segments = MAX_MANIFEST_SEGMENTS + 3  # one manifest cannot list them all
    size = segments * PARTS.part_size - 5
    async with backend.open(PARTS) as store:
        stored = await store.upload("nested", stream(size, irregular=False))
        assert await download_digest(store, "nested", expected_sha256=stored.sha256) == (
            size,
            digest(size),
        )
        assert (await store.stat("nested")).size == size
        assert [(o.key, o.size) async for o in store.list()] == [("nested", size)]
    conn = swift_server.connection()
    try:
        _, body = conn.get_object(
            backend.settings.container, "nested", query_string="multipart-manifest=get"
        )
    finally:
        conn.close()
    top = json.loads(body)
    assert len(top) == 2 and all(entry.get("sub_slo") for entry in top)
    assert backend.leftovers() == []
    async with backend.open(PARTS) as store:
        await store.delete("nested")
    assert swift_server.names(backend.settings.container + "_segments") == []


async def test_segments_follow_swiftclient_conventions(swift_server: SwiftCluster) -> None:
    backend = SwiftBackend(swift_server)
    async with backend.open(PARTS, prefix="p/") as store:
        await store.upload("k.gz", stream(2 * PARTS.part_size + 1))
    names = swift_server.names(backend.settings.container + "_segments")
    assert len(names) == 3
    assert all(n.startswith("p/k.gz/slo/") and n[-8:].isdigit() for n in names)


def test_server_errors_are_transient() -> None:
    store = SwiftStore(
        SwiftSettings(
            auth_url="http://127.0.0.1:1/auth/v1.0",
            auth_version="1",
            username="u",
            password="pw-secret-value",
            container="c",
        )
    )
    # No request is made, so nothing to close (the thread pool is the process's, shared).
    for status in (500, 503, 507, 408, 429, 498, 422):
        exc = ClientException("Object PUT failed", http_status=status, http_reason="Busy")
        assert isinstance(
            store._classify(exc, "write objects", "k", "object"), TransientStorageError
        )
    for status in (400, 401, 403, 404, 409):
        exc = ClientException("Object PUT failed", http_status=status, http_reason="No")
        assert not store._classify(exc, "write objects", "k", "object").transient


async def test_validation_checks_the_segments_container(swift_server: SwiftCluster) -> None:
    """A user who may write the container (an ACL) but not create containers can store small
    objects only: validation says so, instead of the first large backup failing."""
    container = swift_server.make_container()
    conn = swift_server.connection()
    try:
        conn.post_container(
            container,
            {"X-Container-Read": swift_server.reader, "X-Container-Write": swift_server.reader},
        )
    finally:
        conn.close()
    settings = swift_server.settings(
        container, username=swift_server.reader, password=swift_server.reader_key
    )
    async with open_store(settings, FAST) as store:
        await store.upload("small", stream(10))  # the ACL lets it write the container
        report = await store.validate()
        assert [s.name for s in report.steps] == ["write", "read", "delete", "write"]
        failure = report.failure
        assert failure is not None and failure.error_code == "storage_permission_denied"
        assert f"{container}_segments" in (failure.message or "")
        with pytest.raises(PermissionDenied):
            await store.upload("large", stream(2 * PARTS.part_size))
    async with open_store(swift_server.settings(container), FAST) as owner:
        assert (await owner.validate()).ok  # the owner creates the segments container
