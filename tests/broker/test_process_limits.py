"""``python -m broker`` against requests aiohttp's parser refuses and against slow clients:
an oversized header or URL is answered with JSON that quotes nothing and is logged without its
value; a connection that does not finish its headers, or its body, in time is closed; beyond
HTTP_MAX_CONNECTIONS a connection is refused with 503; normal requests are answered all the
while."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from backup.secrets import generate_master_key_spec
from tests.broker.test_process import PASSWORD, USER, BrokerProcess
from tests.servers.log_audit import audit_secret

CANARY = "canary-" + uuid.uuid4().hex


@pytest.fixture
def start(mongo_url: str, tmp_path: Path) -> Iterator[object]:
    started: list[BrokerProcess] = []

    def run(**env: str) -> BrokerProcess:
        keys = generate_master_key_spec()
        audit_secret(keys.partition(":")[2], "master key of test_process_limits")
        proc = BrokerProcess(
            tmp_path / f"data{len(started)}",
            tmp_path / f"broker{len(started)}.log",
            MONGODB_URL=mongo_url,
            MONGODB_DATABASE=f"t_{uuid.uuid4().hex[:12]}",
            SECRETS_MASTER_KEYS=keys,
            BACKGROUND_ENABLED="false",
            **env,
        )
        started.append(proc.start())
        return proc

    yield run
    for p in started:
        p.stop()


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def _exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw``, read the answer until the server closes: status, headers, body."""
    with _connect(port) as s:
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


def _get(port: int, path: str = "/health") -> int:
    return _exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())[
        0
    ]


def _closed(s: socket.socket, within: float) -> bool:
    """Whether the server closed ``s`` (EOF or reset) within ``within`` seconds."""
    s.settimeout(within)
    try:
        while s.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def test_oversized_header_or_url_gets_json_without_echo(start: object) -> None:
    broker = start()  # type: ignore[operator]
    audit_secret(CANARY, "canary of an oversized header")
    filler = "x" * 16 * 1024
    requests = [
        f"GET /v2/catalog HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CANARY}{filler}\r\n\r\n",
        f"GET /v2/catalog HTTP/1.1\r\nHost: x\r\nX-{CANARY}{filler}: 1\r\n\r\n",
        f"GET /v1/{CANARY}{filler} HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /v2/catalog HTTP/1.1\r\nHost: x\r\n"
        + "".join(f"X-{n}: {CANARY}\r\n" for n in range(300))
        + "\r\n",
    ]
    for raw in requests:
        status, headers, body = _exchange(broker.port, raw.encode())
        assert status == 431, body[:200]
        assert headers["Content-Type"].startswith("application/json")
        answer = json.loads(body)
        assert answer["error"] == "request_header_too_large" and answer["description"]
        assert CANARY not in body.decode() and "xxxxxxxx" not in body.decode()
    assert _get(broker.port) == 200
    log = broker.log.read_text()
    assert CANARY not in log and "xxxxxxxx" not in log
    refused = [e for e in broker.log_lines() if "http_request_refused" in e["event"]]
    assert len(refused) == len(requests)
    assert all(e["level"] == "warning" and "exception" not in e for e in refused), refused


def test_slow_clients_are_cut_off_and_others_served(start: object) -> None:
    broker = start(  # type: ignore[operator]
        HTTP_HEADER_TIMEOUT_SECONDS="1.5", HTTP_BODY_TIMEOUT_SECONDS="1.5"
    )
    # Headers that never end, and connections that send nothing at all.
    partial = [_connect(broker.port) for _ in range(100)]
    for n, s in enumerate(partial):
        if n % 2:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    started = time.monotonic()
    assert _get(broker.port) == 200  # answered meanwhile
    assert all(_closed(s, 10) for s in partial)
    assert time.monotonic() - started < 10
    for s in partial:
        s.close()

    # A body that never ends: 408 in JSON, then the connection closes.
    auth = "Basic " + __import__("base64").b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    with _connect(broker.port) as s:
        s.sendall(
            (
                f"PUT /v2/service_instances/{uuid.uuid4()}?accepts_incomplete=true HTTP/1.1\r\n"
                f"Host: x\r\nAuthorization: {auth}\r\nX-Broker-API-Version: 2.17\r\n"
                'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"service_id"'
            ).encode()
        )
        s.settimeout(10)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), data[:300]
    assert json.loads(body)["error"] == "request_timeout"


def test_connections_beyond_the_limit_are_refused(start: object) -> None:
    broker = start(HTTP_MAX_CONNECTIONS="20")  # type: ignore[operator]
    time.sleep(1)  # the start-up probe's connection is gone
    held = [_connect(broker.port) for _ in range(20)]
    time.sleep(0.5)
    status, headers, body = _exchange(
        broker.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status == 503 and headers["Retry-After"] == "1"
    assert json.loads(body)["error"] == "too_many_connections"
    for s in held[:5]:
        s.close()
    deadline = time.monotonic() + 10
    while _get_or_refused(broker.port) != 200:
        assert time.monotonic() < deadline, "a freed connection slot was not reused"
        time.sleep(0.1)
    for s in held[5:]:
        s.close()
    assert any("http_connections_refused" in e["event"] for e in broker.log_lines())


def _get_or_refused(port: int) -> int:
    try:
        return _get(port)
    except OSError:
        return 0
