"""OpenStack Swift destinations through python-swiftclient.

swiftclient is blocking and a ``Connection`` is not thread-safe, so every request runs in a
bounded pool of worker threads, each with a connection of its own; all of them share one
authentication (auth v1, or Keystone v3 through keystoneauth1), obtained once and renewed on a
401. Objects larger than one segment become static large objects: segments of ``part_size``
bytes in ``<container>_segments`` (swiftclient's convention), named
``<key>/slo/<upload id>/<n>``, at most ``max_concurrency`` in flight, then a manifest PUT with
``multipart-manifest=put`` (nested manifests past the cluster's ``max_manifest_segments``). A
failed or cancelled upload deletes its segments; deleting an object uses
``multipart-manifest=delete`` and also removes segments an interrupted upload of that key left.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import email.utils
import functools
import hashlib
import io
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import IO, TYPE_CHECKING, Any, TypeVar
from urllib.parse import ParseResult, urlsplit, urlunsplit

import requests
import structlog
import urllib3

from storage import egress
from storage._clients import (
    ClientException,
    Connection,
    Headers,
    HTTPConnection,
    ObjectBody,
    http_connection,
    logger_settings,
    put_object,
)
from storage._support import (
    ATTEMPTS,
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
    step_of,
    tls_reason,
    with_retries,
)
from storage.base import (
    AuthenticationFailed,
    ContainerNotFound,
    EndpointUnreachable,
    NotAnObjectStore,
    ObjectInfo,
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
from storage.settings import SwiftSettings, TransferSettings, check_url
from storage.validation import VALIDATION_ATTEMPTS, probe

if TYPE_CHECKING:
    # Imported when a Keystone destination is used (see _keystone_session), not before.
    from keystoneauth1 import session as ks_session

log = structlog.get_logger("storage.swift")

# swiftclient logs failed requests with their headers, revealing up to 16 characters of
# X-Auth-Token / X-Auth-Key: reveal none.
logger_settings["redact_sensitive_headers"] = True
logger_settings["reveal_sensitive_prefix"] = 0
# At INFO it logs every failed answer's reason phrase, headers and body: text the remote server
# chose, which no log line of ours repeats.
logging.getLogger("swiftclient").setLevel(logging.WARNING)

T = TypeVar("T")

DOWNLOAD_CHUNK = 1024 * 1024
DEFAULT_MAX_MANIFEST_SEGMENTS = 1000
MAX_THREADS = 32
"""Worker threads for blocking Swift requests in this process, shared by every store: however
many stores are open at once (a validation, a backup, a restore each open one), at most this
many requests are in flight; the others wait their turn."""
LISTING_LIMIT = 1000
OCTETS = "application/octet-stream"


class _V1Auth:
    """Auth v1 (tempauth, swauth, ...) shaped like the keystoneauth session swiftclient accepts:
    one token for every worker thread, fetched once, dropped on a 401 and fetched again."""

    def __init__(self, settings: SwiftSettings, timeout: tuple[float, float]) -> None:
        self._settings = settings
        self._timeout = timeout
        self._lock = threading.Lock()
        self._url: str | None = None
        self._token: str | None = None

    def _fetch(self) -> tuple[str, str]:
        with self._lock:
            if self._url is None or self._token is None:
                self._url, self._token = _get_auth_1_0(self._settings, self._timeout)
            return self._url, self._token

    def get_endpoint(self, **_: Any) -> str:
        return self._fetch()[0]

    def get_token(self, **_: Any) -> str:
        return self._fetch()[1]

    def invalidate(self, *_: Any) -> bool:
        with self._lock:
            self._url = self._token = None
        return True


class _KeystoneAuth:
    """A keystoneauth1 session (thread-safe, renews its token) that says so plainly when the
    catalog has no object-store endpoint, where keystoneauth would answer None."""

    def __init__(self, settings: SwiftSettings, transfer: TransferSettings) -> None:
        self._settings = settings
        self._session = _keystone_session(settings, transfer)

    def get_endpoint(self, **kwargs: Any) -> str:
        url = self._session.get_endpoint(**kwargs)
        if not url:
            raise _no_endpoint(self._settings)
        return url

    def get_token(self, **kwargs: Any) -> str | None:
        return self._session.get_token(**kwargs)

    def invalidate(self, *args: Any) -> bool:
        # True even when another worker already dropped the token: keystoneauth answers False
        # then, and swiftclient would give up instead of retrying with the new token.
        self._session.invalidate(*args)
        return True


class _Connection(Connection):
    """swiftclient's connection, except that a body may be sent again after the token was
    renewed (with ``retries=0`` swiftclient refuses to), and that it does not hold on to the
    last body it sent; its connections are guarded (egress policy, no redirect)."""

    def http_connection(self, url: str | None = None) -> tuple[ParseResult, HTTPConnection]:
        parsed, conn = super().http_connection(url)
        return parsed, _guarded(conn)

    def put_object(
        self, container: str, obj: str, contents: bytes | IO[bytes], **kwargs: Any
    ) -> str:
        try:
            if isinstance(contents, io.BytesIO):
                contents.seek(0)
                rewind = functools.partial(_rewind, contents)
                return self._retry(rewind, put_object, container, obj, contents, **kwargs)
            if isinstance(contents, bytes):
                return self._retry(None, put_object, container, obj, contents, **kwargs)
            return super().put_object(container, obj, contents, **kwargs)
        finally:
            # requests keeps the last response, and through it the request with its body: a
            # whole segment per worker thread, for as long as the thread lives.
            if self.http_conn:
                self.http_conn[1].resp = None


def _rewind(contents: io.BytesIO, *_: Any, **__: Any) -> None:
    contents.seek(0)


def _guarded(conn: HTTPConnection) -> HTTPConnection:
    """``conn`` connecting only where the egress policy allows, following no redirect (a 3xx
    is an error: followed, it would carry the token or key to wherever it points)."""
    egress.guard_session(conn.request_session, egress.installed())
    conn.requests_args["allow_redirects"] = False
    return conn


def _get_auth_1_0(settings: SwiftSettings, timeout: tuple[float, float]) -> tuple[str, str]:
    """swiftclient's ``get_auth_1_0`` on a guarded connection (see :func:`_guarded`)."""
    s = settings
    parsed, conn = http_connection(
        s.auth_url, cacert=s.ca_bundle, insecure=not s.verify_tls, timeout=timeout
    )
    _guarded(conn)
    try:
        headers = {"X-Auth-User": s.username, "X-Auth-Key": s.password.get_secret_value()}
        conn.request("GET", parsed.path, "", headers)
        resp = conn.getresponse()
        body = resp.read()
        resp.close()
    finally:
        conn.close()
    url = resp.getheader("x-storage-url")
    token = resp.getheader("x-storage-token", resp.getheader("x-auth-token"))
    if resp.status < 200 or resp.status >= 300:
        raise ClientException.from_response(resp, "Auth GET failed", body)
    if not url or not token:
        # A web page or anything else that answers 200: saying "refused" would mislead.
        raise NotAnObjectStore(
            f"{parsed.netloc} answered the auth v1 request without a storage URL and token: it "
            "does not speak Swift's auth v1; check auth_url and auth_version.",
            step="connect",
        )
    return url, token


