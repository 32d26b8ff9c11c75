"""A recorder: an HTTP server on loopback standing in for a host an attacker controls.

It records every request it receives (method, path, headers, body) and answers what the test
set (by default ``200 {}``), so that a test can assert that nothing was sent to it, or that
what it answered was not echoed back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def text(self) -> str:
        """Everything received, as one string to search for a secret."""
        head = "\n".join(f"{k}: {v}" for k, v in self.headers.items())
        return f"{self.method} {self.path}\n{head}\n\n{self.body.decode('utf-8', 'replace')}"


@dataclass
class Recorder:
    """A running recorder: ``url``, what it received, and what it answers next."""

    server: TestServer
    requests: list[Recorded] = field(default_factory=list)
    status: int = 200
    reason: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"{}"

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def host_port(self) -> str:
        return f"{self.server.host}:{self.server.port}"

    def received(self) -> str:
        return "\n\n".join(r.text() for r in self.requests)

    def answer(
        self,
        status: int,
        body: bytes | str = b"",
        *,
        reason: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status, self.reason = status, reason
        self.body = body.encode() if isinstance(body, str) else body
        self.headers = dict(headers or {})

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append(
            Recorded(request.method, request.path_qs, dict(request.headers), await request.read())
        )
        return web.Response(
            status=self.status, reason=self.reason, body=self.body, headers=self.headers
        )


async def start_recorder(host: str = "127.0.0.1") -> Recorder:
    app = web.Application()
    recorder = Recorder(TestServer(app, host=host))
    app.router.add_route("*", "/{tail:.*}", recorder._handle)
    await recorder.server.start_server()
    return recorder


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    """A recorder on 127.0.0.1, which the test suite's egress policy allows."""
    rec = await start_recorder()
    yield rec
    await rec.server.close()
