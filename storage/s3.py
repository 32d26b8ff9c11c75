"""S3 destinations through aioboto3: AWS and any S3-compatible endpoint.

Uploads of unknown length are cut into parts as they stream; past ``part_size`` they become a
multipart upload with at most ``part_size * max_concurrency`` bytes in memory, aborted on any
failure or cancellation. Downloads stream the first part and fetch the next ones as ranged GETs
ahead of the reader; everything after the first answer is pinned to its ETag, so a replaced
object is never spliced. See docs/storage.md.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import aioboto3
import aiohttp
import structlog
from aiobotocore.config import AioConfig
from botocore import exceptions as bx
from botocore.handlers import add_expect_header
from botocore.parsers import ResponseParserError

from storage import egress
from storage._support import (
    PROBE_PREFIX,
    PartReader,
    Verifier,
    check_list_prefix,
    classify_safely,
    finish_cleanup,
    full_key,
    normalise_prefix,
    part_length,
    plain_reason,
    resume_delay,
    short,
    step_of,
    tls_reason,
    with_retries,
)
from storage.base import (
    AuthenticationFailed,
    ContainerNotFound,
    EndpointUnreachable,
    InvalidSettings,
    NotAnObjectStore,
    ObjectInfo,
    ObjectLocked,
    ObjectLockMissing,
    ObjectNotFound,
    ObjectStore,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    StoredObject,
    TLSFailure,
    TransientStorageError,
    ValidationReport,
    ValidationStep,
)
from storage.settings import S3Settings, TransferSettings
from storage.validation import probe

log = structlog.get_logger("storage.s3")

T = TypeVar("T")

MAX_PARTS = 10_000
PROBE_LOCK_SECONDS = 2
"""How long a destination check's probe stays locked (whole seconds: S3 keeps no fraction)."""
MAX_PART_SIZE = 5 * 1024**3
DOWNLOAD_CHUNK = 1024 * 1024

