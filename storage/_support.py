"""What both backends share: key rules, cutting a byte stream into parts, retries, plain reasons.

Nothing here talks to a server.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextvars import ContextVar
from typing import Any, TypeVar

import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from storage.base import ChecksumMismatch, InvalidKey, StorageError
from storage.settings import TransferSettings, _check_prefix

log = structlog.get_logger("storage")

T = TypeVar("T")

MAX_KEY_BYTES = 1024
"""S3's limit on a key, and Swift's default limit on an object name."""

PROBE_PREFIX = ".osb-backup-probe-"
"""Objects written by :meth:`ObjectStore.validate`; no backup is ever named like this."""

ATTEMPTS: ContextVar[int | None] = ContextVar("storage_attempts", default=None)
"""Overrides ``TransferSettings.max_attempts`` in a context (validation answers quickly)."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def normalise_prefix(prefix: str) -> str:
    """The settings' key prefix as stored: relative, '' or ending in '/'."""
    return _check_prefix(prefix or "")


def full_key(prefix: str, key: str) -> str:
    """``prefix + key`` after checking ``key`` is a relative, well-formed object key."""
    if not isinstance(key, str) or not key:
        raise InvalidKey("An object key must be a non-empty string.")
    if key.startswith("/") or key.endswith("/"):
        raise InvalidKey(f"The object key {key!r} must not start or end with '/'.")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidKey(
            f"The object key {key!r} must not contain empty, '.' or '..' path segments."
        )
    if _CONTROL.search(key):
        raise InvalidKey("An object key must not contain control characters.")
    full = prefix + key
    if len(full.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidKey(
            f"The object key (with the destination's prefix) is longer than {MAX_KEY_BYTES} bytes."
        )
    return full


def check_list_prefix(prefix: str) -> None:
    if not isinstance(prefix, str) or prefix.startswith("/") or ".." in prefix.split("/"):
        raise InvalidKey("A listing prefix must be relative and must not contain '..'.")


def short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_PLAIN_REASONS = (
    ("refused", "connection refused"),
    ("name or service not known", "host name not found"),
    ("nodename nor servname", "host name not found"),
    ("temporary failure in name resolution", "host name not found"),
    ("no route to host", "no route to host"),
    ("network is unreachable", "network unreachable"),
    ("certificate verify failed", "certificate verify failed"),
    ("wrong version number", "the endpoint does not speak TLS"),
    ("timed out", "timed out"),
    ("timeout", "timed out"),
    ("reset by peer", "connection reset"),
    ("server disconnected", "the server closed the connection"),
    ("remote end closed", "the server closed the connection"),
    ("not enough data", "the answer was cut short"),
    ("badstatusline", "the answer was not HTTP"),
    ("bad status line", "the answer was not HTTP"),
    ("invalid http", "the answer was not HTTP"),
    ("invalid status", "the answer was not HTTP"),
    ("invalid constant string", "the answer was not HTTP"),
)


_PLAIN_ERRORS: tuple[tuple[type[BaseException], str], ...] = (
    (ConnectionRefusedError, "connection refused"),
    (ConnectionResetError, "connection reset"),
    (socket.gaierror, "host name not found"),
    (TimeoutError, "timed out"),
)


def tls_reason(exc: BaseException) -> str:
    """Why a TLS handshake failed, keeping the TLS library's own words (users search them)."""
    for cause in _causes(exc):
        verify = getattr(cause, "verify_message", None)
        if isinstance(cause, ssl.SSLCertVerificationError) and verify:
            return f"certificate verify failed: {verify}"
        reason = getattr(cause, "reason", None)  # aiohttp's SSL errors subclass SSLError
        if isinstance(cause, ssl.SSLError) and isinstance(reason, str) and reason:
            if reason == "WRONG_VERSION_NUMBER":
                return "wrong version number: the endpoint does not speak TLS on that port"
            return reason.replace("_", " ").lower()
    return plain_reason(exc)


def _causes(exc: BaseException) -> list[object]:
    """``exc`` and what it wraps: botocore's ``error``, aiohttp's ``os_error``, the chain."""
    causes: list[object] = []
    todo: list[object] = [exc]
    while todo and len(causes) < 8:
        item = todo.pop()
        if item is None or any(item is c for c in causes):
            continue
        causes.append(item)
        todo += [
            getattr(item, "kwargs", {}).get("error"),
            getattr(item, "os_error", None),
            getattr(item, "__cause__", None),
            getattr(item, "__context__", None),
        ]
    return causes


def plain_reason(exc: BaseException, secrets: Iterable[str | None] = ()) -> str:
    """What went wrong with a connection, in a few words of ours rather than a client's text:
    that text may quote what the server sent (a status line, a body), so it is only searched
    for a known cause, never repeated. ``secrets`` is kept for callers; nothing is echoed."""
    causes = _causes(exc)
    for cause in causes:
        for kind, words in _PLAIN_ERRORS:
            if isinstance(cause, kind):
                return words
    lowered = " ".join(f"{type(c).__name__} {c}" for c in causes).lower()
    for hint, words in _PLAIN_REASONS:
        if hint in lowered:
            return words
    return f"the connection failed: {type(exc).__name__}"


def step_of(doing: str) -> str:
    """The step of a destination check ("write", "read", "delete", "list") that a request
    belongs to, from the words saying what it was doing ("write objects", "abort a multipart
    upload", "create or write the segments container", "list objects", ...)."""
    if doing.startswith(("write", "create", "abort")):
        return "write"
    if doing.startswith("delete"):
        return "delete"
    if doing.startswith("list"):
        return "list"
    return "read"


def classify_safely(
    classify: Callable[[], StorageError],
    exc: BaseException,
    doing: str,
    *,
    backend: str,
    where: str,
) -> StorageError:
    """``classify()``, a backend's classification of ``exc``; should the classifier itself fail
    on something a client raised unforeseen, an error that still says what was being done."""
    try:
        return classify()
    except Exception as failure:
        # Types only: a traceback would carry text the remote server chose.
        log.error(
            f"{backend}_unclassified_error",
            error=type(exc).__name__,
            classifier_error=type(failure).__name__,
        )
        return StorageError(
            f"Unexpected failure while trying to {doing} on {where} ({type(exc).__name__}).",
            step=step_of(doing),
        )


def resume_delay(transfer: TransferSettings, failures: int) -> float:
    """How long a download waits before it resumes after its ``failures``-th transient
    failure (exponential, at most ``backoff_max``)."""
    return min(transfer.backoff_max, transfer.backoff_initial * 2.0**failures)


def part_length(part: io.BytesIO) -> int:
    """The size of a part held in memory, without copying it."""
    with part.getbuffer() as view:
        return view.nbytes


class PartReader:
    """Cuts an async stream of chunks of any sizes into parts of exactly the asked size
    (only the last one shorter) while computing the SHA-256 and size of everything read.

    It holds at most one part plus one incoming chunk: the caller decides how many parts are
    alive at once.
    """

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks.__aiter__()
        self._left = b""
        self._digest = hashlib.sha256()
        self.size = 0
        self.eof = False

    async def read_file(self, size: int) -> io.BytesIO:
        """The next ``size`` bytes (fewer only at the end of the stream) in an in-memory file
        positioned at 0, each byte copied once.

        A file rather than ``bytes``: botocore and aiohttp send a file in small blocks, where
        they would copy a whole ``bytes`` body two or three times over while sending it, and
        swiftclient streams it as well."""
        part = io.BytesIO()
        have = 0
        while have < size:
            if self._left:
                chunk, self._left = self._left, b""
            elif self.eof:
                break
            else:
                try:
                    chunk = await anext(self._chunks)
                except StopAsyncIteration:
                    self.eof = True
                    break
            n = min(len(chunk), size - have)
            part.write(memoryview(chunk)[:n])
            if n < len(chunk):
                self._left = bytes(memoryview(chunk)[n:])
            have += n
        if have >= 1 << 20:
            # In a thread (hashlib releases the GIL on large buffers) so that the event loop
            # keeps the parts in flight moving; the thread holds the buffer as long as it
            # needs it, even if this task is cancelled meanwhile.
            await asyncio.to_thread(_hash_into, self._digest, part)
        else:
            _hash_into(self._digest, part)
        self.size += have
        part.seek(0)
        return part

    async def at_end(self) -> bool:
        """True if the stream has no byte left (reads ahead by at most one chunk)."""
        if self._left:
            return False
        while not self.eof:
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                self.eof = True
                break
            if chunk:
                self._left = chunk if isinstance(chunk, bytes) else bytes(chunk)
                return False
        return True

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


def _hash_into(digest: Any, part: io.BytesIO) -> None:
    with part.getbuffer() as view:
        digest.update(view)


class Verifier:
    """SHA-256 of a download as it streams, checked against what the caller expects."""

    def __init__(self, key: str, expected_sha256: str | None) -> None:
        self.key = key
        self.expected = _normalise_checksum(expected_sha256) if expected_sha256 else None
        self._digest = hashlib.sha256()
        self._pending: list[bytes] = []
        self._pending_size = 0
        self.size = 0

    async def update(self, chunk: bytes) -> None:
        # A download arrives in pieces of a few KiB: they are hashed together, a MiB at a
        # time, in a worker thread (hashlib releases the GIL), so that hashing overlaps the
        # download and the decoding instead of holding the event loop.
        self._pending.append(chunk)
        self._pending_size += len(chunk)
        self.size += len(chunk)
        if self._pending_size >= 1 << 20:
            pending, self._pending, self._pending_size = self._pending, [], 0
            await asyncio.to_thread(_hash_all, self._digest, pending)

    def finish(self) -> None:
        _hash_all(self._digest, self._pending)
        self._pending, self._pending_size = [], 0
        if self.expected is None:
            return
        actual = self._digest.hexdigest()
        if actual != self.expected:
            raise ChecksumMismatch(
                f"The object {self.key!r} is corrupt or was replaced: its {self.size} bytes "
                f"have SHA-256 {actual}, but {self.expected} was expected.",
                step="read",
            )


def _hash_all(digest: Any, chunks: list[bytes]) -> None:
    for chunk in chunks:
        digest.update(chunk)


def _normalise_checksum(value: str) -> str:
    value = value.strip().lower()
    if value.startswith("sha256:"):
        value = value[len("sha256:") :]
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError("expected_sha256 must be 64 hexadecimal digits (optionally 'sha256:')")
    return value


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, StorageError) and exc.transient


