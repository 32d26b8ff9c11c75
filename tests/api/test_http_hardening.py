"""HTTP hardening of the manager, over HTTP against the in-process service: bodies of changes
are JSON only (a cross-site form cannot send them), CORS only for configured origins, failed
logins throttled per address and per user name, and no nesting depth of JSON gives a 500.
The protocol-level guards (oversized headers, slow clients, connection cap) are tested against
the real process in tests/broker/test_process_limits.py."""

from __future__ import annotations

import json
import uuid
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from broker.config import ConfigError, load_settings
from tests.api.conftest import S3_BODY, Api, ApiFactory, add_instance
from tests.servers.broker import BROKER_PASSWORD, BROKER_USER, OSB_HEADERS
from webguard.throttle import Throttle

DEEP = b"[" * 100_000 + b"]" * 100_000


async def _raw(
    url: str,
    method: str,
    *,
    source: str = "127.0.0.1",
    auth: tuple[str, str] | None = (BROKER_USER, BROKER_PASSWORD),
    headers: dict[str, str] | None = None,
    data: Any = None,
) -> tuple[int, Any, Any]:
    """One request from the loopback address ``source`` (127.0.0.x are distinct addresses)."""
    hdrs = dict(headers or {})
    if auth is not None:
        hdrs["Authorization"] = aiohttp.encode_basic_auth(*auth)
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.request(method, url, headers=hdrs, data=data) as r,
    ):
        raw = await r.read()
        try:
            body = await r.json(content_type=None) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        return r.status, body, r.headers


# --- JSON bodies only -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
)
async def test_json_sent_as_another_type_is_refused_and_changes_nothing(
    api: Api, instance: str, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    url = api.base(instance) + "/destinations"
    status, body, _ = await _raw(url, "POST", headers=headers, data=json.dumps(S3_BODY))
    assert status == 415, body
    assert body["error"] == "unsupported_media_type"
    assert "application/json" in body["description"]
    status, page = await api.call("GET", "/destinations", instance=instance)
    assert status == 200 and page["total"] == 0

    # The OSB endpoints too (a provision with a form body).
    iid = str(uuid.uuid4())
    status, body, _ = await _raw(
        f"{api.service.url}/v2/service_instances/{iid}?accepts_incomplete=true",
        "PUT",
        headers={**OSB_HEADERS, **headers},
        data=json.dumps({"service_id": "x", "plan_id": "y"}),
    )
    assert status == 415, body
    assert body["error"] == "unsupported_media_type"


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "Application/JSON", "application/x+json"]
)
async def test_json_types_are_accepted(api: Api, instance: str, content_type: str) -> None:
    url = api.base(instance) + "/destinations"
    status, body, _ = await _raw(
        url, "POST", headers={"Content-Type": content_type}, data=json.dumps(S3_BODY)
    )
    assert status == 201, body


async def test_osb_requests_as_the_cloud_controller_sends_them_pass(api: Api) -> None:
    # Cloud Controller: Content-Type application/json on PUT/PATCH, no body on DELETE.
    iid = str(uuid.uuid4())
    status, body, _ = await _raw(
        f"{api.service.url}/v2/service_instances/{iid}?accepts_incomplete=true",
        "PUT",
        headers={**OSB_HEADERS, "Content-Type": "application/json"},
        data=b'{"service_id": "nope", "plan_id": "nope"}',
    )
    assert status == 400 and body["error"] != "unsupported_media_type", body
    status, body, _ = await _raw(
        f"{api.service.url}/v2/service_instances/{iid}?service_id=s&plan_id=p",
        "DELETE",
        headers=OSB_HEADERS,
    )
    assert status == 410, body


# --- CORS -----------------------------------------------------------------------------------


async def test_no_cors_headers_without_configured_origins(api: Api, instance: str) -> None:
    origin = {"Origin": "https://evil.example"}
    for method, headers in [
        ("GET", origin),
        ("OPTIONS", {**origin, "Access-Control-Request-Method": "POST"}),
    ]:
        status, _, answer = await _raw(
            api.base(instance) + "/destinations", method, headers=headers
        )
        assert status < 500
        assert not [h for h in answer if h.lower().startswith("access-control-")], answer


