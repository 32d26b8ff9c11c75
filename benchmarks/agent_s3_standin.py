"""Minimal aioboto3 multipart S3 store, injected into the benchmark's agent process only when
the project's ``storage/s3.py`` does not exist yet (so the agent can still be measured)."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import types
from collections.abc import AsyncIterator
from typing import Any

import aioboto3

from storage.base import ObjectStore, StoredObject


class StandinS3Store(ObjectStore):
    def __init__(self, settings: Any, transfer: Any) -> None:
        self.s = settings
        self.t = transfer
        self.session = aioboto3.Session()

    def _client(self) -> Any:
        return self.session.client(
            "s3",
            endpoint_url=self.s.endpoint,
            region_name=self.s.region,
            aws_access_key_id=self.s.access_key_id,
            aws_secret_access_key=self.s.secret_access_key.get_secret_value(),
        )

    async def upload(self, key: str, chunks: AsyncIterator[bytes]) -> StoredObject:
        digest, size = hashlib.sha256(), 0
        async with self._client() as s3:
            mp = await s3.create_multipart_upload(Bucket=self.s.bucket, Key=key)
            uid, parts, pending = mp["UploadId"], [], set()
            sem = asyncio.Semaphore(self.t.max_concurrency)

            async def put(n: int, body: bytes) -> None:
                try:
                    r = await s3.upload_part(
                        Bucket=self.s.bucket, Key=key, UploadId=uid, PartNumber=n, Body=body
                    )
                finally:
                    sem.release()
                parts.append({"PartNumber": n, "ETag": r["ETag"]})

            try:
                buf, n = bytearray(), 0
                async for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    buf += chunk
                    while len(buf) >= self.t.part_size:
                        n += 1
                        await sem.acquire()  # bounds the parts held in memory
                        pending.add(asyncio.create_task(put(n, bytes(buf[: self.t.part_size]))))
                        del buf[: self.t.part_size]
                        pending = {p for p in pending if not p.done()}
                if buf or n == 0:
                    n += 1
                    await sem.acquire()
                    pending.add(asyncio.create_task(put(n, bytes(buf))))
                await asyncio.gather(*pending)
                parts.sort(key=lambda p: p["PartNumber"])
                await s3.complete_multipart_upload(
                    Bucket=self.s.bucket, Key=key, UploadId=uid, MultipartUpload={"Parts": parts}
                )
            except BaseException:
                await s3.abort_multipart_upload(Bucket=self.s.bucket, Key=key, UploadId=uid)
                raise
        return StoredObject(key=key, size=size, sha256=digest.hexdigest())

    async def download(self, key: str, *, expected_sha256: str | None = None):  # type: ignore[override]
        raise NotImplementedError

    async def delete(self, key: str) -> None:
        async with self._client() as s3:
            await s3.delete_object(Bucket=self.s.bucket, Key=key)

    def list(self, prefix: str = ""):  # type: ignore[override]
        raise NotImplementedError

    async def stat(self, key: str):  # type: ignore[override]
        raise NotImplementedError

    async def validate(self):  # type: ignore[override]
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


def run_agent() -> None:
    module = types.ModuleType("storage.s3")
    module.S3Store = StandinS3Store  # type: ignore[attr-defined]
    sys.modules["storage.s3"] = module
    from agent.__main__ import main

    main()
