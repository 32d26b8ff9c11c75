"""Streaming compression and authenticated encryption of backup files.

Encrypted stream format ``aes-256-gcm-stream-v1``::

    header  = MAGIC(6) | version(1) | scrypt log2 N(1) | chunk size(4, BE) | salt(16)
              | nonce prefix(7)
    chunk_i = AES-256-GCM(key, nonce = prefix | i (4, BE) | final (1), plaintext_i,
                          aad = header)

Every chunk but the last carries exactly ``chunk size`` plaintext bytes; the last one carries
at most that many (possibly zero) and has the final flag set. The counter in the nonce detects
reordering and dropped chunks, the final flag detects truncation at a chunk boundary, and the
header as associated data detects header tampering. The key is derived from the passphrase
with scrypt and a random salt, so the same passphrase never reuses a key/nonce pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Literal, Protocol

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

MAGIC = b"OSBENC"
VERSION = 1
ENCRYPTION_NAME = "aes-256-gcm-stream-v1"
CHUNK_SIZE = 1024 * 1024
SCRYPT_LOG2_N = 15
# One zstd worker: compression runs inside zstd's own thread, in jobs of a few MiB. Measured
# here against the single-threaded streaming mode: about 1.5x faster and a 10% smaller
# output (on the benchmark's data), for about 60 MiB more memory, flat from 256 MiB to 2 GiB
# once glibc's mmap threshold is pinned (agent/__main__.py). Two workers compressed faster
# alone, but in the agent on the loaded 2-core machine they gained no throughput and the
# peak memory of a 1 GiB backup then grew by 94 to 111 MiB over a 50 MiB one (issue 22).
ZSTD_THREADS = 1
# The smallest block handed to a stage's worker thread (see transform_stream).
BLOCK = 1024 * 1024
_HEADER = struct.Struct(">6sBBI16s7s")
HEADER_SIZE = _HEADER.size
_TAG = 16
_MAX_CHUNK = 16 * 1024 * 1024

Compression = Literal["zstd", "gzip"]
COMPRESSIONS: tuple[str, ...] = ("zstd", "gzip")
SUFFIXES = {"zstd": ".zst", "gzip": ".gz"}
ENCRYPTED_SUFFIX = ".enc"


class TransformError(Exception):
    """The stream cannot be decoded: wrong key, tampered, truncated or not our format."""


class Stage(Protocol):
    def update(self, data: bytes) -> bytes: ...
    def finalize(self) -> bytes: ...


def _derive_key(passphrase: str, salt: bytes, log2_n: int) -> bytes:
    if not passphrase:
        raise ValueError("an empty encryption key is not allowed")
    kdf = Scrypt(salt=salt, length=32, n=1 << log2_n, r=8, p=1)
    return kdf.derive(passphrase.encode("utf-8"))


def _nonce(prefix: bytes, counter: int, final: bool) -> bytes:
    if counter >= 1 << 32:
        raise TransformError("stream too long for the chunk counter")
    return prefix + counter.to_bytes(4, "big") + (b"\x01" if final else b"\x00")


class Encryptor:
    """Encrypts a byte stream of any length with bounded memory (about two chunks)."""

    def __init__(
        self, passphrase: str, *, chunk_size: int = CHUNK_SIZE, log2_n: int = SCRYPT_LOG2_N
    ) -> None:
        salt = os.urandom(16)
        self._prefix = os.urandom(7)
        self._chunk = chunk_size
        self._aead = AESGCM(_derive_key(passphrase, salt, log2_n))
        self._header = _HEADER.pack(MAGIC, VERSION, log2_n, chunk_size, salt, self._prefix)
        self._buf = bytearray()
        self._counter = 0
        self._header_sent = False

    def _seal(self, data: bytes | memoryview, final: bool) -> bytes:
        out = self._aead.encrypt(_nonce(self._prefix, self._counter, final), data, self._header)
        self._counter += 1
        return out

    def update(self, data: bytes) -> bytes:
        out = []
        if not self._header_sent:
            out.append(self._header)
            self._header_sent = True
        # Strictly more than one chunk: the last chunk must stay back to carry the final flag.
        # Chunks are sealed straight from a view of the data (of the buffer when a chunk
        # started in an earlier block), and only the rest is kept.
        view, pos = memoryview(data), 0
        if self._buf:
            need = self._chunk - len(self._buf)
            if len(view) <= need:
                self._buf += view
                view.release()
                return b"".join(out)
            self._buf += view[:need]
            out.append(self._seal(bytes(self._buf), False))
            self._buf.clear()
            pos = need
        while len(view) - pos > self._chunk:
            out.append(self._seal(view[pos : pos + self._chunk], False))
            pos += self._chunk
        self._buf += view[pos:]
        view.release()
        return b"".join(out)

    def finalize(self) -> bytes:
        head = self.update(b"")
        tail = self._seal(bytes(self._buf), True)
        self._buf.clear()
        return head + tail


class Decryptor:
    """Reverses :class:`Encryptor`, raising :class:`TransformError` on any inconsistency."""

    def __init__(self, passphrase: str) -> None:
        self._passphrase = passphrase
        self._buf = bytearray()
        self._aead: AESGCM | None = None
        self._header = b""
        self._prefix = b""
        self._frame = 0
        self._counter = 0
        self._done = False

    def _read_header(self) -> None:
        magic, version, log2_n, chunk, salt, prefix = _HEADER.unpack(bytes(self._buf[:HEADER_SIZE]))
        if magic != MAGIC:
            raise TransformError("not an encrypted backup (bad magic)")
        if version != VERSION:
            raise TransformError(f"unsupported encryption format version {version}")
        if not 10 <= log2_n <= 20 or not 1 <= chunk <= _MAX_CHUNK:
            raise TransformError("corrupted encryption header")
        self._header = bytes(self._buf[:HEADER_SIZE])
        del self._buf[:HEADER_SIZE]
        self._prefix = prefix
        self._frame = chunk + _TAG
        self._aead = AESGCM(_derive_key(self._passphrase, salt, log2_n))

    def _open(self, data: bytes | memoryview, final: bool) -> bytes:
        assert self._aead is not None
        try:
            out = self._aead.decrypt(_nonce(self._prefix, self._counter, final), data, self._header)
        except InvalidTag:
            if self._counter == 0:
                raise TransformError(
                    "cannot decrypt: wrong encryption key or corrupted backup"
                ) from None
            raise TransformError(
                f"backup corrupted, truncated or reordered at chunk {self._counter}"
            ) from None
        self._counter += 1
        return out

    def update(self, data: bytes) -> bytes:
        if self._done:
            raise TransformError("data after the final chunk")
        self._buf += data
        if self._aead is None:
            if len(self._buf) < HEADER_SIZE:
                return b""
            self._read_header()
        out = []
        view, pos = memoryview(self._buf), 0
        while len(self._buf) - pos > self._frame:
            out.append(self._open(view[pos : pos + self._frame], False))
            pos += self._frame
        view.release()
        del self._buf[:pos]
        return b"".join(out)

    def finalize(self) -> bytes:
        if self._aead is None:
            raise TransformError("truncated backup: incomplete encryption header")
        if len(self._buf) < _TAG:
            raise TransformError("truncated backup: incomplete final chunk")
        out = self._open(bytes(self._buf), True)
        self._buf.clear()
        self._done = True
        return out


class _Zstd:
    def __init__(self, decompress: bool) -> None:
        self._decompress = decompress
        if decompress:
            self._obj = zstandard.ZstdDecompressor().decompressobj()
        else:
            # The chunker writes into whole output blocks of its own instead of growing one
            # (about 15% less CPU than compressobj, measured here); same stream.
            self._chunker = zstandard.ZstdCompressor(level=3, threads=ZSTD_THREADS).chunker(
                chunk_size=CHUNK_SIZE
            )
        self._seen = False

    def update(self, data: bytes) -> bytes:
        try:
            if self._decompress:
                if data:
                    self._seen = True
                return self._obj.decompress(data)
            return b"".join(self._chunker.compress(data))
        except zstandard.ZstdError as exc:
            raise TransformError(f"corrupted zstd stream: {exc}") from None

    def finalize(self) -> bytes:
        if self._decompress:
            if not self._obj.eof:
                raise TransformError("truncated zstd stream")
            return b""
        return b"".join(self._chunker.finish())  # type: ignore[no-untyped-call]


class _Gzip:
    def __init__(self, decompress: bool) -> None:
        self._decompress = decompress
        if decompress:
            self._d = zlib.decompressobj(wbits=31)
        else:
            self._c = zlib.compressobj(6, zlib.DEFLATED, 31)

    def update(self, data: bytes) -> bytes:
        try:
            return self._d.decompress(data) if self._decompress else self._c.compress(data)
        except zlib.error as exc:
            raise TransformError(f"corrupted gzip stream: {exc}") from None

    def finalize(self) -> bytes:
        if self._decompress:
            if not self._d.eof:
                raise TransformError("truncated gzip stream")
            return self._d.flush()
        return self._c.flush()


def compressor(name: str) -> Stage:
    return _Zstd(False) if name == "zstd" else _Gzip(False)


def decompressor(name: str) -> Stage:
    return _Zstd(True) if name == "zstd" else _Gzip(True)


class Chain:
    """Stages applied one after the other, as a single stage."""

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages

    def update(self, data: bytes) -> bytes:
        for stage in self.stages:
            data = stage.update(data)
        return data

    def finalize(self) -> bytes:
        data = b""
        for stage in self.stages:
            data = stage.update(data) if data else data
            data += stage.finalize()
        return data


def encoder(compression: str | None, passphrase: str | None) -> Chain:
    """Compress then encrypt (compressing ciphertext would gain nothing)."""
    stages: list[Stage] = []
    if compression:
        stages.append(compressor(compression))
    if passphrase:
        stages.append(Encryptor(passphrase))
    return Chain(stages)


def decoder(compression: str | None, passphrase: str | None) -> Chain:
    stages: list[Stage] = []
    if passphrase:
        stages.append(Decryptor(passphrase))
    if compression:
        stages.append(decompressor(compression))
    return Chain(stages)


def stored_suffix(compression: str | None, encrypted: bool) -> str:
    return (SUFFIXES[compression] if compression else "") + (ENCRYPTED_SUFFIX if encrypted else "")


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def transform_stream(
    source: AsyncIterator[bytes], make: Callable[[], Chain], *, prefetch: int = 2
) -> AsyncIterator[bytes]:
    """Apply a chain to an async byte stream, each stage in a worker thread of its own, up
    to ``prefetch`` blocks ahead of the next: compressing one block overlaps with encrypting
    the previous one and with hashing and uploading the one before, while memory stays
    bounded (a few blocks per stage)."""
    chain = await asyncio.to_thread(make)  # scrypt takes tens of milliseconds
    async with contextlib.AsyncExitStack() as stack:
        stream = await stack.enter_async_context(contextlib.aclosing(_coalesced(source, BLOCK)))
        for stage in chain.stages:
            stream = await stack.enter_async_context(
                contextlib.aclosing(_stage_stream(stream, stage, prefetch))
            )
        async for block in stream:
            yield block


async def _coalesced(source: AsyncIterator[bytes], size: int) -> AsyncGenerator[bytes, None]:
    """The bytes of ``source`` in blocks of at least ``size`` bytes (the last one shorter): a
    download arrives in pieces of a few KiB, and a thread hop per piece and per stage cost
    more than the work done in it."""
    pending: list[bytes] = []
    have = 0
    try:
        async for chunk in source:
            if len(chunk) >= size and not pending:
                yield chunk
                continue
            pending.append(chunk)
            have += len(chunk)
            if have >= size:
                yield b"".join(pending)
                pending.clear()
                have = 0
        if pending:
            yield b"".join(pending)
    finally:
        # Closed here, by whoever stops the stream, rather than later by the garbage
        # collector (the source may hold a file open).
        close = getattr(source, "aclose", None)
        if close is not None:
            await close()


async def _stage_stream(
    source: AsyncIterator[bytes], stage: Stage, prefetch: int
) -> AsyncGenerator[bytes, None]:
    queue: asyncio.Queue[bytes | _Failed | None] = asyncio.Queue(maxsize=prefetch)  # None: end

    async def produce() -> None:
        try:
            async for block in source:
                out = await asyncio.to_thread(stage.update, block)
                if out:
                    await queue.put(out)
            out = await asyncio.to_thread(stage.finalize)
            if out:
                await queue.put(out)
            await queue.put(None)
        except Exception as exc:
            await queue.put(_Failed(exc))

    task = asyncio.create_task(produce())
    try:
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