async def test_cors_only_for_the_configured_origins(make_api: ApiFactory) -> None:
    api = await make_api(CORS_ALLOWED_ORIGINS="https://dash.example, https://ops.example/")
    instance = await add_instance(api.db)
    url = api.base(instance) + "/destinations"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x"}
    status, _, h = await _raw(
        url, "OPTIONS", auth=None, headers={"Origin": "https://ops.example", **preflight}
    )
    assert status == 204
    assert h["Access-Control-Allow-Origin"] == "https://ops.example"
    assert "Origin" in h.getall("Vary")
    assert "POST" in h["Access-Control-Allow-Methods"]
    assert "Authorization" in h["Access-Control-Allow-Headers"]
    assert "Access-Control-Allow-Credentials" not in h

    status, _, h = await _raw(url, "GET", headers={"Origin": "https://dash.example"})
    assert status == 200
    assert h["Access-Control-Allow-Origin"] == "https://dash.example"
    assert "Access-Control-Allow-Credentials" not in h

    for origin in ("https://evil.example", "https://dash.example.evil", "null"):
        status, _, h = await _raw(
            url, "OPTIONS", auth=None, headers={"Origin": origin, **preflight}
        )
        assert "Access-Control-Allow-Origin" not in h, origin
        status, _, h = await _raw(url, "GET", headers={"Origin": origin})
        assert status == 200 and "Access-Control-Allow-Origin" not in h, origin


@pytest.mark.parametrize("value", ["*", "https://*.example", "dash.example"])
def test_cors_origins_must_be_exact(value: str, tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="CORS_ALLOWED_ORIGINS"):
        load_settings(CORS_ALLOWED_ORIGINS=value, DATA_DIR=str(tmp_path))


# --- failed logins --------------------------------------------------------------------------


async def test_password_guessing_is_throttled_per_address_and_per_user(
    make_api: ApiFactory,
) -> None:
    api = await make_api(AUTH_FAILURE_LIMIT="5", AUTH_FAILURE_WINDOW_SECONDS="60")
    catalog = api.service.url + "/v2/catalog"
    # The platform has been logging in from 127.0.0.1.
    assert (await _raw(catalog, "GET", headers=OSB_HEADERS))[0] == 200

    attacker = "127.0.0.2"
    with capture_logs() as logs:
        statuses = [
            (
                await _raw(
                    catalog,
                    "GET",
                    source=attacker,
                    auth=(BROKER_USER, f"guess-{n}"),
                    headers=OSB_HEADERS,
                )
            )[0]
            for n in range(8)
        ]
        assert statuses == [401] * 5 + [429] * 3
        status, body, headers = await _raw(
            catalog, "GET", source=attacker, auth=(BROKER_USER, "guess-x"), headers=OSB_HEADERS
        )
        assert status == 429 and body["error"] == "too_many_attempts", body
        assert 1 <= int(headers["Retry-After"]) <= 60
        # Held back from the attacker's address even with the right password: otherwise the
        # answer would tell the right guess from the wrong ones.
        status, body, _ = await _raw(catalog, "GET", source=attacker, headers=OSB_HEADERS)
        assert status == 429
        # The platform, which logged in before, is not slowed.
        assert (await _raw(catalog, "GET", headers=OSB_HEADERS))[0] == 200
        assert (await api.call("GET", "/destinations", instance=str(uuid.uuid4())))[0] == 404
        # A new address guessing the same user name (the attack spread over addresses) is held
        # back for that user name, even with the right password, until the window passes.
        status, body, _ = await _raw(catalog, "GET", source="127.0.0.3", headers=OSB_HEADERS)
        assert status == 429 and "user" in body["description"], body
        # ... but may log in as another account, and is not throttled as an address.
        status, body, _ = await _raw(
            catalog, "GET", source="127.0.0.3", auth=("someone", "x"), headers=OSB_HEADERS
        )
        assert status == 401, body

    throttled = [e for e in logs if e["event"] == "auth_throttled"]
    assert [(e["scope"], e["client"]) for e in throttled] == [
        ("address", attacker),
        ("user", "127.0.0.3"),
    ]
    assert throttled[0]["user"] == BROKER_USER and throttled[0]["log_level"] == "warning"
    assert all("guess" not in str(e) and BROKER_PASSWORD not in str(e) for e in logs)


