"""No text a remote server chose comes back to the user or into the logs (issue 14, finding 3).

A destination's endpoint is whatever a tenant says, so what it answers is the tenant's (or an
attacker's) text: a reason phrase, a body, an S3 ``<Message>`` or error code, a Keystone JSON
error, a header, even a status line that is not HTTP. Each test points a destination at a
recorder server on loopback that answers with such text carrying a canary, validates it
through the API, and asserts that the answer names a classified reason and that neither the
answer nor any log line holds the canary. A host that answers like something other than S3
is sent nothing to keep: the probe writes only after a listing came back as S3's.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.api.conftest import Api, add_instance
from tests.servers.log_audit import IN_PROCESS_LOG, audit_secret

Handler = Callable[["Remote", web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Remote:
    """An HTTP server on 127.0.0.1 that answers every request with ``handler`` and records
    the method and path of each."""

    canary: str
    handler: Handler
    server: TestServer | None = None
    seen: list[tuple[str, str]] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.path_qs))
        await request.read()
        return await self.handler(self, request)

    def writes(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p in self.seen if m not in ("GET", "HEAD")]


@pytest.fixture
async def remote() -> AsyncIterator[Callable[[Handler], Awaitable[Remote]]]:
    started: list[Remote] = []

    async def start(handler: Handler) -> Remote:
        canary = f"CANARY{uuid.uuid4().hex[:12]}"
        audit_secret(canary, "text a remote server chose")  # the session's log audit too
        rec = Remote(canary, handler)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", rec._handle)
        rec.server = TestServer(app, host="127.0.0.1")
        await rec.server.start_server()
        started.append(rec)
        return rec

    yield start
    for rec in started:
        assert rec.server is not None
        await rec.server.close()


@pytest.fixture
async def inst(api: Api) -> str:
    return await add_instance(api.db)


def _s3(url: str) -> dict[str, Any]:
    return {
        "type": "S3",
        "name": "remote",
        "endpoint": url,
        "bucket": "backups",
        "access_key_id": "AKIA-remote",
        "secret_access_key": "remote-secret-S3x",
    }


def _v1(url: str) -> dict[str, Any]:
    return {
        "type": "SWIFT",
        "name": "remote",
        "auth_url": f"{url}/auth/v1.0",
        "auth_version": "1",
        "username": "test:tester",
        "password": "remote-key-SWx",
        "container": "backups",
    }


def _v3(url: str) -> dict[str, Any]:
    return {
        "type": "SWIFT",
        "name": "remote",
        "auth_url": f"{url}/v3",
        "auth_version": "3",
        "username": "tester",
        "password": "remote-pw-KSx",
        "project_name": "proj",
        "container": "backups",
    }


def _log_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.getbasetemp() / IN_PROCESS_LOG
    return path.read_text(errors="replace") if path.exists() else ""


async def _validate(
    api: Api,
    inst: str,
    body: dict[str, Any],
    canary: str,
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
) -> dict[str, Any]:
    """Validate ``body``, then create it with ?validate=true: neither answer nor any log holds
    the canary."""
    status, answer = await api.call("POST", "/destinations/validate", instance=inst, json=body)
    assert status == 200, answer
    assert answer["ok"] is False, answer
    status, created = await api.call(
        "POST", "/destinations?validate=true", instance=inst, json=body
    )
    assert status == 422 and created["error"] == answer["error"], created
    for text in (json.dumps(answer), json.dumps(created)):
        assert canary not in text, text
    captured = capsys.readouterr()
    assert canary not in captured.out + captured.err
    assert canary not in _log_text(tmp_path_factory)
    return answer


def _xml_error(code: str, canary: str) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Error><Code>{code}</Code><Message>{canary} message</Message>"
        f"<Resource>/{canary}</Resource><RequestId>{canary}</RequestId></Error>"
    )


# --- S3 -------------------------------------------------------------------------------------


async def _s3_denied(r: Remote, _: web.Request) -> web.Response:
    return web.Response(
        status=403,
        reason=f"{r.canary} Reason",
        text=_xml_error("AccessDenied", r.canary),
        headers={"x-amz-bucket-region": r.canary, "Content-Type": "application/xml"},
    )


async def _s3_unknown_code(r: Remote, _: web.Request) -> web.Response:
    return web.Response(
        status=400, reason=f"{r.canary} Reason", text=_xml_error(r.canary, r.canary),
        content_type="application/xml",
    )  # fmt: skip


async def _s3_unavailable(r: Remote, _: web.Request) -> web.Response:
    return web.Response(
        status=503, reason=f"{r.canary} Busy", text=f"<html><body>{r.canary}</body></html>",
        content_type="text/html",
    )  # fmt: skip


async def _s3_slow_down(r: Remote, _: web.Request) -> web.Response:
    return web.Response(
        status=503, reason=f"{r.canary} Busy", text=_xml_error("SlowDown", r.canary),
        content_type="application/xml",
    )  # fmt: skip


async def _s3_region(r: Remote, _: web.Request) -> web.Response:
    return web.Response(
        status=301,
        text=_xml_error("PermanentRedirect", r.canary),
        headers={"x-amz-bucket-region": r.canary, "Content-Type": "application/xml"},
    )


async def _s3_plain_403(r: Remote, _: web.Request) -> web.Response:
    return web.Response(status=403, reason=f"{r.canary} Forbidden", text=r.canary)


@pytest.mark.parametrize(
    ("handler", "code"),
    [
        (_s3_denied, "storage_permission_denied"),
        (_s3_unknown_code, "storage_error"),
        (_s3_unavailable, "storage_not_object_store"),  # S3 would explain in XML
        (_s3_region, "storage_error"),
        (_s3_plain_403, "storage_not_object_store"),  # S3 would explain in XML
        (_s3_slow_down, "storage_transient"),
    ],
    ids=["403-xml", "unknown-code", "503-html", "301-region", "403-text", "503-xml"],
)
async def test_s3_error_answers_are_classified_not_echoed(
    api: Api,
    inst: str,
    remote: Callable[[Handler], Awaitable[Remote]],
    handler: Handler,
    code: str,
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    r = await remote(handler)
    answer = await _validate(api, inst, _s3(r.url), r.canary, tmp_path_factory, capsys)
    assert answer["error"] == code, answer
    assert "127.0.0.1" in answer["description"]  # the host, as the tenant configured it
    assert r.writes() == []  # refused at the listing: nothing was written


async def _filer(r: Remote, request: web.Request) -> web.Response:
    """A file server: takes any PUT and lists directories as JSON, like a SeaweedFS filer."""
    if request.method in ("PUT", "POST"):
        return web.json_response({"name": r.canary, "size": 1}, status=201)
    if request.method == "DELETE":
        return web.Response(status=204)
    return web.json_response({"Path": f"/{r.canary}", "Entries": [], "Limit": 1})


async def _web_page(r: Remote, request: web.Request) -> web.Response:
    """A web application answering 200 to everything, with a page that is well-formed XML."""
    return web.Response(
        text=f"<html><body><p>{r.canary}</p></body></html>", content_type="text/html"
    )


@pytest.mark.parametrize("handler", [_filer, _web_page])
async def test_s3_probe_writes_nothing_to_a_server_that_is_not_s3(
    api: Api,
    inst: str,
    remote: Callable[[Handler], Awaitable[Remote]],
    handler: Handler,
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    r = await remote(handler)
    answer = await _validate(api, inst, _s3(r.url), r.canary, tmp_path_factory, capsys)
    assert answer["error"] == "storage_not_object_store", answer
    assert "does not answer like an S3 server" in answer["description"]
    assert r.seen and r.writes() == []  # it was asked, and sent nothing to keep


# --- Swift auth v1 --------------------------------------------------------------------------


def _v1_auth_fails(status: int) -> Handler:
    async def handler(r: Remote, _: web.Request) -> web.Response:
        return web.Response(
            status=status,
            reason=f"{r.canary} Reason",
            text=f"<html><h1>{r.canary}</h1></html>",
            headers={"X-Trans-Id": r.canary},
        )

    return handler


async def _v1_auth_answers_nothing(r: Remote, _: web.Request) -> web.Response:
    """A 200 with neither storage URL nor token: not Swift's auth."""
    return web.Response(status=200, reason=f"{r.canary} Reason")