def _keystone_session(settings: SwiftSettings, transfer: TransferSettings) -> ks_session.Session:
    from keystoneauth1 import session as ks_session
    from keystoneauth1.identity import v3

    parts = urlsplit(settings.auth_url)
    path = parts.path.rstrip("/")
    if not re.search(r"/v3$", path):
        path += "/v3"
    auth_url = urlunsplit(parts._replace(path=path))
    auth: v3.ApplicationCredential | v3.Password
    secret = settings.application_credential_secret
    if secret is not None:
        # Bound to its project: no scope to ask for. By name, it is the owner's.
        by_name = settings.application_credential_id is None
        auth = v3.ApplicationCredential(
            auth_url=auth_url,
            application_credential_id=settings.application_credential_id,
            application_credential_name=settings.application_credential_name,
            application_credential_secret=secret.get_secret_value(),
            username=settings.username if by_name else None,
            user_domain_name=(settings.user_domain_name or "Default") if by_name else None,
        )
    else:
        auth = v3.Password(
            auth_url=auth_url,
            username=settings.username,
            password=settings.password.get_secret_value(),
            user_domain_name=settings.user_domain_name or "Default",
            project_name=settings.project_name,
            project_domain_name=settings.project_domain_name or "Default",
        )
    verify: bool | str = (settings.ca_bundle or True) if settings.verify_tls else False
    return ks_session.Session(
        auth=auth,
        verify=verify,
        timeout=transfer.read_timeout,
        session=egress.guard_session(requests.Session(), egress.installed()),
        redirect=False,  # a 3xx is an error: followed, it would carry the password along
    )


