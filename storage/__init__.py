"""Object storage destinations: S3 (any S3-compatible endpoint) and OpenStack Swift."""

from __future__ import annotations

from storage.base import (
    AuthenticationFailed,
    ChecksumMismatch,
    ContainerNotFound,
    EndpointUnreachable,
    InvalidKey,
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
from storage.settings import (
    DestinationSettings,
    ObjectLock,
    S3Settings,
    SwiftSettings,
    TransferSettings,
)


def open_store(
    settings: S3Settings | SwiftSettings, transfer: TransferSettings | None = None
) -> ObjectStore:
    """The store for ``settings``; close it with ``await store.aclose()`` (or ``async with``)."""
    transfer = transfer or TransferSettings()
    if isinstance(settings, S3Settings):
        from storage.s3 import S3Store

        return S3Store(settings, transfer)
    from storage.swift import SwiftStore

    return SwiftStore(settings, transfer)


__all__ = [
    "AuthenticationFailed",
    "ChecksumMismatch",
    "ContainerNotFound",
    "DestinationSettings",
    "EndpointUnreachable",
    "InvalidKey",
    "InvalidSettings",
    "NotAnObjectStore",
    "ObjectInfo",
    "ObjectLock",
    "ObjectLockMissing",
    "ObjectLocked",
    "ObjectNotFound",
    "ObjectStore",
    "PermissionDenied",
    "PreconditionFailed",
    "S3Settings",
    "StorageError",
    "StoredObject",
    "SwiftSettings",
    "TLSFailure",
    "TransferSettings",
    "TransientStorageError",
    "ValidationReport",
    "ValidationStep",
    "open_store",
]
