"""What only S3 has: TLS with a CA bundle, growing part sizes, error codes of HEAD requests."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from storage import (
    S3Settings,
    TLSFailure,
    TransferSettings,
    TransientStorageError,
    open_store,
)
from storage.s3 import S3Store, part_size_for
from tests.servers.s3 import SeaweedS3, running_s3
from tests.storage.support import MiB, digest, download_digest, stream


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    with running_s3(tmp_path_factory.mktemp("s3-tls"), tls=True) as server:
        yield server


async def test_tls_with_a_ca_bundle(tls_server: SeaweedS3) -> None:
    settings = tls_server.settings()
    assert settings.endpoint.startswith("https://") and settings.ca_bundle
    async with open_store(settings, TransferSettings(part_size=5 * MiB)) as store:
        stored = await store.upload("over-tls", stream(6 * MiB))
        assert await download_digest(store, "over-tls") == (6 * MiB, digest(6 * MiB))
        assert stored.size == 6 * MiB
        assert (await store.validate()).ok


async def test_tls_certificate_not_trusted(tls_server: SeaweedS3) -> None:
    untrusted = tls_server.settings(ca_bundle=None)
    async with open_store(untrusted) as store:
        with pytest.raises(TLSFailure) as caught:
            await store.upload("x", stream(1))
        assert not caught.value.transient  # retrying does not make a certificate trusted
        report = await store.validate()
        assert report.failure is not None and report.failure.error_code == "storage_tls_failed"
    # Turning verification off (a test endpoint with a self-signed certificate) connects.
    async with open_store(tls_server.settings(ca_bundle=None, verify_tls=False)) as store:
        assert (await store.validate()).ok


async def test_plain_http_to_a_tls_endpoint_is_not_retried_forever(tls_server: SeaweedS3) -> None:
    settings = tls_server.settings(endpoint=tls_server.endpoint_url.replace("https", "http"))
    transfer = TransferSettings(max_attempts=2, backoff_initial=0.05)
    async with open_store(settings, transfer) as store:
        report = await store.validate()
        assert not report.ok and report.failure is not None


async def test_virtual_host_addressing(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``bucket.host`` requests, as AWS and most S3-compatibles prefer. The one stand-in: the
    wildcard DNS such a deployment has, by a resolver that maps ``*.localhost`` to loopback."""
    asked: list[str] = []
    resolve = socket.getaddrinfo

    def wildcard_dns(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".localhost"):
            asked.append(host)
            host = "127.0.0.1"
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", wildcard_dns)
    with running_s3(tmp_path_factory.mktemp("s3-vhost"), domain="localhost") as server:
        endpoint = server.endpoint_url.replace("127.0.0.1", "localhost")
        settings = server.settings(endpoint=endpoint, addressing_style="virtual")
        async with open_store(settings, TransferSettings(part_size=5 * MiB)) as store:
            stored = await store.upload("v/obj", stream(6 * MiB))
            assert await download_digest(store, "v/obj") == (6 * MiB, stored.sha256)
            assert [o.key async for o in store.list()] == ["v/obj"]
            assert (await store.validate()).ok
        assert f"{settings.bucket}.localhost" in asked


def test_part_sizes_grow_so_unknown_lengths_fit_in_10000_parts() -> None:
    base = 16 * MiB
    sizes = [part_size_for(n, base, 1000) for n in range(1, 10_001)]
    assert sizes[0] == sizes[999] == base and sizes[1000] == 2 * base
    assert sum(sizes) >= 5 * 1024**4  # S3's largest object, whatever the stream's length
    assert max(sizes) <= 5 * 1024**3  # S3's largest part


async def test_part_growth_on_a_real_server(s3_settings: S3Settings, s3_server: SeaweedS3) -> None:
    transfer = TransferSettings(part_size=5 * MiB, part_growth_every=2, max_concurrency=2)
    size = 40 * MiB
    async with open_store(s3_settings, transfer) as store:
        stored = await store.upload("growing", stream(size))
        assert await download_digest(store, "growing") == (size, stored.sha256)
    head = s3_server.client().head_object(Bucket=s3_settings.bucket, Key="growing")
    assert head["ETag"].endswith('-5"')  # 5 + 5 + 10 + 10 + 10 MiB, not 8 parts of 5 MiB


def test_throttling_and_server_errors_are_transient() -> None:
    store = S3Store(S3Settings(bucket="b-b", access_key_id="a", secret_access_key="s3cr3t-value"))

    def error(code: str, status: int) -> ClientError:
        return ClientError(
            {
                "Error": {"Code": code, "Message": "m"},
                "ResponseMetadata": {"HTTPStatusCode": status},
            },
            "PutObject",
        )

    for code, status in [("SlowDown", 503), ("InternalError", 500), ("RequestTimeout", 400),
                         ("Whatever", 502), ("Throttling", 400), ("", 429)]:  # fmt: skip
        classified = store._classify(error(code, status), "write objects", "k")
        assert isinstance(classified, TransientStorageError), (code, status)
    for code, status in [("NoSuchBucket", 404), ("AccessDenied", 403), ("InvalidAccessKeyId", 403),
                         ("InvalidArgument", 400)]:  # fmt: skip
        assert not store._classify(error(code, status), "write objects", "k").transient
    leaked = error("SignatureDoesNotMatch", 403)
    leaked.response["Error"]["Message"] = "expected s3cr3t-value"
    assert "s3cr3t-value" not in str(store._classify(leaked, "write objects", "k"))
