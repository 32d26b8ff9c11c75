"""Test bytes that are cheap to make and unique per position (so a misplaced or repeated part
changes the checksum), streamed in irregular chunks (so part boundaries never line up with
chunk boundaries)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

from storage import ObjectStore

MiB = 1024 * 1024
PAGE = 65536
_NOISE = os.urandom(PAGE + 4096)
_SIZES = (65536, 1, 7, 1_048_583, 333_333, 4096, 2 * MiB + 11)


def _page(n: int) -> bytes:
    start = (n * 8) % 4096
    return n.to_bytes(8, "big") + _NOISE[start : start + PAGE - 8]


def data(offset: int, length: int) -> bytes:
    """Bytes ``[offset, offset + length)`` of an endless, position-dependent content."""
    first, last = offset // PAGE, (offset + length - 1) // PAGE
    if length <= 0:
        return b""
    joined = b"".join(_page(n) for n in range(first, last + 1))
    skip = offset - first * PAGE
    return joined[skip : skip + length]


async def stream(
    size: int, *, irregular: bool = True, fail_after: int | None = None, delay: float = 0.0
) -> AsyncIterator[bytes]:
    """The first ``size`` bytes of :func:`data`, in chunks; raises :class:`SourceFailed` before
    going past ``fail_after`` bytes; sleeps ``delay`` seconds between chunks."""
    sent, i = 0, 0
    while sent < size:
        want = min(_SIZES[i % len(_SIZES)] if irregular else MiB, size - sent, 2 * MiB)
        if fail_after is not None and sent + want > fail_after:
            raise SourceFailed(f"the source broke after {sent} bytes")
        yield data(sent, want)
        sent += want
        i += 1
        if delay:
            await asyncio.sleep(delay)
        elif i % 16 == 0:
            await asyncio.sleep(0)


def digest(size: int) -> str:
    """SHA-256 of the first ``size`` bytes of :func:`data`, without holding them."""
    h = hashlib.sha256()
    for offset in range(0, size, 4 * MiB):
        h.update(data(offset, min(4 * MiB, size - offset)))
    return h.hexdigest()


class SourceFailed(Exception):
    """The producer of an upload failed (a backup script died, a disk broke)."""


async def read_all(store: ObjectStore, key: str, **kw: object) -> bytes:
    return b"".join([c async for c in store.download(key, **kw)])  # type: ignore[arg-type]


async def download_digest(store: ObjectStore, key: str, **kw: object) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    async for chunk in store.download(key, **kw):  # type: ignore[arg-type]
        h.update(chunk)
        size += len(chunk)
    return size, h.hexdigest()
