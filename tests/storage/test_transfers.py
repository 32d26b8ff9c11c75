"""Round trips, listing, deletion and integrity on both backends."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from storage import (
    ChecksumMismatch,
    InvalidKey,
    ObjectNotFound,
    StorageError,
    TransferSettings,
)
from tests.storage.conftest import SMALL_PARTS, Backend
from tests.storage.support import MiB, SourceFailed, data, digest, download_digest, read_all, stream

PART = SMALL_PARTS.part_size


@pytest.mark.parametrize(
    "size",
    [0, 1, 1000, PART - 1, PART, PART + 1, 3 * PART + 12_345],
    ids=["empty", "1B", "1000B", "part-1", "part", "part+1", "3parts+"],
)
async def test_round_trip(backend: Backend, size: int) -> None:
    async with backend.open() as store:
        stored = await store.upload("db/dump.bin", stream(size))
        assert (stored.key, stored.size) == ("db/dump.bin", size)
        assert stored.sha256 == hashlib.sha256(data(0, size)).hexdigest()
        assert stored.checksum == f"sha256:{stored.sha256}"
        assert await read_all(store, "db/dump.bin", expected_sha256=stored.sha256) == data(0, size)
        assert (await store.stat("db/dump.bin")).size == size
    # Past one part the object is stored as a multipart upload / static large object.
    assert backend.is_large_object("db/dump.bin") == (size > PART)
    assert backend.leftovers() == []


@pytest.mark.slow
async def test_several_hundred_mib_round_trip(backend: Backend) -> None:
    size = 300 * MiB + 123
    async with backend.open(TransferSettings()) as store:  # the defaults: 16 MiB parts
        stored = await store.upload("big/base.tar", stream(size, irregular=False))
        assert stored.size == size and stored.sha256 == digest(size)
        assert await download_digest(store, "big/base.tar", expected_sha256=stored.checksum) == (
            size,
            stored.sha256,
        )
    assert backend.is_large_object("big/base.tar")
    assert backend.leftovers() == []


async def test_list_stat_delete(backend: Backend) -> None:
    async with backend.open() as store:
        for key, size in [("b/2", 20), ("a/1", 10), ("b/1", PART + 5), ("c", 0), ("b/sub/3", 3)]:
            await store.upload(key, stream(size))
        listed = [(o.key, o.size) async for o in store.list()]
        assert listed == [("a/1", 10), ("b/1", PART + 5), ("b/2", 20), ("b/sub/3", 3), ("c", 0)]
        assert [o.key async for o in store.list("b/")] == ["b/1", "b/2", "b/sub/3"]
        assert [o.key async for o in store.list("nothing/")] == []
        info = await store.stat("b/1")
        assert info.key == "b/1" and info.size == PART + 5 and info.last_modified is not None

        await store.delete("b/1")
        await store.delete("b/1")  # a missing object is not an error
        await store.delete("never/was")
        assert [o.key async for o in store.list("b/")] == ["b/2", "b/sub/3"]
        with pytest.raises(ObjectNotFound):
            await store.stat("b/1")
        with pytest.raises(ObjectNotFound):
            await read_all(store, "b/1")
    assert backend.leftovers() == []  # the large object's segments went with it


async def test_prefix_isolates_destinations(backend: Backend) -> None:
    async with backend.open(prefix="tenant-a/") as a, backend.open(prefix="tenant-b") as b:
        await a.upload("x.gz", stream(5))
        await b.upload("x.gz", stream(7))
        assert [(o.key, o.size) async for o in a.list()] == [("x.gz", 5)]
        assert [(o.key, o.size) async for o in b.list()] == [("x.gz", 7)]
        await a.delete("x.gz")
        assert (await b.stat("x.gz")).size == 7
    async with backend.open() as whole:
        assert [o.key async for o in whole.list()] == ["tenant-b/x.gz"]


async def test_many_concurrent_uploads_share_one_store(backend: Backend) -> None:
    async with backend.open() as store:
        sizes = [i * 100_003 for i in range(12)]
        results = await asyncio.gather(
            *(store.upload(f"c/{i:02}", stream(n)) for i, n in enumerate(sizes))
        )
        assert [r.size for r in results] == sizes
        for i, n in enumerate(sizes):
            assert (await download_digest(store, f"c/{i:02}")) == (n, digest(n))


async def test_overwrite_replaces_whole_object(backend: Backend) -> None:
    async with backend.open() as store:
        await store.upload("same", stream(3 * PART))
        await store.upload("same", stream(2 * PART + 1))
        assert (await download_digest(store, "same")) == (2 * PART + 1, digest(2 * PART + 1))
        await store.upload("same", stream(10))
        assert await read_all(store, "same") == data(0, 10)
    assert backend.leftovers() == []


@pytest.mark.parametrize(
    "key", ["", "/abs", "a/../b", "a//b", "./a", "a/", "bad\nname", "x" * 1100]
)
async def test_invalid_keys_are_refused(backend: Backend, key: str) -> None:
    async with backend.open() as store:
        with pytest.raises(InvalidKey):
            await store.upload(key, stream(1))
        with pytest.raises(InvalidKey):
            await read_all(store, key)
        with pytest.raises(InvalidKey):
            await store.delete(key)


async def test_checksum_mismatch_is_detected(backend: Backend) -> None:
    async with backend.open() as store:
        stored = await store.upload("k", stream(PART + 100))
        wrong = "0" * 64
        chunks = []
        with pytest.raises(ChecksumMismatch) as caught:
            async for chunk in store.download("k", expected_sha256=wrong):
                chunks.append(chunk)
        assert caught.value.code == "storage_checksum_mismatch"
        assert stored.sha256 in str(caught.value) and wrong in str(caught.value)
        assert sum(map(len, chunks)) == PART + 100  # it fails after the last byte, loudly
        # The object changed behind the store's back (another writer, bit rot, tampering).
        await store.upload("k", _flipped(PART + 100))
        with pytest.raises(ChecksumMismatch):
            await read_all(store, "k", expected_sha256=stored.checksum)
        with pytest.raises(ValueError):
            await read_all(store, "k", expected_sha256="not-a-checksum")


async def _flipped(size: int):  # type: ignore[no-untyped-def]
    body = bytearray(data(0, size))
    body[size // 2] ^= 0x01
    yield bytes(body)


async def test_failed_source_leaves_nothing_behind(backend: Backend) -> None:
    async with backend.open() as store:
        with pytest.raises(SourceFailed):
            await store.upload("broken", stream(10 * PART, fail_after=3 * PART + 17))
        with pytest.raises(ObjectNotFound):
            await store.stat("broken")
        assert [o.key async for o in store.list()] == []
    assert backend.leftovers() == []


async def test_cancelled_upload_leaves_nothing_behind(backend: Backend) -> None:
    async with backend.open() as store:
        seen = 0

        async def slow():  # type: ignore[no-untyped-def]
            nonlocal seen
            async for chunk in stream(50 * PART, irregular=False):
                seen += len(chunk)
                yield chunk
                await asyncio.sleep(0.01)

        task = asyncio.create_task(store.upload("cancelled", slow()))
        deadline = asyncio.get_running_loop().time() + 120
        while seen < 3 * PART and not task.done():  # some parts are stored by now
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # aclose() waited for the cleanup the cancellation started
    assert backend.leftovers() == []
    async with backend.open() as store:
        assert [o.key async for o in store.list()] == []


async def test_an_object_replaced_while_it_is_read_is_not_spliced(backend: Backend) -> None:
    """What is read after the first answer is pinned to its ETag (S3 ranges, a resumed Swift
    stream): once the object is replaced, the download fails instead of mixing two objects."""
    size = 8 * PART
    async with backend.open(SMALL_PARTS.model_copy(update={"max_concurrency": 1})) as store:
        await store.upload("moving", stream(size))
        received = 0
        with pytest.raises(StorageError) as caught:
            async for chunk in store.download("moving"):
                if received == 0:
                    await store.upload("moving", _flipped(size))  # its old segments go too
                received += len(chunk)
        assert "was replaced while it was being read" in str(caught.value)
        assert received < size


async def test_cancellation_at_any_moment_leaves_nothing_behind(backend: Backend) -> None:
    """Cancelled while reading, hashing, sending a part, or completing: always a plain
    CancelledError, and never a part or segment left."""
    async with backend.open() as store:
        for step, cancel_at in enumerate((1, PART // 2, PART, PART + 1, 2 * PART + 7, 4 * PART)):
            reached = asyncio.Event()

            async def source(cancel_at: int = cancel_at, reached: asyncio.Event = reached):  # type: ignore[no-untyped-def]
                seen = 0
                async for chunk in stream(4 * PART + 3, irregular=False):
                    seen += len(chunk)
                    if seen >= cancel_at:
                        reached.set()
                    yield chunk

            task = asyncio.create_task(store.upload(f"cancel-{step}", source()))
            waiting = asyncio.create_task(reached.wait())
            await asyncio.wait([task, waiting], return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass  # what a cancelled upload raises, at whatever moment
            else:
                await store.delete(f"cancel-{step}")  # it had finished: fine too
    assert backend.leftovers() == []
    async with backend.open() as store:
        assert [o.key async for o in store.list()] == []