class SwiftStore(ObjectStore):
    """One container (plus the settings' key prefix) of an OpenStack Swift account."""

    def __init__(self, settings: SwiftSettings, transfer: TransferSettings | None = None) -> None:
        self.settings = settings
        self.transfer = transfer or TransferSettings()
        t = self.transfer
        self._timeout = (t.connect_timeout, t.read_timeout)
        self._prefix = normalise_prefix(settings.prefix)
        self._container = settings.container
        self._segments = f"{settings.container}_segments"
        self._secrets = tuple(
            secret.get_secret_value()
            for secret in (settings.password, settings.application_credential_secret)
            if secret is not None and secret.get_secret_value()
        )
        self._auth: _V1Auth | _KeystoneAuth = (
            _V1Auth(settings, self._timeout)
            if settings.auth_version == "1"
            else _KeystoneAuth(settings, t)
        )
        self._pool = _shared_pool()
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._local = threading.local()
        self._connections: list[Connection] = []
        self._connections_lock = threading.Lock()
        self._pending: set[asyncio.Task[None]] = set()
        self._container_checked: dict[str, str | None] | None = None
        self._segments_ready = False
        self._max_segments: int | None = None
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"SwiftStore(auth_url={self.settings.auth_url!r}, "
            f"container={self.settings.container!r}, prefix={self.settings.prefix!r})"
        )

    # ------------------------------------------------------------------ plumbing

    def _new_connection(self, *, shared: bool = True) -> Connection:
        s = self.settings
        conn = _Connection(
            session=self._auth,
            os_options={
                "service_type": "object-store",
                "endpoint_type": s.interface,
                "region_name": s.region_name,
            },
            retries=0,  # ours are classified and bounded; a 401 still renews the token once
            starting_backoff=0.05,  # swiftclient sleeps that long before using the new token
            cacert=s.ca_bundle,
            insecure=not s.verify_tls,
            timeout=self._timeout,
        )
        if shared:
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    def _thread_connection(self) -> Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._new_connection()
        return conn

    async def _call(
        self,
        doing: str,
        key: str | None,
        fn: Callable[[Connection], T],
        *,
        missing: str = "object",
        tracker: set[concurrent.futures.Future[Any]] | None = None,
        conn: Connection | None = None,
    ) -> T:
        """``fn(connection)`` in a worker thread, classified and retried when transient.
        ``missing`` says what a 404 means: "object", "container" or "ok"."""

        def in_thread() -> T:
            return fn(conn or self._thread_connection())

        async def once() -> T:
            if self._closed:
                raise StorageError("The storage connection is closed.")
            future = self._pool.submit(in_thread)
            self._futures.add(future)
            future.add_done_callback(self._futures.discard)
            if tracker is not None:
                tracker.add(future)
            try:
                return await asyncio.wrap_future(future)
            except StorageError:
                raise
            except Exception as exc:
                raise self._safely_classified(exc, doing, key, missing) from None

        return await with_retries(self.transfer, doing, once)

    def _safely_classified(
        self, exc: BaseException, doing: str, key: str | None, missing: str
    ) -> StorageError:
        return classify_safely(
            lambda: self._classify(exc, doing, key, missing),
            exc,
            doing,
            backend="swift",
            where="Swift",
        )

    def _classify(
        self, exc: BaseException, doing: str, key: str | None, missing: str
    ) -> StorageError:
        s = self.settings
        step = step_of(doing)
        if isinstance(exc, ClientException):
            status = exc.http_status
            # The reason phrase and body are the server's words: only the status is repeated.
            said = f"HTTP status {status}" if status else "no usable answer"
            if exc.msg and exc.msg.startswith("Auth GET failed"):
                if status == 401:
                    return AuthenticationFailed(
                        f"{s.auth_url} refused the credentials ({said}).", step=step
                    )
                if status and status >= 500:
                    return TransientStorageError(
                        f"The auth service {s.auth_url} failed temporarily ({said}).", step=step
                    )
                return StorageError(
                    f"Authentication at {s.auth_url} failed ({said}); is it an auth v1 URL?",
                    step=step,
                )
            if status == 401:
                return AuthenticationFailed(
                    f"Swift refused the credentials while trying to {doing} ({said}).", step=step
                )
            if status == 403:
                where = "" if "'" in doing else f" in the container {self._container!r}"
                return PermissionDenied(
                    f"The credentials may not {doing}{where} ({said}).", step=step
                )
            if status == 404:
                if missing == "container":
                    return ContainerNotFound(
                        f"The container {self._container!r} does not exist in the account at "
                        f"{s.auth_url}.",
                        step=step,
                    )
                return ObjectNotFound(f"The object {key!r} does not exist.", step=step)
            if status is not None and (status >= 500 or status in (408, 422, 429, 498, 499)):
                # 422: the body did not match its ETag on the way: send it again.
                return TransientStorageError(
                    f"Swift failed temporarily while trying to {doing} ({said}).", step=step
                )
            if status == 412:  # a condition (If-Match) did not hold
                return PreconditionFailed(f"Swift refused to {doing} ({said}).", step=step)
            return StorageError(f"Swift refused to {doing} ({said}).", step=step)
        ks = _keystone_error(exc, s, step, self._secrets)
        if ks is not None:
            return ks
        where = s.auth_url
        if isinstance(exc, requests.exceptions.SSLError):
            return TLSFailure(f"The TLS connection to Swift failed ({tls_reason(exc)}).", step=step)
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            return EndpointUnreachable(
                f"Swift at {where} cannot be reached (connection timed out).", step=step
            )
        if isinstance(exc, requests.exceptions.ConnectionError) and _refused(exc):
            return EndpointUnreachable(
                f"Swift at {where} cannot be reached ({plain_reason(exc, self._secrets)}).",
                step=step,
            )
        if isinstance(
            exc,
            requests.exceptions.RequestException
            | urllib3.exceptions.HTTPError
            | OSError
            | TimeoutError,
        ):
            return TransientStorageError(
                f"The connection to Swift failed while trying to {doing} "
                f"({plain_reason(exc, self._secrets)}).",
                step=step,
            )
        return StorageError(
            f"Unexpected failure while trying to {doing} on Swift "
            f"({type(exc).__name__}: {plain_reason(exc, self._secrets)}).",
            step=step,
        )

    async def _check_container(self, doing: str = "write objects") -> dict[str, str | None]:
        """The container's storage policy, once per store; :class:`ContainerNotFound` if it does
        not exist (checked before any segment is written)."""
        if self._container_checked is None:
            headers = await self._call(
                doing,
                None,
                lambda c: c.head_container(self._container),
                missing="container",
            )
            self._container_checked = {"policy": headers.get("x-storage-policy")}
        return self._container_checked

    async def _ensure_segments_container(self) -> None:
        if self._segments_ready:
            return
        policy = (await self._check_container()).get("policy")
        headers = {"X-Storage-Policy": policy} if policy else {}
        await self._call(
            f"create or write the segments container {self._segments!r}",
            None,
            lambda c: c.put_container(self._segments, headers=headers),
            missing="container",
        )
        self._segments_ready = True

    async def _manifest_limit(self) -> int:
        if self._max_segments is None:
            try:
                info = await self._call(
                    "read the cluster's limits", None, lambda c: c.get_capabilities()
                )
                limit = int((info.get("slo") or {}).get("max_manifest_segments") or 0)
            except StorageError as exc:
                log.debug("swift_info_unavailable", error=exc.code)
                limit = 0
            self._max_segments = limit if limit >= 2 else DEFAULT_MAX_MANIFEST_SEGMENTS
        return self._max_segments

    # ------------------------------------------------------------------ upload

    async def upload(self, key: str, chunks: AsyncIterator[bytes]) -> StoredObject:
        full = full_key(self._prefix, key)
        reader = PartReader(chunks)
        size = self.transfer.part_size
        first = await reader.read_file(size)
        replaced = await self._uploads_behind(full)
        if part_length(first) < size or await reader.at_end():
            etag = await asyncio.to_thread(_md5, first)
            await self._put(key, self._container, full, first, part_length(first), etag=etag)
        else:
            handed = [first]
            del first  # the large upload frees it once it is sent
            await self._large_upload(key, full, reader, handed)
        for old in replaced:  # the segments of the large object this one replaced
            await self._delete_segments(await self._segment_names(old))
        log.info("swift_uploaded", container=self._container, key=full, size=reader.size)
        return StoredObject(key=key, size=reader.size, sha256=reader.sha256)

    async def _large_upload(
        self, key: str, full: str, reader: PartReader, handed: list[io.BytesIO]
    ) -> None:
        """Segments of ``part_size`` bytes, ``max_concurrency`` of them in flight; the next one
        is read only once there is room for it."""
        await self._ensure_segments_container()
        limit = await self._manifest_limit()
        upload_id = f"{int(time.time())}-{uuid.uuid4().hex[:12]}"
        prefix = f"{full}/slo/{upload_id}/"
        futures: set[concurrent.futures.Future[Any]] = set()
        in_flight: set[asyncio.Task[dict[str, Any]]] = set()
        entries: dict[int, dict[str, Any]] = {}
        completed = False

        def reap(tasks: set[asyncio.Task[dict[str, Any]]]) -> None:
            for task in tasks:
                in_flight.discard(task)
                entry = task.result()  # raises the segment's failure
                entries[entry.pop("number")] = entry

        try:
            number, data = 1, handed.pop()
            while True:
                name = f"{prefix}{number:08d}"
                in_flight.add(
                    asyncio.create_task(self._put_segment(key, name, number, data, futures))
                )
                del data
                number += 1
                while len(in_flight) >= self.transfer.max_concurrency:
                    done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    reap(done)
                data = await reader.read_file(self.transfer.part_size)
                if not part_length(data):
                    break
            while in_flight:
                done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                reap(done)
            manifest = [entries[n] for n in sorted(entries)]
            manifest = await self._nest(key, prefix, manifest, limit, futures)
            body = json.dumps(manifest).encode()
            await self._put(
                key, self._container, full, body, len(body), query_string="multipart-manifest=put"
            )
            completed = True
        finally:
            if not completed:
                await finish_cleanup(
                    self._abandon(full, prefix, list(in_flight), futures), self._pending
                )

    async def _put(
        self,
        key: str,
        container: str,
        name: str,
        contents: bytes | IO[bytes],
        length: int,
        tracker: set[concurrent.futures.Future[Any]] | None = None,
        *,
        etag: str | None = None,
        query_string: str | None = None,
    ) -> str:
        """Write one object of ``key``'s upload (the whole object, a segment, or a manifest
        with ``query_string="multipart-manifest=put"``); Swift's ETag of it. With ``etag``
        Swift checks the bytes it received against it."""
        return await self._call(
            "write objects",
            key,
            lambda c: c.put_object(
                container,
                name,
                contents=contents,
                content_length=length,
                content_type=OCTETS,
                etag=etag,
                query_string=query_string,
            ),
            missing="container",
            tracker=tracker,
        )

    async def _put_segment(
        self,
        key: str,
        name: str,
        number: int,
        data: io.BytesIO,
        futures: set[concurrent.futures.Future[Any]],
    ) -> dict[str, Any]:
        size = part_length(data)
        etag = await asyncio.to_thread(_md5, data)
        stored = await self._put(key, self._segments, name, data, size, futures, etag=etag)
        if stored and stored.strip('"') != etag:
            raise TransientStorageError(
                f"Swift stored segment {number} of {key!r} with ETag {stored}, not {etag}.",
                step="write",
            )
        return {
            "number": number,
            "path": f"/{self._segments}/{name}",
            "etag": etag,
            "size_bytes": size,
        }

    async def _nest(
        self,
        key: str,
        prefix: str,
        entries: list[dict[str, Any]],
        limit: int,
        futures: set[concurrent.futures.Future[Any]],
    ) -> list[dict[str, Any]]:
        """Past ``limit`` segments, group them into sub-manifests (SLOs nest), level by level."""
        level = 0
        while len(entries) > limit:
            level += 1
            grouped: list[dict[str, Any]] = []
            for g in range(0, len(entries), limit):
                group = entries[g : g + limit]
                name = f"{prefix}manifest-{level}-{g // limit:06d}"
                body = json.dumps(group).encode()
                await self._put(
                    key,
                    self._segments,
                    name,
                    body,
                    len(body),
                    futures,
                    query_string="multipart-manifest=put",
                )
                grouped.append(
                    {
                        "path": f"/{self._segments}/{name}",
                        "etag": None,
                        "size_bytes": sum(e["size_bytes"] for e in group),
                    }
                )
            entries = grouped
        return entries

    async def _abandon(
        self,
        full: str,
        prefix: str,
        tasks: list[asyncio.Task[Any]],
        futures: set[concurrent.futures.Future[Any]],
    ) -> None:
        """Delete what a failed upload stored, after every request it started has ended (a
        segment PUT still running in a thread would otherwise land after the cleanup)."""
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for future in list(futures):
            with contextlib.suppress(BaseException):
                await asyncio.wrap_future(future)
        try:
            names = await self._segment_names(prefix)
            await self._delete_segments(names)
            log.info("swift_upload_abandoned", key=full, segments_deleted=len(names))
        except StorageError as exc:
            log.error(
                "swift_segments_left",
                container=self._segments,
                prefix=prefix,
                error=exc.code,
                detail=exc.message,
            )

    async def _segment_names(self, prefix: str) -> list[str]:
        return [item["name"] for item in await self._listing(self._segments, prefix, missing="ok")]

    async def _delete_segments(self, names: list[str]) -> None:
        """Delete objects of the segments container (segments and sub-manifests alike, as plain
        objects), ``max_concurrency`` at a time."""
        semaphore = asyncio.Semaphore(self.transfer.max_concurrency)

        async def one(name: str) -> None:
            async with semaphore:
                await self._call(
                    "delete objects",
                    name,
                    lambda c: c.delete_object(self._segments, name),
                    missing="ok",
                )

        results = await asyncio.gather(*(one(n) for n in names), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, ObjectNotFound):
                raise result

    async def _uploads_behind(self, full: str) -> set[str]:
        """If the object now under ``full`` is a static large object this store wrote, the
        segment prefixes of its upload(s): an overwrite deletes them once the new object is in
        place (Swift itself would keep them forever)."""
        try:
            headers = await self._call(
                "write objects", full, lambda c: c.head_object(self._container, full)
            )
        except ObjectNotFound:
            return set()
        if not _is_slo(headers):
            return set()
        _, body = await self._call(
            "write objects",
            full,
            lambda c: c.get_object(self._container, full, query_string="multipart-manifest=get"),
        )
        ours = re.compile(re.escape(f"/{self._segments}/{full}/slo/") + r"[^/]+/")
        return {
            m.group(0)[len(self._segments) + 2 :]
            for entry in json.loads(body)
            if (m := ours.match(entry.get("name", "")))
        }

    # ------------------------------------------------------------------ download

    async def download(
        self, key: str, *, expected_sha256: str | None = None
    ) -> AsyncIterator[bytes]:
        full = full_key(self._prefix, key)
        verifier = Verifier(key, expected_sha256)
        loop = asyncio.get_running_loop()
        # A connection of its own: the response is read chunk by chunk from whichever worker
        # thread is free, and nothing else may use that connection meanwhile.
        conn = self._new_connection(shared=False)
        etag: str | None = None
        failures = 0
        try:
            while True:
                offset = verifier.size
                headers: dict[str, str] = {}
                if offset:
                    headers["Range"] = f"bytes={offset}-"
                    if etag:
                        headers["If-Match"] = etag
                try:
                    answer, body = await self._call(
                        "read objects",
                        key,
                        functools.partial(
                            _get_streamed, container=self._container, name=full, headers=headers
                        ),
                        conn=conn,
                    )
                except ObjectNotFound:
                    if not offset:
                        await self._check_container("read objects")  # or the container?
                    raise
                except PreconditionFailed:
                    if not offset:
                        raise
                    raise StorageError(
                        f"The object {key!r} was replaced while it was being read.",
                        step="read",
                    ) from None
                etag = etag or answer.get("etag")
                try:
                    while True:
                        try:
                            chunk = await loop.run_in_executor(self._pool, next, body, b"")
                        except Exception as exc:
                            raise self._safely_classified(
                                exc, "read objects", key, "object"
                            ) from None
                        if not chunk:
                            break
                        await verifier.update(chunk)
                        yield chunk
                    break
                except StorageError as exc:
                    failures += 1
                    if not exc.transient or failures >= self.transfer.max_attempts:
                        raise
                    log.warning(
                        "swift_download_resume", key=full, offset=verifier.size, error=exc.code
                    )
                    await asyncio.sleep(resume_delay(self.transfer, failures))
                finally:
                    with contextlib.suppress(Exception):
                        body.close()
            verifier.finish()
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    # ------------------------------------------------------------------ the rest

    async def delete(self, key: str) -> None:
        full = full_key(self._prefix, key)
        try:
            headers = await self._call(
                "delete objects", key, lambda c: c.head_object(self._container, full)
            )
            # multipart-manifest=delete removes a manifest and its segments, but answers 200
            # and deletes nothing when the object is not a manifest: ask first.
            query = "multipart-manifest=delete" if _is_slo(headers) else None
            await self._call(
                "delete objects",
                key,
                lambda c: c.delete_object(self._container, full, query_string=query),
            )
        except ObjectNotFound:
            await self._check_container("delete objects")  # unlike the object, an error
        # Segments of an upload of this key that never finished (a crashed writer).
        pattern = re.compile(re.escape(full) + r"/slo/[^/]+/[^/]+")
        try:
            names = await self._segment_names(f"{full}/slo/")
        except PermissionDenied:
            return  # a user who may not read the segments container cannot have written there
        leftovers = [name for name in names if pattern.fullmatch(name)]
        if leftovers:
            await self._delete_segments(leftovers)
            log.info("swift_orphan_segments_deleted", key=full, count=len(leftovers))

    async def _listing(
        self, container: str, prefix: str, *, missing: str = "container"
    ) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        async for page in self._pages(container, prefix, missing=missing):
            items.extend(page)
        return items

    async def _pages(
        self, container: str, prefix: str, *, missing: str = "container"
    ) -> AsyncIterator[list[dict[str, Any]]]:
        marker = ""
        while True:
            try:
                _, page = await self._call(
                    "list objects" if container == self._container else f"list {container!r}",
                    None,
                    functools.partial(
                        _get_listing_page, container=container, prefix=prefix, marker=marker
                    ),
                    missing="container" if missing == "container" else "object",
                )
            except ObjectNotFound:
                return  # missing == "ok": no such container, nothing in it
            if not page:
                return
            if not isinstance(page, list) or not all(
                isinstance(item, dict) and isinstance(item.get("name"), str) for item in page
            ):
                # JSON, but not a listing: the storage URL the auth service gave is not Swift.
                raise NotAnObjectStore(
                    f"The storage URL that {self.settings.auth_url} gave answered a listing "
                    "that is not Swift's; check auth_url.",
                    step="list",
                )
            yield page
            marker = page[-1]["name"]

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        check_list_prefix(prefix)
        base = self._prefix
        async for page in self._pages(self._container, base + prefix):
            for item in page:
                yield ObjectInfo(
                    key=item["name"][len(base) :],
                    size=int(item.get("bytes") or 0),
                    last_modified=_listing_time(item.get("last_modified")),
                    etag=(item.get("hash") or "").strip('"') or None,
                )

    async def stat(self, key: str) -> ObjectInfo:
        full = full_key(self._prefix, key)
        try:
            headers = await self._call(
                "read objects", key, lambda c: c.head_object(self._container, full)
            )
        except ObjectNotFound:
            await self._check_container("read objects")  # 404 for a missing container too
            raise
        return ObjectInfo(
            key=key,
            size=int(headers.get("content-length") or 0),
            last_modified=_http_time(headers.get("last-modified")),
            etag=(headers.get("etag") or "").strip('"') or None,
            metadata={
                k[len("x-object-meta-") :]: v
                for k, v in headers.items()
                if k.startswith("x-object-meta-")
            },
        )

    async def check_server(self) -> None:
        """Nothing to add: authentication is the handshake (auth v1's storage URL and token,
        Keystone's token and catalog), so a server that is not Swift fails before the probe
        writes anything."""

    async def validate(self) -> ValidationReport:
        """The probe, then the same in the segments container (creating it if need be): large
        backups write there, and a destination that can take only small ones is not valid."""
        name = PROBE_PREFIX + uuid.uuid4().hex
        report = await probe(self, name)
        if not report.ok:
            return report
        token = ATTEMPTS.set(VALIDATION_ATTEMPTS)
        try:
            await self._ensure_segments_container()
            doing = f"create or write the segments container {self._segments!r}"
            await self._call(
                doing,
                None,
                lambda c: c.put_object(self._segments, name, b"probe", content_type=OCTETS),
                missing="container",
            )
            with contextlib.suppress(ObjectNotFound):
                await self._call(doing, None, lambda c: c.delete_object(self._segments, name))
        except StorageError as exc:
            failed = ValidationStep("write", False, exc.code, exc.message)
            return ValidationReport(False, [*report.steps, failed])
        finally:
            ATTEMPTS.reset(token)
        # The answer names the endpoint the catalog (or auth v1) gave: where backups will go.
        s = self.settings
        url = await self._call(
            "find the storage endpoint",
            None,
            lambda _: self._auth.get_endpoint(
                service_type="object-store", interface=s.interface, region_name=s.region_name
            ),
        )
        written = ValidationStep("write", True, None, self._endpoint_used(url))
        return ValidationReport(report.ok, [written, *report.steps[1:]])

    def _endpoint_used(self, url: str | None) -> str:
        s = self.settings
        shown = shown_endpoint(url)
        if s.auth_version == "1":
            where = f"the storage URL {shown}" if shown else "the storage URL auth v1 gave"
            return f"Written through {where}."
        chosen = f"{s.interface}, region {s.region_name!r}" if s.region_name else s.interface
        where = (
            f"the object-store endpoint {shown}"
            if shown
            else "an object-store endpoint whose URL is not a plain URL (not shown)"
        )
        return f"Written through {where} ({chosen}) of the identity service's catalog."

    async def aclose(self) -> None:
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
        self._closed = True
        # Requests not started are dropped. One still running ends by its own timeouts in its
        # thread: waiting for it here would hold the caller that long again (a server that
        # never answers held a cancelled validation for the whole read timeout).
        for future in list(self._futures):
            future.cancel()
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            with contextlib.suppress(Exception):
                conn.close()


