"""One behaviour, two real backends: each test using ``backend`` runs against SeaweedFS (S3)
and OpenStack Swift, through the public :func:`storage.open_store` only; the server is looked
at directly only to check what the store left behind (parts, segments)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from pydantic import SecretStr

from storage import ObjectStore, S3Settings, SwiftSettings, TransferSettings, open_store
from tests.servers.s3 import SeaweedS3
from tests.servers.swift import KeystoneSwiftCluster, SwiftCluster

SMALL_PARTS = TransferSettings(part_size=5 * 1024 * 1024, max_concurrency=3)
"""The smallest parts S3 allows: objects cross the large-object threshold at 5 MiB."""


class Backend:
    """A fresh bucket or container on one backend, and what the tests need to know about it."""

    kind: str
    settings: S3Settings | SwiftSettings

    def open(self, transfer: TransferSettings | None = SMALL_PARTS, **over: Any) -> ObjectStore:
        return open_store(self.changed(**over), transfer)

    def changed(self, **over: Any) -> S3Settings | SwiftSettings:
        """The settings with some fields changed, validated again."""
        return type(self.settings).model_validate({**self.settings.model_dump(), **over})

    def with_wrong_secret(self) -> S3Settings | SwiftSettings:
        raise NotImplementedError

    def with_missing_container(self) -> S3Settings | SwiftSettings:
        raise NotImplementedError

    def read_only(self) -> S3Settings | SwiftSettings:
        raise NotImplementedError

    def leftovers(self) -> list[str]:
        """Parts of unfinished multipart uploads, or segments, still held by the server."""
        raise NotImplementedError

    def is_large_object(self, key: str) -> bool:
        raise NotImplementedError

    def secret(self) -> str:
        raise NotImplementedError


class S3Backend(Backend):
    kind = "s3"

    def __init__(self, server: SeaweedS3) -> None:
        self.server = server
        self.settings = server.settings()

    def with_wrong_secret(self) -> S3Settings:
        return self.changed(secret_access_key=SecretStr("x" * 40))

    def with_missing_container(self) -> S3Settings:
        return self.changed(bucket="missing-" + uuid.uuid4().hex[:12])

    def read_only(self) -> S3Settings:
        return self.changed(
            access_key_id=self.server.reader_key,
            secret_access_key=SecretStr(self.server.reader_secret),
        )

    def leftovers(self) -> list[str]:
        return [
            f"{u['Key']} ({u['UploadId']})"
            for u in self.server.multipart_uploads(self.settings.bucket)
        ]

    def is_large_object(self, key: str) -> bool:
        head = self.server.client().head_object(
            Bucket=self.settings.bucket, Key=self.settings.prefix + key
        )
        return "-" in head["ETag"]  # a multipart upload's ETag ends in -<parts>

    def secret(self) -> str:
        return self.settings.secret_access_key.get_secret_value()


class SwiftBackend(Backend):
    kind = "swift"

    def __init__(self, server: SwiftCluster) -> None:
        """Auth v1 on a tempauth cluster; Keystone v3 on a :class:`KeystoneSwiftCluster`."""
        self.server = server
        self.settings = server.settings()

    def with_wrong_secret(self) -> SwiftSettings:
        return self.changed(password=SecretStr("x" * 40))

    def with_missing_container(self) -> SwiftSettings:
        return self.changed(container="missing-" + uuid.uuid4().hex[:12])

    def read_only(self) -> SwiftSettings:
        if isinstance(self.server, KeystoneSwiftCluster):
            reader = self.server.identities.reader  # Keystone's reader role
            return self.changed(username=reader.name, password=SecretStr(reader.password))
        return self.changed(username=self.server.reader, password=SecretStr(self.server.reader_key))

    def leftovers(self) -> list[str]:
        """Segments no stored object refers to (those of live large objects are expected)."""
        segments = self.settings.container + "_segments"
        conn = self.server.connection()
        live: set[str] = set()

        def walk(container: str, name: str) -> None:
            _, body = conn.get_object(container, name, query_string="multipart-manifest=get")
            for entry in json.loads(body):
                seg_container, _, seg = entry["name"].lstrip("/").partition("/")
                assert seg_container == segments, entry
                live.add(seg)
                if entry.get("sub_slo"):
                    walk(seg_container, seg)

        try:
            for name in self.server.names(self.settings.container):
                if (
                    conn.head_object(self.settings.container, name).get("x-static-large-object")
                    == "True"
                ):
                    walk(self.settings.container, name)
        finally:
            conn.close()
        return [n for n in self.server.names(segments) if n not in live]

    def is_large_object(self, key: str) -> bool:
        conn = self.server.connection()
        try:
            head = conn.head_object(self.settings.container, self.settings.prefix + key)
        finally:
            conn.close()
        return head.get("x-static-large-object") == "True"

    def secret(self) -> str:
        return self.settings.password.get_secret_value()


@pytest.fixture(params=["s3", "swift"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "s3":
        return S3Backend(request.getfixturevalue("s3_server"))
    return SwiftBackend(request.getfixturevalue("swift_server"))