def _v1_storage_fails(status: int) -> Handler:
    """Auth succeeds and points back here; every storage request fails with ``status``."""

    async def handler(r: Remote, request: web.Request) -> web.Response:
        if request.path == "/auth/v1.0":
            return web.Response(
                status=200,
                headers={"X-Storage-Url": f"{r.url}/v1/AUTH_test", "X-Auth-Token": "tk-remote"},
            )
        return web.Response(
            status=status, reason=f"{r.canary} Reason", text=f"{r.canary} body text"
        )

    return handler


@pytest.mark.parametrize(
    ("handler", "code"),
    [
        (_v1_auth_fails(401), "storage_auth_failed"),
        (_v1_auth_fails(403), "storage_error"),
        (_v1_auth_fails(500), "storage_transient"),
        (_v1_storage_fails(403), "storage_permission_denied"),
        (_v1_storage_fails(409), "storage_error"),
        (_v1_storage_fails(503), "storage_transient"),
        (_v1_auth_fails(200), "storage_not_object_store"),
        (_v1_auth_answers_nothing, "storage_not_object_store"),
    ],
    ids=[
        "auth-401",
        "auth-403",
        "auth-500",
        "storage-403",
        "storage-409",
        "storage-503",
        "auth-200-page",
        "auth-200-empty",
    ],
)
async def test_swift_v1_answers_are_classified_not_echoed(
    api: Api,
    inst: str,
    remote: Callable[[Handler], Awaitable[Remote]],
    handler: Handler,
    code: str,
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    r = await remote(handler)
    answer = await _validate(api, inst, _v1(r.url), r.canary, tmp_path_factory, capsys)
    assert answer["error"] == code, answer
    assert "127.0.0.1" in answer["description"]


# --- Keystone v3 ----------------------------------------------------------------------------


def _keystone_fails(status: int, *, json_body: bool = True) -> Handler:
    async def handler(r: Remote, _: web.Request) -> web.Response:
        if json_body:
            body = {"error": {"code": status, "title": r.canary, "message": f"{r.canary} said"}}
            return web.json_response(body, status=status, reason=f"{r.canary} Reason")
        return web.Response(status=status, text=f"{r.canary} not json")

    return handler


def _keystone_then_storage_fails(status: int) -> Handler:
    """A token with a catalog whose object-store endpoint is here, where requests fail."""

    async def handler(r: Remote, request: web.Request) -> web.Response:
        if request.path == "/v3/auth/tokens":
            token = {
                "token": {
                    "methods": ["password"],
                    "expires_at": "2099-01-01T00:00:00.000000Z",
                    "issued_at": "2020-01-01T00:00:00.000000Z",
                    "user": {"id": "u", "name": "tester", "domain": {"id": "default"}},
                    "project": {"id": "p", "name": "proj", "domain": {"id": "default"}},
                    "roles": [{"id": "r", "name": "member"}],
                    "catalog": [
                        {
                            "type": "object-store",
                            "name": "swift",
                            "id": "s",
                            "endpoints": [
                                {
                                    "id": "e",
                                    "interface": "public",
                                    "region": "RegionOne",
                                    "region_id": "RegionOne",
                                    "url": f"{r.url}/v1/AUTH_p",
                                }
                            ],
                        }
                    ],
                }
            }
            return web.json_response(token, status=201, headers={"X-Subject-Token": "tk"})
        return web.Response(status=status, reason=f"{r.canary} Reason", text=r.canary)

    return handler


@pytest.mark.parametrize(
    ("handler", "code"),
    [
        (_keystone_fails(401), "storage_auth_failed"),
        (_keystone_fails(400), "storage_error"),
        (_keystone_fails(404, json_body=False), "storage_error"),
        (_keystone_fails(500), "storage_transient"),
        (_keystone_fails(200, json_body=False), "storage_error"),
        (_keystone_then_storage_fails(403), "storage_permission_denied"),
        (_keystone_then_storage_fails(418), "storage_error"),
    ],
    ids=["401", "400", "404-text", "500", "200-text", "storage-403", "storage-418"],
)
async def test_keystone_answers_are_classified_not_echoed(
    api: Api,
    inst: str,
    remote: Callable[[Handler], Awaitable[Remote]],
    handler: Handler,
    code: str,
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    r = await remote(handler)
    answer = await _validate(api, inst, _v3(r.url), r.canary, tmp_path_factory, capsys)
    assert answer["error"] == code, answer
    assert "127.0.0.1" in answer["description"]


# --- not HTTP at all ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["s3", "v1", "v3"])
@pytest.mark.parametrize(
    "reply",
    ["{canary}\r\n\r\n", "HTTP/1.1 299 {canary}\r\n\r\n"],
    ids=["not-http", "odd-status"],
)
async def test_a_status_line_is_not_echoed(
    api: Api,
    inst: str,
    kind: str,
    reply: str,
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    canary = f"CANARY{uuid.uuid4().hex[:12]}"
    audit_secret(canary, "text a remote server chose")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(reply.format(canary=canary).encode())
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        body = {"s3": _s3, "v1": _v1, "v3": _v3}[kind](url)
        result = await _validate(api, inst, body, canary, tmp_path_factory, capsys)
        assert result["error"].startswith("storage_"), result
    finally:
        server.close()
        await server.wait_closed()