_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _shared_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The process's pool for blocking Swift requests (see :data:`MAX_THREADS`)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(
                max_workers=MAX_THREADS, thread_name_prefix="swift"
            )
        return _POOL


def _get_streamed(
    conn: Connection, *, container: str, name: str, headers: Headers
) -> tuple[Headers, ObjectBody]:
    """A GET of an object whose body is read chunk by chunk (ranged when ``headers`` say so)."""
    return conn.get_object(container, name, resp_chunk_size=DOWNLOAD_CHUNK, headers=headers)


def _get_listing_page(
    conn: Connection, *, container: str, prefix: str, marker: str
) -> tuple[Headers, list[dict[str, Any]]]:
    """One page of a container's listing: the objects after ``marker``."""
    return conn.get_container(container, prefix=prefix, marker=marker, limit=LISTING_LIMIT)


def _is_slo(headers: dict[str, str]) -> bool:
    return str(headers.get("x-static-large-object", "")).lower() == "true"


def _md5(data: io.BytesIO) -> str:
    with data.getbuffer() as view:
        return hashlib.md5(view, usedforsecurity=False).hexdigest()


def _refused(exc: BaseException) -> bool:
    """A connection that never opened (refused, no route, unknown host), as opposed to one
    that broke midway."""
    text = str(exc).lower()
    return any(
        s in text
        for s in (
            "refused",
            "failed to establish",
            "name or service not known",
            "no route",
            "nodename nor servname",
            "temporary failure in name resolution",
        )
    )