def retrying(
    transfer: TransferSettings, what: str, *, attempts: int | None = None
) -> AsyncRetrying:
    """Retries of one request on a transient :class:`StorageError`, with jittered exponential
    backoff; anything else (and the last transient failure) is raised at once."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "storage_retry",
            operation=what,
            attempt=state.attempt_number,
            error=getattr(exc, "code", type(exc).__name__),
            detail=str(exc),
            wait_s=round(state.upcoming_sleep, 2),
        )

    return AsyncRetrying(
        stop=stop_after_attempt(attempts or ATTEMPTS.get() or transfer.max_attempts),
        wait=wait_exponential_jitter(
            multiplier=transfer.backoff_initial,
            max=transfer.backoff_max,
            jitter=transfer.backoff_initial,
        ),
        retry=retry_if_exception(_transient),
        before_sleep=before_sleep,
        reraise=True,
    )


async def with_retries(
    transfer: TransferSettings,
    what: str,
    call: Callable[[], Awaitable[T]],
    *,
    attempts: int | None = None,
) -> T:
    async for attempt in retrying(transfer, what, attempts=attempts):
        with attempt:
            return await call()
    raise AssertionError("unreachable")  # pragma: no cover


async def finish_cleanup(cleanup: Awaitable[None], pending: set[asyncio.Task[None]]) -> None:
    """Run ``cleanup`` to its end even if the caller is being cancelled: the task is shielded,
    kept in ``pending`` (the store's ``aclose`` waits for it) and awaited here."""
    task = asyncio.ensure_future(cleanup)
    pending.add(task)
    task.add_done_callback(pending.discard)
    await asyncio.shield(task)
