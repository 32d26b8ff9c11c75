"""The destination check both backends share: write, read back and delete a probe object."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

from storage._support import ATTEMPTS
from storage.base import (
    ObjectLocked,
    ObjectStore,
    StorageError,
    StoredObject,
    ValidationReport,
    ValidationStep,
)

VALIDATION_ATTEMPTS = 2
"""A person is waiting for the answer: one retry of a transient failure, not the full budget."""


Upload = Callable[[str, AsyncIterator[bytes]], Awaitable[StoredObject]]


async def probe(
    store: ObjectStore,
    key: str,
    *,
    upload: Upload | None = None,
    locked_until: datetime | None = None,
) -> ValidationReport:
    """Run the three steps on ``store``; a failed step ends the check (a probe that was written
    is still deleted) and says which step failed, with the storage's classified error. The
    write step first checks, by reading, that the server speaks the store's protocol.

    ``upload`` replaces ``store.upload`` (S3 Object Lock: a probe written locked until
    ``locked_until``, a moment away, which the delete step waits for)."""
    body = b"osb-backup-manager destination probe\n" + os.urandom(64)
    steps: list[ValidationStep] = []
    token = ATTEMPTS.set(VALIDATION_ATTEMPTS)
    try:

        async def chunks() -> AsyncIterator[bytes]:
            yield body

        try:
            # Nothing is written to a server that does not answer like the store it is said
            # to be (an internal web service, a filer): it may keep what it is sent.
            await store.check_server()
            stored = await (upload or store.upload)(key, chunks())
        except StorageError as exc:
            steps.append(ValidationStep("write", False, exc.code, exc.message))
            return ValidationReport(False, steps)
        steps.append(ValidationStep("write", True))

        try:
            read = b"".join([c async for c in store.download(key, expected_sha256=stored.sha256)])
            if read != body:
                raise StorageError(
                    f"The probe read back differs from what was written ({len(read)} bytes "
                    f"instead of {len(body)}).",
                    step="read",
                )
            if hashlib.sha256(read).hexdigest() != stored.sha256:
                raise StorageError("The probe's checksum changed.", step="read")
            steps.append(ValidationStep("read", True))
        except StorageError as exc:
            steps.append(ValidationStep("read", False, exc.code, exc.message))

        try:
            if locked_until is not None:
                await _lapse(locked_until)
            try:
                await store.delete(key)
            except ObjectLocked as exc:  # a server clock a little behind ours: once more
                if exc.until is None:
                    raise
                await _lapse(exc.until)
                await store.delete(key)
            steps.append(ValidationStep("delete", True))
        except StorageError as exc:
            steps.append(ValidationStep("delete", False, exc.code, exc.message))
        return ValidationReport(all(s.ok for s in steps), steps)
    finally:
        ATTEMPTS.reset(token)


async def _lapse(until: datetime, *, longest: float = 5.0) -> None:
    """Wait until just past ``until`` (at most ``longest`` seconds)."""
    wait = (until - datetime.now(UTC)).total_seconds() + 0.3
    await asyncio.sleep(min(max(wait, 0.0), longest))