def _keystone_error(
    exc: BaseException, s: SwiftSettings, step: str, secrets: tuple[str, ...]
) -> StorageError | None:
    try:
        from keystoneauth1 import exceptions as ka
    except ImportError:  # pragma: no cover - keystoneauth1 is a dependency
        return None
    if not isinstance(exc, ka.ClientException):
        return None
    where = s.auth_url
    if isinstance(exc, ka.Unauthorized):
        return AuthenticationFailed(
            f"{where} refused the credentials ({_credential(s)}).", step=step
        )
    if isinstance(exc, ka.NotFound) and s.application_credential_id:
        # Keystone's answer for an id it does not know: deleted (revoked) or never made.
        return AuthenticationFailed(
            f"{where} does not know {_credential(s)}: it was deleted (revoked) or never "
            "existed; create a new one and update the destination.",
            step=step,
        )
    if isinstance(exc, ka.Forbidden):
        return PermissionDenied(
            f"{where} did not let the user use project {s.project_name!r}.", step=step
        )
    if isinstance(exc, ka.SSLError):
        return TLSFailure(f"The TLS connection to {where} failed ({tls_reason(exc)}).", step=step)
    if isinstance(exc, ka.ConnectTimeout | ka.ConnectFailure):
        return EndpointUnreachable(
            f"The identity service {where} cannot be reached ({plain_reason(exc, secrets)}).",
            step=step,
        )
    if isinstance(exc, ka.EndpointNotFound | ka.EmptyCatalog):
        return _no_endpoint(s, step)
    if isinstance(exc, ka.RetriableConnectionFailure):
        return TransientStorageError(
            f"The identity service {where} failed temporarily ({plain_reason(exc, secrets)}).",
            step=step,
        )
    status = getattr(exc, "http_status", None)
    if isinstance(status, int) and status >= 500:
        return TransientStorageError(
            f"The identity service {where} failed temporarily (HTTP status {status}).", step=step
        )
    # Keystone's error text is the server's words: the status and the kind of failure only.
    said = f"HTTP status {status}" if isinstance(status, int) else type(exc).__name__
    return StorageError(
        f"Authentication at {where} failed ({said}); is it a Keystone v3 URL?", step=step
    )