async def test_api_keys_and_tokens_are_throttled_per_address(make_api: ApiFactory) -> None:
    api = await make_api(AUTH_FAILURE_LIMIT="3")
    instance = await add_instance(api.db)
    url = api.base(instance) + "/destinations"
    attacker = "127.0.0.4"
    statuses = []
    for n in range(3):
        bearer = {"Authorization": f"Bearer bmk_{'x' * 40}{n}"}
        statuses.append((await _raw(url, "GET", source=attacker, auth=None, headers=bearer))[0])
    jwt = {"Authorization": "Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln"}
    status, body, headers = await _raw(url, "GET", source=attacker, auth=None, headers=jwt)
    assert statuses == [401, 401, 401]
    assert status == 429 and body["error"] == "too_many_attempts" and "Retry-After" in headers
    # Operators with Basic from another address are not slowed.
    assert (await api.call("GET", "/destinations", instance=instance))[0] == 200
    # Requests without credentials are not failed logins.
    for _ in range(5):
        assert (await _raw(url, "GET", source="127.0.0.5", auth=None))[0] == 401


async def test_behind_a_router_the_forwarded_address_counts(make_api: ApiFactory) -> None:
    api = await make_api(AUTH_FAILURE_LIMIT="2", TRUSTED_PROXY_HOPS="1")
    catalog = api.service.url + "/v2/catalog"

    async def via_router(client: str, password: str, spoofed: str = "") -> int:
        forwarded = f"{spoofed}, {client}" if spoofed else client
        return (
            await _raw(
                catalog,
                "GET",
                auth=(BROKER_USER, password),
                headers={**OSB_HEADERS, "X-Forwarded-For": forwarded},
            )
        )[0]

    assert await via_router("10.0.0.1", BROKER_PASSWORD) == 200
    # An attacker choosing the leftmost entries does not escape its own (router-added) one.
    assert [await via_router("10.0.0.9", "guess", f"192.0.2.{n}") for n in range(3)] == [
        401,
        401,
        429,
    ]
    assert await via_router("10.0.0.1", BROKER_PASSWORD) == 200  # same router, other client


def test_throttle_memory_is_bounded() -> None:
    # An attacker varying user names and addresses cannot grow the counters without bound.
    throttle = Throttle(3, 60, max_keys=1000)
    for n in range(50_000):
        throttle.failed(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}", f"user-{n}")
        throttle.succeeded(f"10.0.0.{n % 256}", f"user-{n}")
    assert len(throttle._counters) <= 1000 and len(throttle._known) <= 1000


# --- nesting --------------------------------------------------------------------------------


async def test_deeply_nested_json_is_a_400_never_a_500(api: Api, instance: str) -> None:
    json_type = {"Content-Type": "application/json"}
    inside = b'{"type": "S3", "name": ' + b"[" * 900 + b"]" * 900 + b"}"
    for body in (DEEP, b'{"a": ' + DEEP + b"}", inside):
        status, answer, _ = await _raw(
            api.base(instance) + "/destinations", "POST", headers=json_type, data=body
        )
        assert status == 400, answer
        assert answer["error"] in ("malformed_json", "invalid_input"), answer
        status, answer, _ = await _raw(
            f"{api.service.url}/v2/service_instances/{uuid.uuid4()}?accepts_incomplete=true",
            "PUT",
            headers={**OSB_HEADERS, **json_type},
            data=body,
        )
        assert status == 400, answer
