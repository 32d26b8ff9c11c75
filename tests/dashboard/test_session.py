"""The dashboard's cookies and redirects without a browser: sealed sessions that cannot be read
or altered, and the one place a sign-in may return to."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from backup.secrets import SecretBox, generate_master_key_spec, parse_master_keys
from broker.dashboard.session import (
    SESSION_COOKIE,
    Session,
    read_session,
    safe_next,
    write_session,
)


def box() -> SecretBox:
    return SecretBox(parse_master_keys(generate_master_key_spec()))


def session(**fields: object) -> Session:
    values: dict[str, object] = {
        "subject": "dev-1",
        "name": "dev-1@example.com",
        "token": "header.claims.signature",
        "operator": False,
        "csrf": "c" * 43,
        "expires_at": time.time() + 60,
        **fields,
    }
    return Session(**values)


def written(keys: SecretBox, value: Session, base_url: str = "http://127.0.0.1:1") -> str:
    response = web.Response()
    write_session(response, make_mocked_request("GET", "/dashboard/"), keys, base_url, value)
    return response.cookies[SESSION_COOKIE].OutputString()


def cookie_value(header: str) -> str:
    return header.split(";", 1)[0].split("=", 1)[1]


def read(keys: SecretBox, value: str) -> Session | None:
    request = make_mocked_request("GET", "/dashboard/", headers={"Cookie": f"bm_session={value}"})
    return read_session(request, keys)


def test_a_session_round_trips_sealed() -> None:
    keys, value = box(), session()
    header = written(keys, value)
    assert read(keys, cookie_value(header)) == value
    assert value.token not in header and value.csrf not in header  # encrypted, not encoded
    flags = header.lower()
    assert "httponly" in flags and "samesite=lax" in flags and "path=/dashboard" in flags
    assert "secure" not in flags  # plain HTTP: a Secure cookie would never come back


def test_the_cookie_is_secure_behind_tls() -> None:
    assert "secure" in written(box(), session(), "https://backups.example.com").lower()


@pytest.mark.parametrize("change", ["altered", "other keys", "expired", "garbage"])
def test_a_session_that_is_not_ours_is_none(change: str) -> None:
    keys = box()
    value = cookie_value(written(keys, session()))
    if change == "altered":
        wire = json.loads(base64.urlsafe_b64decode(value))
        ciphertext = bytearray(base64.urlsafe_b64decode(wire["ct"]))
        ciphertext[0] ^= 1
        wire["ct"] = base64.urlsafe_b64encode(bytes(ciphertext)).decode()
        assert read(keys, base64.urlsafe_b64encode(json.dumps(wire).encode()).decode()) is None
    elif change == "other keys":
        assert read(box(), value) is None
    elif change == "expired":
        assert read(keys, cookie_value(written(keys, session(expires_at=time.time() - 1)))) is None
    else:
        assert read(keys, "not-base64!") is None


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/dashboard/instances/abc/plans", "/dashboard/instances/abc/plans"),
        ("/dashboard/instances/abc?x=1", "/dashboard/instances/abc?x=1"),
        (None, "/dashboard/"),
        ("https://evil.example/dashboard/", "/dashboard/"),
        ("//evil.example/dashboard/", "/dashboard/"),
        ("/dashboard//evil.example", "/dashboard/"),
        ("/dashboard/\\evil.example", "/dashboard/"),
        ("/dashboard/\n/x", "/dashboard/"),
        ("/v1/service_instances", "/dashboard/"),
        ("javascript:alert(1)", "/dashboard/"),
    ],
)
def test_sign_in_returns_only_to_a_dashboard_page(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected


def test_the_session_fields_are_what_is_sealed() -> None:
    assert set(asdict(session())) == {"subject", "name", "token", "operator", "csrf", "expires_at"}