def _no_endpoint(settings: SwiftSettings, step: str | None = None) -> StorageError:
    """Keystone authenticated the user, but its catalog has nowhere to send Swift requests."""
    region = f" in region {settings.region_name!r}" if settings.region_name else ""
    project = (
        "the application credential's project"
        if settings.uses_application_credential
        else f"project {settings.project_name!r}"
    )
    return StorageError(
        f"The identity service lists no {settings.interface} object-store endpoint{region} for "
        f"{project}.",
        step=step,
    )


def _credential(settings: SwiftSettings) -> str:
    """Who authenticated, in the settings' own words (never a secret)."""
    if settings.application_credential_id:
        return f"the application credential {settings.application_credential_id!r}"
    if settings.uses_application_credential:
        return (
            f"the application credential {settings.application_credential_name!r} of user "
            f"{settings.username!r} in domain {settings.user_domain_name!r}"
        )
    return (
        f"user {settings.username!r} in domain {settings.user_domain_name!r}, project "
        f"{settings.project_name!r}"
    )


_PLAIN_PATH = re.compile(r"^[A-Za-z0-9._~/-]{0,256}$")


def shown_endpoint(url: str | None) -> str | None:
    """``url`` (an object-store endpoint the auth service handed out) if it may be shown: an
    http(s) URL of a well-formed host and port whose path is plain (letters, digits and
    ``._~/-``), rebuilt from its parts; None for anything else. The auth service is the
    tenant's choice, so this is text a server chose: confined to the shape of a URL, it can
    name where the backups go but carry no markup, spaces or message."""
    if not url:
        return None
    try:
        check_url(url)
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if not _PLAIN_PATH.match(parts.path) or parts.hostname is None:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}{parts.path}"


def _listing_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC)
    except ValueError:
        return None


def _http_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
