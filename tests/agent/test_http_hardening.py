"""HTTP hardening of the agent, over HTTP against the real process: JSON-only bodies, no CORS,
no 500 for deep nesting, failed logins throttled, oversized headers answered in JSON without
echo, slow clients cut off."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from tests.agent.helpers import PASSWORD, USER, AgentProcess, backup_request
from tests.servers.log_audit import audit_secret

Make = Callable[..., AgentProcess]


def _call(
    agent: AgentProcess,
    method: str,
    path: str,
    *,
    source: str = "127.0.0.1",
    auth: tuple[str, str] | None = (USER, PASSWORD),
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, Any, http.client.HTTPResponse]:
    """One request from the loopback address ``source`` (127.0.0.x are distinct addresses)."""
    conn = http.client.HTTPConnection(
        "127.0.0.1", agent.port, timeout=30, source_address=(source, 0)
    )
    hdrs = dict(headers or {})
    if auth is not None:
        hdrs["Authorization"] = (
            "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        )
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode(errors="replace")
    return resp.status, parsed, resp


def test_json_bodies_only(agent: AgentProcess) -> None:
    job = backup_request("form-1")
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": content_type} if content_type else {}
        status, body, _ = _call(
            agent, "POST", "/backup", headers=headers, body=json.dumps(job).encode()
        )
        assert status == 415, body
        assert body["error"] == "unsupported_media_type" and body["message"], body
    assert _call(agent, "GET", "/backup/form-1")[0] == 404  # nothing started
    assert agent.trace_lines() == []
    status, body, _ = _call(
        agent,
        "POST",
        "/backup",
        headers={"Content-Type": "application/json; charset=utf-8"},
        body=json.dumps(backup_request("json-1")).encode(),
    )
    assert status == 201, body


def test_no_cors_headers(agent: AgentProcess) -> None:
    origin = {"Origin": "https://evil.example"}
    for method, headers in [
        ("GET", origin),
        ("OPTIONS", {**origin, "Access-Control-Request-Method": "POST"}),
    ]:
        for auth in ((USER, PASSWORD), None):
            _, _, resp = _call(agent, method, "/status", headers=headers, auth=auth)
            assert not [h for h, _ in resp.getheaders() if h.lower().startswith("access-control")]


def test_deeply_nested_json_is_a_400(agent: AgentProcess) -> None:
    json_type = {"Content-Type": "application/json"}
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"id": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"):
        for method, path in (("POST", "/backup"), ("PUT", "/restore"), ("DELETE", "/backup")):
            status, body, _ = _call(agent, method, path, headers=json_type, body=raw)
            assert status == 400, (method, body)
            assert body["error"] == "invalid_request" and body["message"], body
    assert "RecursionError" not in agent.logs()


def test_password_guessing_is_throttled(make_agent: Make) -> None:
    agent = make_agent(auth_failure_limit="5", auth_failure_window_seconds="60")
    assert _call(agent, "GET", "/status")[0] == 200  # the manager, logging in from 127.0.0.1
    attacker = "127.0.0.2"
    guesses = [f"guess-{uuid.uuid4().hex[:8]}" for _ in range(8)]
    statuses = [_call(agent, "GET", "/status", source=attacker, auth=(USER, g))[0] for g in guesses]
    assert statuses == [401] * 5 + [429] * 3
    status, body, resp = _call(agent, "GET", "/status", source=attacker, auth=(USER, "x"))
    assert status == 429 and body["error"] == "too_many_attempts" and body["message"], body
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    # Held back from the attacker's address even with the right password.
    assert _call(agent, "GET", "/status", source=attacker)[0] == 429
    # The manager is not slowed.
    assert _call(agent, "GET", "/status")[0] == 200
    # Another address guessing the same user name is held back for it ...
    assert _call(agent, "GET", "/status", source="127.0.0.3")[0] == 429
    # ... and each hold is logged once, with the address, never a password.
    events = [json.loads(line) for line in agent.logs().splitlines() if '"auth_throttled"' in line]
    assert [(e["scope"], e["client"]) for e in events] == [
        ("address", attacker),
        ("user", "127.0.0.3"),
    ]
    assert events[0]["user"] == USER
    logs = agent.logs()
    assert PASSWORD not in logs and not any(g in logs for g in guesses)


def test_oversized_header_gets_json_without_echo(agent: AgentProcess) -> None:
    canary = audit_secret("canary-" + uuid.uuid4().hex, "canary of an oversized agent header")
    filler = "x" * 16 * 1024
    for raw in (
        f"GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {canary}{filler}\r\n\r\n",
        f"GET /backup/{canary}{filler} HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as s:
            s.sendall(raw.encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.split()[1] == b"431", data[:300]
        answer = json.loads(body)
        assert answer["error"] == "request_header_too_large" and answer["message"]
        assert canary.encode() not in data
    assert _call(agent, "GET", "/status")[0] == 200
    assert canary not in agent.logs() and "xxxxxxxx" not in agent.logs()


def test_slow_clients_are_cut_off(make_agent: Make) -> None:
    agent = make_agent(http_header_timeout_seconds="1.5", http_max_connections="60")
    slow = [socket.create_connection(("127.0.0.1", agent.port), timeout=10) for _ in range(50)]
    for s in slow:
        s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    started = time.monotonic()
    assert _call(agent, "GET", "/status")[0] == 200  # answered meanwhile
    for s in slow:
        s.settimeout(10)
        try:
            assert s.recv(1024) == b""
        except ConnectionResetError:
            pass
        s.close()
    assert time.monotonic() - started < 10
    # Beyond the connection limit: 503 in JSON (the 50 above are gone: none is counted).
    held = [socket.create_connection(("127.0.0.1", agent.port), timeout=10) for _ in range(60)]
    time.sleep(0.3)
    status, body, _ = _call(agent, "GET", "/status")
    assert status == 503 and body["error"] == "too_many_connections", body
    for s in held:
        s.close()
