"""The one interface every object-store destination implements.

The manager uses it to validate destinations and delete expired backups; the agent uses it to
stream backups up and restores down. Nothing in here knows about plans, instances or jobs.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime


class StorageError(Exception):
    """Base of every storage failure. ``code`` is stable and machine readable; ``str()`` is a
    sentence a person can act on. Neither ever carries a credential."""

    code: str = "storage_error"
    transient: bool = False

    def __init__(self, message: str, *, step: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.step = step


class AuthenticationFailed(StorageError):
    code = "storage_auth_failed"


class PermissionDenied(StorageError):
    code = "storage_permission_denied"


class ContainerNotFound(StorageError):
    """The bucket (S3) or container (Swift) does not exist."""

    code = "storage_container_not_found"


class ObjectNotFound(StorageError):
    code = "storage_object_not_found"


class EndpointUnreachable(StorageError):
    code = "storage_unreachable"
    transient = True


class TLSFailure(StorageError):
    code = "storage_tls_failed"


class ChecksumMismatch(StorageError):
    code = "storage_checksum_mismatch"


class PreconditionFailed(StorageError):
    """A conditional request's condition did not hold (HTTP 412): a read pinned to an ETag
    finds the object replaced. Reported with the general ``storage_error`` code."""


class ObjectLocked(StorageError):
    """An object's S3 Object Lock retention forbids deleting it before ``until`` (None when
    the server did not say when)."""

    code = "storage_object_locked"

    def __init__(self, message: str, *, until: datetime | None, step: str | None = None) -> None:
        super().__init__(message, step=step)
        self.until = until


class ObjectLockMissing(StorageError):
    """A destination requires object lock, but its bucket does not have it enabled."""

    code = "storage_object_lock_missing"


class TransientStorageError(StorageError):
    """Timeouts, 5xx, throttling, resets: retried with backoff before it surfaces."""

    code = "storage_transient"
    transient = True


class EgressDenied(StorageError):
    """The service's egress policy does not let it connect to the host a tenant named
    (``EGRESS_DENY_NETWORKS`` / ``EGRESS_ALLOW_NETWORKS``); raised before any connection."""

    code = "egress_denied"

    def __init__(self, message: str, *, host: str, setting: str, step: str | None = None) -> None:
        super().__init__(message, step=step)
        self.host = host
        self.setting = setting


class NotAnObjectStore(StorageError):
    """The endpoint answers, but not like the object store it was said to be (S3 or Swift)."""

    code = "storage_not_object_store"


class InvalidSettings(StorageError):
    """The storage client refused the destination's settings before sending anything."""

    code = "storage_invalid_settings"


class InvalidKey(StorageError):
    """An object key that is empty, too long, or would escape its prefix."""

    code = "storage_invalid_key"


@dataclass(frozen=True, slots=True)
class StoredObject:
    """What an upload produced: the stored key, its size in bytes and SHA-256 of its bytes."""

    key: str
    size: int
    sha256: str  # lower-case hex, no prefix

    @property
    def checksum(self) -> str:
        return f"sha256:{self.sha256}"


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: datetime | None = None
    etag: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ValidationStep:
    name: str  # "write", "read", "delete"
    ok: bool
    error_code: str | None = None
    message: str | None = None


@dataclass(frozen=True, slots=True)
class ValidationReport:
    ok: bool
    steps: list[ValidationStep]

    @property
    def failure(self) -> ValidationStep | None:
        return next((s for s in self.steps if not s.ok), None)


class ObjectStore(abc.ABC):
    """An S3 bucket or a Swift container, plus an optional key prefix applied to every key."""

    @abc.abstractmethod
    async def upload(self, key: str, chunks: AsyncIterator[bytes]) -> StoredObject:
        """Store the bytes of ``chunks`` (any length, unknown in advance) under ``key``.

        Memory stays bounded whatever the size; past a threshold the object is stored as a
        multipart upload (S3) or static large object (Swift). A failed or cancelled upload
        leaves no parts or segments behind. Returns the size and SHA-256 of the stored bytes.
        """

    @abc.abstractmethod
    def download(self, key: str, *, expected_sha256: str | None = None) -> AsyncIterator[bytes]:
        """Stream the object's bytes. With ``expected_sha256`` the stream raises
        :class:`ChecksumMismatch` after the last chunk if the bytes differ."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Delete the object (and its segments). Deleting a missing object is not an error."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Objects whose key starts with ``prefix``, in key order."""

    @abc.abstractmethod
    async def stat(self, key: str) -> ObjectInfo:
        """Size and metadata of one object; :class:`ObjectNotFound` if absent."""

    @abc.abstractmethod
    async def check_server(self) -> None:
        """Make sure, without writing anything, that the endpoint speaks this store's protocol
        (:class:`NotAnObjectStore` if not): the validation probe writes only after it."""

    @abc.abstractmethod
    async def validate(self) -> ValidationReport:
        """Write, read back and delete a probe object, reporting which step failed and why."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections and threads."""

    async def __aenter__(self) -> ObjectStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
