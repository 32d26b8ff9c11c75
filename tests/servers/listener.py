"""A listener: a TCP server on loopback standing in for a host an attacker controls, that counts
every connection made to it (even one that never sends a request) and records what it is sent.

It answers each request with what the test set (by default ``200``, empty) and closes the
connection, so that a test can assert that nothing connected to it, or that no credential
reached it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest


@dataclass
class Listener:
    host: str
    port: int = 0
    connections: int = 0
    received: list[bytes] = field(default_factory=list)
    status: str = "200 OK"
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def text(self) -> str:
        return b"\n".join(self.received).decode("utf-8", "replace")

    def answer(self, status: str, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        self.status, self.headers, self.body = status, dict(headers or {}), body

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length, waits = 0, False
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value.strip() or 0)
                elif name == b"expect" and value.strip().lower() == b"100-continue":
                    waits = True  # the client sends no body until told to: answer at once
            body = await reader.readexactly(length) if length and not waits else b""
            self.received.append(head + body)
            headers = {"Content-Length": str(len(self.body)), "Connection": "close"}
            headers.update(self.headers)
            lines = [f"HTTP/1.1 {self.status}", *(f"{k}: {v}" for k, v in headers.items())]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + self.body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    async def start(self) -> Listener:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def start_listener(host: str = "127.0.0.1") -> Listener:
    return await Listener(host).start()


# Fixtures for every test (tests/conftest.py): the suite's egress policy allows 127.0.0.1 only.


@pytest.fixture
async def denied() -> AsyncIterator[Listener]:
    """The attacker's host on a loopback address the egress policy denies."""
    listener = await start_listener("127.0.0.2")
    yield listener
    await listener.close()


@pytest.fixture
async def allowed() -> AsyncIterator[Listener]:
    listener = await start_listener("127.0.0.1")
    yield listener
    await listener.close()


@pytest.fixture
async def second() -> AsyncIterator[Listener]:
    """Where a redirect points: allowed too, so only the redirect rule keeps requests away."""
    listener = await start_listener("127.0.0.1")
    yield listener
    await listener.close()
