"""Streaming compression + authenticated encryption: round trips and every kind of tamper."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from agent import transforms as t

CHUNK = 4096  # small chunks make multi-chunk streams cheap to test


def _enc(data: bytes, key: str = "k3y", pieces: int = 7) -> bytes:
    e = t.Encryptor(key, chunk_size=CHUNK, log2_n=10)
    out = []
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        out.append(e.update(data[i : i + step]))
    out.append(e.finalize())
    return b"".join(out)


def _dec(blob: bytes, key: str = "k3y", step: int = 1000) -> bytes:
    d = t.Decryptor(key)
    out = [d.update(blob[i : i + step]) for i in range(0, len(blob), step)]
    out.append(d.finalize())
    return b"".join(out)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 5 * CHUNK + 17])
def test_encrypt_round_trip(size: int) -> None:
    data = os.urandom(size)
    blob = _enc(data)
    assert size < 64 or data[:64] not in blob
    assert _dec(blob) == data
    # header + one tag per chunk; an empty stream still has its (empty) final chunk
    chunks = max(1, -(-size // CHUNK))
    assert len(blob) == t.HEADER_SIZE + size + 16 * chunks


def test_wrong_key() -> None:
    blob = _enc(b"secret data" * 1000)
    with pytest.raises(t.TransformError, match="wrong encryption key"):
        _dec(blob, key="other")


def test_tamper_detected() -> None:
    blob = bytearray(_enc(os.urandom(3 * CHUNK)))
    blob[t.HEADER_SIZE + CHUNK + 100] ^= 1
    with pytest.raises(t.TransformError):
        _dec(bytes(blob))


def test_header_tamper_detected() -> None:
    blob = bytearray(_enc(os.urandom(100)))
    blob[t.HEADER_SIZE - 1] ^= 1  # nonce prefix
    with pytest.raises(t.TransformError):
        _dec(bytes(blob))


def test_truncation_at_chunk_boundary_detected() -> None:
    data = os.urandom(3 * CHUNK + 10)
    blob = _enc(data)
    frame = CHUNK + 16
    for cut in (t.HEADER_SIZE + frame, t.HEADER_SIZE + 2 * frame, len(blob) - 1, 10):
        with pytest.raises(t.TransformError):
            _dec(blob[:cut])


def test_reordering_detected() -> None:
    blob = _enc(os.urandom(3 * CHUNK + 10))
    frame = CHUNK + 16
    h = t.HEADER_SIZE
    first, second = blob[h : h + frame], blob[h + frame : h + 2 * frame]
    swapped = blob[:h] + second + first + blob[h + 2 * frame :]
    with pytest.raises(t.TransformError):
        _dec(swapped)


def test_appended_data_detected() -> None:
    blob = _enc(b"abc")
    with pytest.raises(t.TransformError):
        _dec(blob + blob[-20:])


def test_empty_key_refused() -> None:
    with pytest.raises(ValueError):
        t.Encryptor("")


def test_not_encrypted() -> None:
    with pytest.raises(t.TransformError, match="magic"):
        _dec(b"x" * 100)


@pytest.mark.parametrize("compression", ["zstd", "gzip", None])
@pytest.mark.parametrize("key", ["passphrase", None])
async def test_stream_round_trip(compression: str | None, key: str | None) -> None:
    data = (b"row,%d,some repeated text\n" * 50_000) + os.urandom(3000)

    async def source(blob: bytes, step: int = 65536):
        for i in range(0, len(blob), step):
            yield blob[i : i + step]

    async def collect(it) -> bytes:
        return b"".join([c async for c in it])

    stored = await collect(t.transform_stream(source(data), lambda: t.encoder(compression, key)))
    if compression:
        assert len(stored) < len(data) // 5
    if key:
        assert stored.startswith(t.MAGIC)
        assert b"some repeated text" not in stored
    back = await collect(t.transform_stream(source(stored), lambda: t.decoder(compression, key)))
    assert back == data


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_truncated_compression_detected(compression: str) -> None:
    c = t.encoder(compression, None)
    blob = c.update(os.urandom(50_000)) + c.finalize()
    d = t.decoder(compression, None)
    with pytest.raises(t.TransformError):
        d.update(blob[: len(blob) // 2])
        d.finalize()


def test_suffixes() -> None:
    assert t.stored_suffix("zstd", True) == ".zst.enc"
    assert t.stored_suffix(None, False) == ""


async def test_stream_failure_and_early_close_leave_no_task() -> None:
    """A failing source surfaces its error through every stage; a consumer that stops early
    (a failed upload) stops every stage's worker."""
    import asyncio

    async def failing():
        yield b"x" * 100_000
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        async for _ in t.transform_stream(failing(), lambda: t.encoder("zstd", "k")):
            pass

    async def endless():
        while True:
            yield os.urandom(65536)

    before = len(asyncio.all_tasks())
    stream = t.transform_stream(endless(), lambda: t.encoder("gzip", "k"))
    assert await anext(stream)
    await stream.aclose()
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == before


# Backups written by the code of commit ec75bc9 (see tests/agent/format_v1/README.md): whatever
# changes in how the agent streams, compresses or encrypts, these must still restore.
DATA = os.path.join(os.path.dirname(__file__), "format_v1")
FORMAT_V1 = [
    (
        "v1-zstd-chunk1MiB.zst.enc",
        "zstd",
        300_000,
        "e5702dbecee8f0675483c7f75a07b849b833e33db75ce940e9e31d1868af1276",
    ),
    (
        "v1-zstd-chunk4KiB.zst.enc",
        "zstd",
        150_000,
        "466556d2825a934234bca463381f8f3a74b956808b103d43091e17c09ce9ecfb",
    ),
    (
        "v1-gzip-chunk4KiB.gz.enc",
        "gzip",
        100_000,
        "845b72a897bb23d2fe70876e87fb56b1301956297fefa3f6414c5cf24d9e3543",
    ),
]


@pytest.mark.parametrize(("name", "compression", "size", "sha256"), FORMAT_V1)
@pytest.mark.parametrize("step", [1000, 1 << 20])
async def test_format_v1_still_restores(
    name: str, compression: str, size: int, sha256: str, step: int
) -> None:
    import hashlib

    stored = await asyncio.to_thread(Path(DATA, name).read_bytes)

    async def source():
        for i in range(0, len(stored), step):
            yield stored[i : i + step]

    digest, restored = hashlib.sha256(), 0
    decoder = lambda: t.decoder(compression, "format-v1-passphrase")  # noqa: E731
    async for block in t.transform_stream(source(), decoder):
        digest.update(block)
        restored += len(block)
    assert (restored, digest.hexdigest()) == (size, sha256)
    with pytest.raises(t.TransformError, match="wrong encryption key"):
        async for _ in t.transform_stream(source(), lambda: t.decoder(compression, "other")):
            pass
