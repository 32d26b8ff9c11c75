"""A directory standing in for S3 and Swift inside an agent process, for the agent's own
upload/download/recovery paths while (or wherever) no real server is available.

Started as ``python -c 'import tests.agent.fake_storage as f; f.run_agent()'`` with
``FAKE_STORE_DIR``; ``FAKE_STORE_DELAY`` (seconds per chunk) slows uploads for crash tests.
Like a multipart upload, an object is visible only once complete; parts of an unfinished
upload stay in ``<dir>/.parts`` until ``delete(key)`` (the analogue of aborting it).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import types
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from storage.base import (
    ChecksumMismatch,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StoredObject,
    ValidationReport,
)


def _safe(key: str) -> str:
    return key.replace("/", "%2F")


class FakeStore(ObjectStore):
    def __init__(self, settings: object, transfer: object) -> None:
        self.root = Path(os.environ["FAKE_STORE_DIR"])
        self.parts = self.root / ".parts"
        self.parts.mkdir(parents=True, exist_ok=True)
        self.delay = float(os.environ.get("FAKE_STORE_DELAY", "0"))
        self.settings = settings

    async def upload(self, key: str, chunks: AsyncIterator[bytes]) -> StoredObject:
        part = self.parts / f"{_safe(key)}.{uuid.uuid4().hex}"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(part, "wb") as f:  # noqa: ASYNC230 (test stand-in)
                async for chunk in chunks:
                    f.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    if self.delay:
                        await asyncio.sleep(self.delay)
            os.replace(part, self.root / _safe(key))
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return StoredObject(key=key, size=size, sha256=digest.hexdigest())

    async def download(
        self, key: str, *, expected_sha256: str | None = None
    ) -> AsyncIterator[bytes]:
        path = self.root / _safe(key)
        if not path.exists():
            raise ObjectNotFound(f"object {key} not found")
        digest = hashlib.sha256()
        with open(path, "rb") as f:  # noqa: ASYNC230 (test stand-in)
            while block := f.read(1 << 20):
                digest.update(block)
                yield block
        if expected_sha256 and digest.hexdigest() != expected_sha256:
            raise ChecksumMismatch("checksum mismatch")

    async def delete(self, key: str) -> None:
        (self.root / _safe(key)).unlink(missing_ok=True)
        for part in self.parts.glob(f"{_safe(key)}.*"):
            part.unlink(missing_ok=True)

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:  # type: ignore[override]
        for p in sorted(self.root.iterdir()):
            key = p.name.replace("%2F", "/")
            if p.is_file() and key.startswith(prefix):
                yield ObjectInfo(key=key, size=p.stat().st_size)

    async def stat(self, key: str) -> ObjectInfo:
        path = self.root / _safe(key)
        if not path.exists():
            raise ObjectNotFound(key)
        return ObjectInfo(key=key, size=path.stat().st_size)

    async def validate(self) -> ValidationReport:
        return ValidationReport(ok=True, steps=[])

    async def aclose(self) -> None:
        return None


def install() -> None:
    for name, cls in (("storage.s3", "S3Store"), ("storage.swift", "SwiftStore")):
        module = types.ModuleType(name)
        setattr(module, cls, FakeStore)
        sys.modules[name] = module


def run_agent() -> None:
    install()
    from agent.__main__ import main

    main()


def stored_objects(root: Path) -> dict[str, bytes]:
    return {p.name.replace("%2F", "/"): p.read_bytes() for p in root.iterdir() if p.is_file()}


def pending_parts(root: Path) -> list[str]:
    parts = root / ".parts"
    return [p.name for p in parts.iterdir()] if parts.exists() else []