_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidSecurity",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "Forbidden", "403"}
_MISSING_BUCKET_CODES = {"NoSuchBucket"}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}
_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestTimeout",
    "RequestTimeoutException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "BandwidthLimitExceeded",
    "PriorRequestNotComplete",
    "OperationAborted",
    "EC2ThrottledException",
}
_REGION_CODES = {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraint"}
_KNOWN_CODES = {
    *_AUTH_CODES,
    *_DENIED_CODES,
    *_MISSING_BUCKET_CODES,
    *_MISSING_KEY_CODES,
    *_TRANSIENT_CODES,
    *_REGION_CODES,
    "InvalidRange",
    "PreconditionFailed",
    "NoSuchUpload",
    "InvalidArgument",
    "InvalidRequest",
    "InvalidBucketName",
    "InvalidPart",
    "InvalidPartOrder",
    "EntityTooLarge",
    "EntityTooSmall",
    "BadDigest",
    "InvalidDigest",
    "MalformedXML",
    "MissingContentLength",
    "XAmzContentSHA256Mismatch",
    "KeyTooLongError",
    "InvalidObjectState",
    "NotImplemented",
    "MethodNotAllowed",
    "QuotaExceeded",
}
"""Error codes S3 documents: the only words of an error answer repeated in a description."""
_AWS_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")


class _S3Client(Protocol):
    """The calls made on aiobotocore's S3 client, whose methods botocore builds at run time
    from the API's description (so it has no types): each takes the operation's parameters by
    name and answers its response as a dict."""

    meta: Any  # botocore's ClientMeta: the client's event hooks

    async def abort_multipart_upload(self, **params: Any) -> dict[str, Any]: ...
    async def complete_multipart_upload(self, **params: Any) -> dict[str, Any]: ...
    async def create_multipart_upload(self, **params: Any) -> dict[str, Any]: ...
    async def delete_object(self, **params: Any) -> dict[str, Any]: ...
    async def get_object(self, **params: Any) -> dict[str, Any]: ...
    async def get_object_lock_configuration(self, **params: Any) -> dict[str, Any]: ...
    async def get_object_retention(self, **params: Any) -> dict[str, Any]: ...
    async def head_object(self, **params: Any) -> dict[str, Any]: ...
    async def list_multipart_uploads(self, **params: Any) -> dict[str, Any]: ...
    async def list_object_versions(self, **params: Any) -> dict[str, Any]: ...
    async def list_objects_v2(self, **params: Any) -> dict[str, Any]: ...
    async def put_object(self, **params: Any) -> dict[str, Any]: ...
    async def upload_part(self, **params: Any) -> dict[str, Any]: ...


def part_size_for(number: int, base: int, growth_every: int) -> int:
    """Size of part ``number`` (1-based): ``base`` for the first ``growth_every`` parts, then
    doubling every ``growth_every`` parts, so a stream of unknown length can reach S3's
    largest object (5 TiB) within its 10,000 parts."""
    return min(base << ((number - 1) // growth_every), MAX_PART_SIZE)


class S3Store(ObjectStore):
    """One bucket (plus the settings' key prefix) on AWS or an S3-compatible endpoint."""

    def __init__(self, settings: S3Settings, transfer: TransferSettings | None = None) -> None:
        self.settings = settings
        self.transfer = transfer or TransferSettings()
        self._session = aioboto3.Session()
        self._stack = AsyncExitStack()
        self._client: _S3Client | None = None
        self._client_lock = asyncio.Lock()
        self._pending: set[asyncio.Task[None]] = set()
        self._closed = False
        self._where = settings.endpoint or f"AWS S3 ({settings.region})"
        self._secrets = (settings.secret_access_key.get_secret_value(),)
        self._prefix = normalise_prefix(settings.prefix)

    def __repr__(self) -> str:
        return (
            f"S3Store(endpoint={self.settings.endpoint!r}, bucket={self.settings.bucket!r}, "
            f"prefix={self.settings.prefix!r})"
        )

    # ------------------------------------------------------------------ plumbing

    async def _s3(self) -> _S3Client:
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._closed:
                raise StorageError("The storage connection is closed.")
            if self._client is None:
                s, t = self.settings, self.transfer
                policy = egress.installed()
                if policy is not None and s.endpoint:
                    await policy.check_url(s.endpoint)  # EgressDenied before any connection
                config = AioConfig(
                    region_name=s.region,
                    signature_version="s3v4",
                    # UNSIGNED-PAYLOAD: botocore would hash every part again, on the event
                    # loop, for its signature (a second SHA-256 pass over every byte beside
                    # ours, as much CPU again, on the busiest thread). The bytes stay checked
                    # end to end by our SHA-256 (kept in the manifest, verified by every
                    # restore and drill) and by AES-GCM's tags when encrypted.
                    s3={"addressing_style": s.addressing_style, "payload_signing_enabled": False},
                    connect_timeout=t.connect_timeout,
                    read_timeout=t.read_timeout,
                    # Retries are ours (tenacity, classified); botocore's would multiply them.
                    retries={"mode": "standard", "total_max_attempts": 1},
                    max_pool_connections=t.max_concurrency + 4,
                    tcp_keepalive=True,
                    # Bytes are protected on the way by TLS and end to end by our SHA-256: a
                    # CRC32 as well would only be another pass over every byte.
                    request_checksum_calculation="when_required",
                    # Only checked addresses (names resolved once), no redirect followed.
                    connector_args=_connector_args(policy),
                    http_session_cls=egress.NoRedirectAIOHTTPSession,
                )
                verify: bool | str | None = None
                if not s.verify_tls:
                    verify = False
                elif s.ca_bundle:
                    verify = s.ca_bundle
                client: _S3Client = await self._stack.enter_async_context(
                    self._session.client(
                        "s3",
                        endpoint_url=s.endpoint,
                        region_name=s.region,
                        aws_access_key_id=s.access_key_id,
                        aws_secret_access_key=s.secret_access_key.get_secret_value(),
                        verify=verify,
                        config=config,
                    )
                )
                # botocore asks for "100 Continue" before every PUT body, and aiohttp waits for
                # it without any timeout: a server that never answers held an upload forever.
                # Without it, the read timeout bounds the wait for the answer.
                client.meta.events.unregister("before-call.s3", add_expect_header)
                client.meta.events.register("before-call.s3", egress.no_region_redirect)
                self._client = client
            return self._client

    async def _call(
        self, doing: str, key: str | None, op: Callable[[_S3Client], Awaitable[T]]
    ) -> T:
        """One request, classified and retried on transient failures."""

        async def once() -> T:
            try:
                client = await self._s3()
            except StorageError:
                raise
            except Exception as exc:  # botocore refusing an endpoint or region, say
                log.warning("s3_client_refused_settings", error=type(exc).__name__)
                raise InvalidSettings(
                    f"The S3 client cannot be set up for {self._where} with these settings "
                    f"({type(exc).__name__}): check the endpoint and region.",
                    step=step_of(doing),
                ) from None
            try:
                return await op(client)
            except StorageError:
                raise
            except Exception as exc:
                denied = egress.refusal_in(exc)  # the resolver refused a name (DNS rebinding)
                raise denied or self._safely_classified(exc, doing, key) from None

        return await with_retries(self.transfer, doing, once)

    def _safely_classified(self, exc: BaseException, doing: str, key: str | None) -> StorageError:
        return classify_safely(
            lambda: self._classify(exc, doing, key), exc, doing, backend="s3", where=self._where
        )

    def _classify(self, exc: BaseException, doing: str, key: str | None) -> StorageError:
        bucket = self.settings.bucket
        step = step_of(doing)
        if isinstance(exc, bx.ClientError):
            error = exc.response.get("Error", {}) or {}
            code = str(error.get("Code") or "")
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            # The server chose the message, the reason phrase and the code: only a code S3
            # documents is repeated, with the status.
            said = ", ".join(
                [*([code] if code in _KNOWN_CODES else []), f"HTTP status {status or 'unknown'}"]
            )
            if code in _MISSING_BUCKET_CODES:
                return ContainerNotFound(
                    f"The bucket {bucket!r} does not exist at {self._where}.", step=step
                )
            if code in _AUTH_CODES:
                return AuthenticationFailed(
                    f"{self._where} refused the credentials while trying to {doing} ({said}).",
                    step=step,
                )
            if code in _REGION_CODES or status == 301:
                region = (exc.response.get("ResponseMetadata", {}).get("HTTPHeaders") or {}).get(
                    "x-amz-bucket-region"
                )
                # A header the server chose: named only if it has the shape of an AWS region.
                hint = f"; it is in region {region!r}" if _AWS_REGION.match(region or "") else ""
                return StorageError(
                    f"The bucket {bucket!r} is not in region {self.settings.region!r}{hint}: "
                    f"set the destination's region ({said}).",
                    step=step,
                )
            if code in _DENIED_CODES or status == 403:
                return PermissionDenied(
                    f"The credentials may not {doing} in the bucket {bucket!r} ({said}).",
                    step=step,
                )
            if code in _MISSING_KEY_CODES or status == 404:
                if key is None:
                    return ContainerNotFound(
                        f"The bucket {bucket!r} does not exist at {self._where}.", step=step
                    )
                return ObjectNotFound(f"The object {key!r} does not exist.", step=step)
            if code in _TRANSIENT_CODES or status >= 500 or status in (408, 429):
                return TransientStorageError(
                    f"{self._where} failed temporarily while trying to {doing} ({said}).",
                    step=step,
                )
            if code == "PreconditionFailed" or status == 412:
                return PreconditionFailed(f"{self._where} refused to {doing} ({said}).", step=step)
            return StorageError(f"{self._where} refused to {doing} ({said}).", step=step)
        if isinstance(exc, bx.SSLError | aiohttp.ClientSSLError):
            return TLSFailure(
                f"The TLS connection to {self._where} failed ({tls_reason(exc)}).",
                step=step,
            )
        if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError):
            return EndpointUnreachable(
                f"{self._where} cannot be reached ({plain_reason(exc, self._secrets)}).", step=step
            )
        if isinstance(
            exc,
            bx.ReadTimeoutError
            | bx.ConnectionClosedError
            | bx.ResponseStreamingError
            | bx.IncompleteReadError
            | bx.HTTPClientError
            | aiohttp.ClientPayloadError
            | aiohttp.ClientConnectionError
            | TimeoutError
            | ConnectionError,
        ):
            return TransientStorageError(
                f"The connection to {self._where} failed while trying to {doing} "
                f"({plain_reason(exc, self._secrets)}).",
                step=step,
            )
        if isinstance(exc, ResponseParserError):
            return NotAnObjectStore(
                f"{self._where} does not answer like an S3 server while trying to {doing} (its "
                "answer is not S3's XML): check the endpoint.",
                step=step,
            )
        if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
            return AuthenticationFailed("No S3 credentials were given.", step=step)
        if isinstance(exc, bx.ParamValidationError | bx.InvalidS3AddressingStyleError):
            return StorageError(
                f"The S3 request to {doing} was invalid: {short(str(exc))}", step=step
            )
        return StorageError(
            f"Unexpected failure while trying to {doing} on {self._where} ({type(exc).__name__}).",
            step=step,
        )

    # ------------------------------------------------------------------ upload

    async def upload(
        self, key: str, chunks: AsyncIterator[bytes], *, retain_until: datetime | None = None
    ) -> StoredObject:
        """See :meth:`ObjectStore.upload`. With ``retain_until`` on a destination that requires
        object lock, the object is written locked in the settings' mode until that moment
        (S3 Object Lock): nobody, these credentials included, can delete or overwrite that
        version before it."""
        full = full_key(self._prefix, key)
        lock = self._lock_params(retain_until)
        reader = PartReader(chunks)
        first = await reader.read_file(self.transfer.part_size)
        if part_length(first) < self.transfer.part_size or await reader.at_end():
            await self._call(
                "write objects",
                key,
                lambda c: c.put_object(
                    Bucket=self.settings.bucket,
                    Key=full,
                    Body=_rewound(first),
                    ContentLength=part_length(first),
                    **lock,
                ),
            )
        else:
            handed = [first]
            del first  # the multipart upload frees it once it is sent
            await self._multipart(key, full, reader, handed, lock)
        log.info(
            "s3_uploaded",
            bucket=self.settings.bucket,
            key=full,
            size=reader.size,
            **({"locked_until": lock["ObjectLockRetainUntilDate"].isoformat()} if lock else {}),
        )
        return StoredObject(key=key, size=reader.size, sha256=reader.sha256)

    def _lock_params(self, retain_until: datetime | None) -> dict[str, Any]:
        """The lock headers of an upload: none unless the destination requires object lock
        and the caller says until when."""
        lock = self.settings.object_lock
        if lock is None or retain_until is None:
            return {}
        if retain_until.tzinfo is None:
            retain_until = retain_until.replace(tzinfo=UTC)
        return {"ObjectLockMode": lock.mode, "ObjectLockRetainUntilDate": retain_until}

    async def _multipart(
        self,
        key: str,
        full: str,
        reader: PartReader,
        handed: list[io.BytesIO],
        lock: dict[str, Any] | None = None,
    ) -> None:
        """Parts of growing size (see :func:`part_size_for`), at most ``part_size *
        max_concurrency`` bytes of them in memory: the next part is read only once there is
        room for it."""
        bucket = self.settings.bucket
        created = await self._call(
            "write objects",
            key,
            lambda c: c.create_multipart_upload(Bucket=bucket, Key=full, **(lock or {})),
        )
        upload_id: str = created["UploadId"]
        in_flight: dict[asyncio.Task[dict[str, Any]], int] = {}
        done_parts: list[dict[str, Any]] = []
        budget = self.transfer.part_size * self.transfer.max_concurrency
        completed = False

        async def wait_for_room(size: int) -> None:
            while in_flight and sum(in_flight.values()) + size > budget:
                done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    in_flight.pop(task)
                    done_parts.append(task.result())  # raises the part's failure

        try:
            number, data = 1, handed.pop()
            while (length := part_length(data)) > 0:
                if number > MAX_PARTS:
                    raise StorageError(
                        f"The object {key!r} is larger than S3 allows in {MAX_PARTS} parts.",
                        step="write",
                    )
                task = asyncio.create_task(self._part(key, full, upload_id, number, data))
                in_flight[task] = length
                del data
                number += 1
                size = part_size_for(
                    number, self.transfer.part_size, self.transfer.part_growth_every
                )
                await wait_for_room(size)
                data = await reader.read_file(size)
            await wait_for_room(budget + 1)  # all of them
            done_parts.sort(key=lambda p: p["PartNumber"])
            await self._complete(key, full, upload_id, done_parts, reader.size)
            completed = True
        finally:
            if not completed:
                await finish_cleanup(self._abort(full, upload_id, list(in_flight)), self._pending)

    async def _part(
        self, key: str, full: str, upload_id: str, number: int, data: io.BytesIO
    ) -> dict[str, Any]:
        answer = await self._call(
            "write objects",
            key,
            lambda c: c.upload_part(
                Bucket=self.settings.bucket,
                Key=full,
                UploadId=upload_id,
                PartNumber=number,
                Body=_rewound(data),  # a retry sends the part again from its start
                ContentLength=part_length(data),
            ),
        )
        part = {"PartNumber": number, "ETag": answer["ETag"]}
        for name in ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumSHA1", "ChecksumSHA256"):
            if answer.get(name):
                part[name] = answer[name]
        return part

    async def _complete(
        self, key: str, full: str, upload_id: str, parts: list[dict[str, Any]], size: int
    ) -> None:
        attempts = 0

        async def once(client: _S3Client) -> None:
            nonlocal attempts
            attempts += 1
            try:
                await client.complete_multipart_upload(
                    Bucket=self.settings.bucket,
                    Key=full,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
            except bx.ClientError as exc:
                # A retry after an answer lost in transit finds the upload already completed.
                if attempts > 1 and exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
                    head = await client.head_object(Bucket=self.settings.bucket, Key=full)
                    if head.get("ContentLength") == size:
                        return
                raise

        await self._call("write objects", key, once)

    async def _abort(self, full: str, upload_id: str, tasks: list[asyncio.Task[Any]]) -> None:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self._call(
                "abort a multipart upload",
                full,
                lambda c: c.abort_multipart_upload(
                    Bucket=self.settings.bucket, Key=full, UploadId=upload_id
                ),
            )
            log.info("s3_multipart_aborted", bucket=self.settings.bucket, key=full)
        except ObjectNotFound:
            pass  # NoSuchUpload: nothing left
        except StorageError as exc:
            log.error(
                "s3_multipart_abort_failed",
                bucket=self.settings.bucket,
                key=full,
                upload_id=upload_id,
                error=exc.code,
                detail=exc.message,
            )

    # ------------------------------------------------------------------ download

    async def download(
        self, key: str, *, expected_sha256: str | None = None
    ) -> AsyncIterator[bytes]:
        """The first part streams as it arrives; past it, the next parts are fetched as ranged
        GETs, ``max_concurrency`` ahead of the reader (what boto3's ``download_file`` does, in
        order and in bounded memory). Every range is pinned to the first answer's ETag."""
        full = full_key(self._prefix, key)
        verifier = Verifier(key, expected_sha256)
        part = self.transfer.part_size
        first = await self._get(key, full, 0, part - 1, None)
        total = _total_size(first)
        etag = first.get("ETag")
        ahead: collections.deque[asyncio.Task[list[bytes]]] = collections.deque()
        next_start = part if total is not None else 0

        def schedule() -> None:
            nonlocal next_start
            while (
                total is not None
                and next_start < total
                and len(ahead) < self.transfer.max_concurrency
            ):
                end = min(next_start + part, total) - 1
                ahead.append(asyncio.create_task(self._range(key, full, next_start, end, etag)))
                next_start = end + 1

        try:
            schedule()
            async for chunk in self._stream(key, full, first, etag, part - 1):
                await verifier.update(chunk)
                yield chunk
            while ahead:
                chunks = await ahead.popleft()
                schedule()
                for chunk in chunks:
                    await verifier.update(chunk)
                    yield chunk
                del chunks
        finally:
            first["Body"].close()  # in case the reader stopped before it was read
            for task in ahead:
                task.cancel()
            if ahead:
                await asyncio.gather(*ahead, return_exceptions=True)
        if total is not None and verifier.size != total:
            raise TransientStorageError(
                f"The object {key!r} came back with {verifier.size} bytes instead of {total}.",
                step="read",
            )
        verifier.finish()

    async def _get(
        self, key: str, full: str, start: int, end: int | None, etag: str | None
    ) -> dict[str, Any]:
        """GET ``bytes=start-end`` (``end`` None: to the end), only if the ETag still matches."""
        extra: dict[str, str] = {"Range": f"bytes={start}-{'' if end is None else end}"}
        if etag:
            extra["IfMatch"] = etag
        try:
            return await self._call(
                "read objects",
                key,
                lambda c: c.get_object(Bucket=self.settings.bucket, Key=full, **extra),
            )
        except PreconditionFailed:
            if not etag:
                raise
            raise _replaced_while_read(key) from None
        except StorageError as exc:
            if start == 0 and "InvalidRange" in exc.message:
                # An empty object has no byte 0: ask for all of it.
                return await self._call(
                    "read objects",
                    key,
                    lambda c: c.get_object(Bucket=self.settings.bucket, Key=full),
                )
            raise

    async def _stream(
        self, key: str, full: str, answer: dict[str, Any], etag: str | None, end: int
    ) -> AsyncIterator[bytes]:
        """The body of ``answer`` chunk by chunk; after a transient failure, the rest of the
        range from a new request (at most ``max_attempts`` times)."""
        ranged = _total_size(answer) is not None
        received = 0
        failures = 0
        while True:
            body = answer["Body"]
            try:
                while True:
                    try:
                        chunk = await body.read(DOWNLOAD_CHUNK)
                    except Exception as exc:
                        raise self._safely_classified(exc, "read objects", key) from None
                    if not chunk:
                        return
                    received += len(chunk)
                    yield chunk
            except StorageError as exc:
                failures += 1
                if not exc.transient or failures >= self.transfer.max_attempts:
                    raise
                log.warning("s3_download_resume", key=full, offset=received, error=exc.code)
                await asyncio.sleep(resume_delay(self.transfer, failures))
            finally:
                body.close()
            answer = await self._get(key, full, received, end if ranged else None, etag)

    async def _range(
        self, key: str, full: str, start: int, end: int, etag: str | None
    ) -> list[bytes]:
        """Bytes ``start..end`` in memory, fetched again whole after a transient failure."""

        async def fetch(client: _S3Client) -> list[bytes]:
            answer = await client.get_object(
                Bucket=self.settings.bucket,
                Key=full,
                Range=f"bytes={start}-{end}",
                **({"IfMatch": etag} if etag else {}),
            )
            chunks: list[bytes] = []
            body = answer["Body"]
            try:
                while chunk := await body.read(DOWNLOAD_CHUNK):
                    chunks.append(chunk)
            finally:
                body.close()
            if sum(map(len, chunks)) != end - start + 1:
                raise TransientStorageError(f"A range of {key!r} came back short.", step="read")
            return chunks

        try:
            return await self._call("read objects", key, fetch)
        except PreconditionFailed:
            if not etag:
                raise
            raise _replaced_while_read(key) from None

    # ------------------------------------------------------------------ the rest

    async def delete(self, key: str) -> None:
        """See :meth:`ObjectStore.delete`. On a destination that requires object lock (a
        versioned bucket), every version of the object is deleted, not hidden behind a delete
        marker; :class:`ObjectLocked` (nothing deleted) while any version is still locked."""
        full = full_key(self._prefix, key)
        bucket = self.settings.bucket
        if self.settings.object_lock is not None:
            await self._delete_versions(key, full)
        else:
            await self._call(
                "delete objects", key, lambda c: c.delete_object(Bucket=bucket, Key=full)
            )
        # An upload of this key that never finished (a crashed writer) would keep its parts.
        try:
            answer = await self._call(
                "list unfinished uploads",
                key,
                lambda c: c.list_multipart_uploads(Bucket=bucket, Prefix=full),
            )
        except StorageError as exc:
            log.debug("s3_list_uploads_unsupported", error=exc.code, detail=exc.message)
            return
        for upload in answer.get("Uploads") or []:
            if upload.get("Key") == full:
                await self._abort(full, upload["UploadId"], [])

    async def _versions(self, key: str, full: str) -> list[str]:
        """The version ids of ``full`` (its delete markers included), oldest last."""
        bucket = self.settings.bucket
        found: list[str] = []
        marker: dict[str, str] = {}
        while True:

            async def page_of(client: _S3Client, marker: dict[str, str] = marker) -> Any:
                return await client.list_object_versions(Bucket=bucket, Prefix=full, **marker)

            page = await self._call("list object versions", key, page_of)
            for entry in [*(page.get("Versions") or []), *(page.get("DeleteMarkers") or [])]:
                if entry.get("Key") == full and entry.get("VersionId"):
                    found.append(str(entry["VersionId"]))
            if not page.get("IsTruncated"):
                return found
            marker = {
                "KeyMarker": page.get("NextKeyMarker") or "",
                "VersionIdMarker": page.get("NextVersionIdMarker") or "",
            }

    async def locked_until(self, key: str) -> datetime | None:
        """The latest moment until which a version of ``key`` is locked (None: none is locked
        now, or the object does not exist)."""
        full = full_key(self._prefix, key)
        latest: datetime | None = None
        now = datetime.now(UTC)
        for version in await self._versions(key, full):
            until = await self._retention_of(key, full, version)
            if until is not None and until > now and (latest is None or until > latest):
                latest = until
        return latest

    async def _retention_of(self, key: str, full: str, version: str) -> datetime | None:
        bucket = self.settings.bucket

        async def retention(client: _S3Client) -> dict[str, Any]:
            try:
                return await client.get_object_retention(Bucket=bucket, Key=full, VersionId=version)
            except bx.ClientError as exc:
                # No retention on that version (a delete marker, an unlocked object).
                # AWS: 404 NoSuchObjectLockConfiguration, 405 for a delete marker.
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status in (400, 404, 405):
                    return {}
                raise

        answer = await self._call("read object retention", key, retention)
        until = (answer.get("Retention") or {}).get("RetainUntilDate")
        if not isinstance(until, datetime):
            return None
        return until if until.tzinfo else until.replace(tzinfo=UTC)

    async def _delete_versions(self, key: str, full: str) -> None:
        bucket = self.settings.bucket
        versions = await self._versions(key, full)
        until = await self.locked_until(key) if versions else None
        if until is not None:
            raise self._locked(key, until)
        for version in versions:

            async def delete_version(client: _S3Client, version: str = version) -> Any:
                return await client.delete_object(Bucket=bucket, Key=full, VersionId=version)

            try:
                await self._call("delete objects", key, delete_version)
            except PermissionDenied:
                # Locked after all (a lock set meanwhile, or clocks that disagree): say until
                # when, or repeat the refusal if it was not the lock.
                again = await self.locked_until(key)
                if again is None:
                    raise
                raise self._locked(key, again) from None
        log.info("s3_deleted_versions", bucket=bucket, key=full, versions=len(versions))

    def _locked(self, key: str, until: datetime) -> ObjectLocked:
        return ObjectLocked(
            f"The object {key!r} is locked (S3 Object Lock) until {until.isoformat()}: it "
            "cannot be deleted before then.",
            until=until,
            step="delete",
        )

    async def check_object_lock(self) -> None:
        """:class:`ObjectLockMissing` unless the bucket has object lock enabled."""
        bucket = self.settings.bucket
        missing = ObjectLockMissing(
            f"The bucket {bucket!r} does not have S3 Object Lock enabled, which this "
            "destination requires (object_lock). Object lock can only be enabled on a bucket "
            "when it is created: use a bucket created with object lock, or remove object_lock.",
            step="lock",
        )

        async def configuration(client: _S3Client) -> dict[str, Any]:
            try:
                return await client.get_object_lock_configuration(Bucket=bucket)
            except bx.ClientError as exc:
                code = str((exc.response.get("Error") or {}).get("Code") or "")
                if code.startswith("ObjectLockConfigurationNotFound") or code in (
                    "NoSuchObjectLockConfiguration",
                    "NotImplemented",
                ):
                    raise missing from None
                raise

        answer = await self._call("read the object lock configuration", None, configuration)
        if (answer.get("ObjectLockConfiguration") or {}).get("ObjectLockEnabled") != "Enabled":
            raise missing

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        check_list_prefix(prefix)
        base = self._prefix
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}

            async def list_page(client: _S3Client, extra: dict[str, str] = extra) -> dict[str, Any]:
                return await client.list_objects_v2(
                    Bucket=self.settings.bucket, Prefix=base + prefix, **extra
                )

            page = await self._call("list objects", None, list_page)
            for item in page.get("Contents") or []:
                yield ObjectInfo(
                    key=item["Key"][len(base) :],
                    size=int(item.get("Size") or 0),
                    last_modified=item.get("LastModified"),
                    etag=(item.get("ETag") or "").strip('"') or None,
                )
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    async def stat(self, key: str) -> ObjectInfo:
        full = full_key(self._prefix, key)
        try:
            head = await self._call(
                "read objects",
                key,
                lambda c: c.head_object(Bucket=self.settings.bucket, Key=full),
            )
        except (ObjectNotFound, PermissionDenied):
            # A HEAD answer has no body, so no error code: a 403 may be bad credentials and a
            # 404 a missing bucket. A listing says which.
            await self._call(
                "read objects",
                None,
                lambda c: c.list_objects_v2(Bucket=self.settings.bucket, Prefix=full, MaxKeys=1),
            )
            raise
        return ObjectInfo(
            key=key,
            size=int(head.get("ContentLength") or 0),
            last_modified=head.get("LastModified"),
            etag=(head.get("ETag") or "").strip('"') or None,
            metadata=dict(head.get("Metadata") or {}),
        )

    async def check_server(self) -> None:
        """A listing of the bucket must come back as S3's ListBucketResult (which names the
        bucket): a web server, a filer or a metadata service answers otherwise, and is sent
        nothing to keep."""
        refusal = NotAnObjectStore(
            f"{self._where} does not answer like an S3 server (a listing of the bucket "
            f"{self.settings.bucket!r} did not come back as S3's): check the endpoint.",
            step="list",
        )

        async def listing(client: _S3Client) -> dict[str, Any]:
            try:
                return await client.list_objects_v2(
                    Bucket=self.settings.bucket, Prefix=self._prefix + PROBE_PREFIX, MaxKeys=1
                )
            except bx.ClientError as exc:
                # S3 explains every refused listing with an <Error><Code>; without one (botocore
                # then uses the status as the code, and turns a 200 it cannot parse into a 500)
                # the answer was not S3's.
                code = str((exc.response.get("Error") or {}).get("Code") or "")
                if not code or code.isdigit():
                    raise refusal from None
                raise

        answer = await self._call("list objects", None, listing)
        if answer.get("Name") != self.settings.bucket:
            raise refusal

    async def validate(self) -> ValidationReport:
        """See :meth:`ObjectStore.validate`. A destination that requires object lock is
        checked first for the bucket's object lock (the ``lock`` step), then its probe is
        written locked for a moment, as backups are (which needs the right to set an
        object's retention), and deleted once that lapses."""
        key = PROBE_PREFIX + uuid.uuid4().hex
        if self.settings.object_lock is None:
            return await probe(self, key)
        try:
            await self.check_server()  # nothing is asked of a server that is not S3
        except StorageError as exc:
            return ValidationReport(False, [ValidationStep("write", False, exc.code, exc.message)])
        try:
            await self.check_object_lock()
        except StorageError as exc:
            return ValidationReport(False, [ValidationStep("lock", False, exc.code, exc.message)])
        now = datetime.now(UTC)
        until = now.replace(microsecond=0) + timedelta(seconds=PROBE_LOCK_SECONDS)

        async def locked_upload(name: str, chunks: AsyncIterator[bytes]) -> StoredObject:
            return await self.upload(name, chunks, retain_until=until)

        report = await probe(self, key, upload=locked_upload, locked_until=until)
        return ValidationReport(report.ok, [ValidationStep("lock", True), *report.steps])

    async def aclose(self) -> None:
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
        async with self._client_lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await self._stack.aclose()


def _connector_args(policy: egress.EgressPolicy | None) -> dict[str, Any] | None:
    if policy is None:
        return None
    return {"resolver": egress.EgressResolver(policy)}


def _rewound(part: io.BytesIO) -> io.BytesIO:
    part.seek(0)
    return part


def _total_size(answer: dict[str, Any]) -> int | None:
    """The object's size from a ranged answer's ``Content-Range`` (None for a whole object)."""
    content_range = answer.get("ContentRange") or ""
    size = content_range.rpartition("/")[2]
    return int(size) if size.isdigit() else None


def _replaced_while_read(key: str) -> StorageError:
    """A ranged read's ETag no longer matches: the object changed between two of its ranges."""
    return StorageError(f"The object {key!r} was replaced while it was being read.", step="read")
