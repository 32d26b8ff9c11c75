"""Schema-driven fuzzing of every operation of the OpenAPI document.

For each operation the document lists (so a new endpoint is fuzzed without touching this
file), hypothesis sends bodies generated from the documented request schema (valid by the
schema, at its boundaries), the same bodies mutated, arbitrary JSON, bytes and pathological
payloads, with query strings from the documented parameters or garbage, odd path ids and every
kind of caller. The service must never answer 500, must answer only statuses the document
lists, must give every error the JSON contract, must answer 2xx bodies that match the
documented schema, and a refused request (4xx), a read, or anyone but the broker must leave the
stored data exactly as it was.

Storage is a closed port here: deleting a restore point's files honestly fails (503), which
leaves the point marked ``deleting`` by design; an import reads a destination the request
names, which can be reached from here only on loopback, so it may honestly fail too (503,
nothing imported, nothing changed).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any
from urllib.parse import quote, urlencode

import jsonschema
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from broker.api import openapi
from tests.api.conftest import S3_BODY, SWIFT_BODY, Api, Seeded, plan_body, seed

EXAMPLES = int(os.environ.get("API_FUZZ_EXAMPLES", "30"))
"""Per operation; raise it for a longer hunt: API_FUZZ_EXAMPLES=500 pytest tests/api/test_fuzz.py"""
COLLECTIONS = ("instances", "bindings", "destinations", "plans", "jobs", "restore_points")
DOCUMENT = openapi.document()
OPERATIONS = {
    item["operationId"]: (method.upper(), path, item)
    for path, methods in DOCUMENT["paths"].items()
    for method, item in methods.items()
}
FORMATS = {"password": st.text(min_size=1, max_size=40)}

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.sampled_from(["", " ", "0", "-1", "1e309", "DAYS", "S3", "\x00", "../..", "$gt", "a.b"])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
odd_ids = st.text(min_size=1, max_size=80) | st.sampled_from(
    ["x" * 300, "%00", "null", "0", "$ne", "..", " ", "\u00e9", "a/b", "{}", "*"]
)
odd_query_values = st.text(max_size=40) | st.sampled_from(
    ["0", "-1", "101", "1e3", "99999999999999999999", "\u00b2", "true", "", "null", "A" * 600]
)


def _schema(ref_holder: dict[str, Any]) -> dict[str, Any]:
    return {**ref_holder, "components": DOCUMENT["components"]}


def _body_schema(item: dict[str, Any]) -> dict[str, Any] | None:
    body = item.get("requestBody")
    return _schema(body["content"]["application/json"]["schema"]) if body else None


def _mutate(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """``base`` with one key dropped or set to an arbitrary JSON value."""
    keys = st.sampled_from([*base, "extra", "type", "items", "retention", "encryption"])
    return st.tuples(keys, json_values, st.booleans()).map(
        lambda t: (
            {k: v for k, v in base.items() if not (t[2] and k == t[0])}
            | ({} if t[2] else {t[0]: t[1]})
        )
    )


def _valid_samples(seeded: Seeded) -> list[dict[str, Any]]:
    return [
        S3_BODY,
        SWIFT_BODY,
        plan_body(seeded.ids["destination_id"], name="fuzz"),
        {"restore_point_id": seeded.ids["restore_point_id"]},
        {"plan_id": seeded.ids["plan_id"]},
        {"paused": True},
        {"bucket": "other-bucket"},
    ]


def _bodies(item: dict[str, Any], seeded: Seeded) -> st.SearchStrategy[bytes | None]:
    encoded = json_values.map(lambda v: json.dumps(v).encode())
    options = [
        st.none(),
        encoded,
        st.binary(max_size=40),
        st.sampled_from(_valid_samples(seeded))
        .flatmap(_mutate)
        .map(lambda v: json.dumps(v).encode()),
        st.just(b'{"a":' * 2000),
        st.just(b'{"period": 1' + b"0" * 5000 + b"}"),
        st.just(b"[]"),
    ]
    schema = _body_schema(item)
    if schema is not None:
        documented = from_schema(schema, custom_formats=FORMATS)
        options += [
            documented.map(lambda v: json.dumps(v).encode()),
            documented.filter(lambda v: isinstance(v, dict))
            .flatmap(_mutate)
            .map(lambda v: json.dumps(v).encode()),
        ]
    return st.one_of(*options)


def _query(item: dict[str, Any]) -> st.SearchStrategy[dict[str, str]]:
    params = {p["name"]: p["schema"] for p in item["parameters"] if p["in"] == "query"}
    values: dict[str, st.SearchStrategy[str]] = {
        name: from_schema(schema, custom_formats=FORMATS).map(_as_text) | odd_query_values
        for name, schema in params.items()
    }
    values["unknown"] = odd_query_values
    names = st.lists(st.sampled_from(sorted(values)), unique=True, max_size=3)
    return names.flatmap(lambda chosen: st.fixed_dictionaries({k: values[k] for k in chosen}))


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


async def _snapshot(api: Api) -> dict[str, list[Any]]:
    return {n: await api.db.mongo[n].find().sort("_id", 1).to_list() for n in COLLECTIONS}


@pytest.fixture
async def fuzz_env(api: Api) -> tuple[Api, Seeded, dict[str, str | None]]:
    seeded = await seed(api)
    api.cc.grant("reader", seeded.instance, read=True, manage=False)
    callers: dict[str, str | None] = {
        "broker": None,
        "reader": api.uaa.token("reader"),
        "stranger": api.uaa.token("stranger"),
        "expired": api.uaa.token("reader", expires_in=-600),
        "binding of another instance": "bmk_" + "x" * 43,
    }
    return api, seeded, callers


@pytest.mark.parametrize("operation_id", sorted(OPERATIONS))
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_no_500_and_refusals_change_nothing(
    fuzz_env: tuple[Api, Seeded, dict[str, str | None]], operation_id: str, data: st.DataObject
) -> None:
    api, seeded, callers = fuzz_env
    method, template, item = OPERATIONS[operation_id]
    path = template
    for name in re.findall(r"{(\w+)}", template):
        known = seeded.instance if name == "instance_id" else seeded.ids[name]
        value = data.draw(st.sampled_from([known, known, known]) | odd_ids, label=name)
        # A dot segment is no id: the URL then names another path (/v1/service_instances/../
        # protection is /v1/protection, another operation), which its own run covers.
        assume(value not in (".", ".."))
        path = path.replace("{" + name + "}", quote(value, safe=""))
    query = data.draw(_query(item), label="query")
    body = data.draw(_bodies(item, seeded), label="body")
    who = data.draw(st.sampled_from(["broker", "broker", *callers, "garbage"]), label="caller")
    headers = {"Content-Type": "application/json"}
    if who == "garbage":
        chars = st.characters(min_codepoint=32, max_codepoint=0x2FF, exclude_categories=("Cc",))
        text = st.text(chars, max_size=60)
        scheme = st.sampled_from(["Bearer ", "Basic ", "Bearer bmk_", ""])
        headers["Authorization"] = data.draw(st.builds(str.__add__, scheme, text), label="auth")
    elif callers[who] is not None:
        headers["Authorization"] = f"Bearer {callers[who]}"
    url = path + ("?" + urlencode(query) if query else "")

    before = await _snapshot(api)
    status, answer = await api.call(method, url, data=body, headers=headers)
    after = await _snapshot(api)

    context = (who, method, url, body, status, answer)
    storage_down = (status, operation_id) == (503, "delete_restore_point")
    import_failed = (status, operation_id) == (503, "import_restore_points")
    assert status < 500 or storage_down or import_failed, context
    assert str(status) in item["responses"], context  # only documented answers
    if status >= 400:
        assert isinstance(answer, dict) and isinstance(answer.get("error"), str), context
        assert isinstance(answer.get("description"), str) and answer["description"], context
        assert storage_down or after == before, context  # a refusal changes nothing
        if storage_down or import_failed:
            assert answer["error"] == "storage_unavailable", context
    else:
        documented = item["responses"][str(status)].get("content")
        if documented is not None:
            schema = _schema(documented["application/json"]["schema"])
            jsonschema.Draft202012Validator(schema).validate(answer)
        else:
            assert answer is None, context
    if method == "GET" or who != "broker":  # reads and everyone but the broker change nothing
        assert after == before, context
        platform = not template.startswith("/v1/service_instances/")
        # An id the router cannot take ('..', '{}': normalized away or not matched) names no
        # endpoint: the request reached no operation.
        routed = not (status == 404 and answer.get("error") == "not_found")
        if platform and routed and who != "broker":  # operators only: a tenant is refused
            assert status in (401, 403), context
        elif who not in ("broker", "reader"):
            assert status in (401, 404), context


# --- destination validation with arbitrary endpoints ------------------------------------------
#
# Every address below is closed (refused at once) or denied by the test suite's egress policy
# (refused before any connection), and no generated host is a DNS name other than localhost:
# the hunt opens no slow connection and asks no resolver.

_HOSTS = st.sampled_from(
    [
        "127.0.0.1", "localhost", "[::1]", "[::ffff:127.0.0.1]", "127.0.0.2", "0.0.0.0",
        "169.254.169.254", "[fd00:ec2::254]", "224.0.0.1", "[::]", "bad_host", "b\u00fccher.de",
        "[fe80::1%25eth0]", "[::1", "::1", "-a.b", "a..b", "", " ", "x" * 300, "127.1",
        "2130706433", "0x7f.1", "user:pw@127.0.0.1", "127.0.0.1#frag", "127.0.0.1?q=1",
        "[2001:db8::1]", "\u0661\u0662\u0667.0.0.1", "127.0.0.1\t", "%31%32%37.0.0.1",
    ]
) | st.text(max_size=20).filter(lambda t: not re.fullmatch(r"[A-Za-z0-9.-]*", t))  # fmt: skip
_PORTS = st.sampled_from(["", ":9", ":1", ":0", ":65535", ":65536", ":-1", ":abc", ":", ":09"])
_SCHEMES = st.sampled_from(["http://", "https://", "", "HTTP://", "ftp://", "s3://", "//"])
_PATHS = st.sampled_from(["", "/", "/auth/v1.0", "/v3", "/v2.0", "/%00", "/../x", "/a b"])
_REGIONS = st.sampled_from(["us-east-1", "RegionOne", "bad region!", "", "1", "-x", "\u00e9"]) | (
    st.text(max_size=70)
)
_URLS = st.builds(lambda *p: "".join(p), _SCHEMES, _HOSTS, _PORTS, _PATHS) | st.text(max_size=40)


def _destination(kind: str, url: str, region: str, plain: bool | None) -> dict[str, Any]:
    if kind == "S3":
        body: dict[str, Any] = {**S3_BODY, "endpoint": url, "region": region}
        body.pop("plain_http")
        if plain is not None:
            body["plain_http"] = plain
        return body
    return {**SWIFT_BODY, "auth_url": url, "region_name": region or None,
            "auth_version": "1" if plain else "3", "project_name": "p"}  # fmt: skip


@settings(
    max_examples=2 * EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    kind=st.sampled_from(["S3", "SWIFT"]),
    url=_URLS,
    region=_REGIONS,
    plain=st.none() | st.booleans(),
    create=st.booleans(),
)
async def test_validating_arbitrary_endpoints_never_fails_with_500(
    fuzz_env: tuple[Api, Seeded, dict[str, str | None]],
    kind: str,
    url: str,
    region: str,
    plain: bool | None,
    create: bool,
) -> None:
    """Validation and creation with ?validate=true: whatever the endpoint, auth URL or region,
    a documented answer with the error contract, never a 500 (botocore raised while building
    its client for some of them), and nothing stored."""
    api, seeded, _ = fuzz_env
    body = _destination(kind, url, region, plain)
    operation = "create_destination" if create else "validate_new_destination"
    path = "/destinations?validate=true" if create else "/destinations/validate"
    before = await _snapshot(api)
    status, answer = await api.call("POST", path, instance=seeded.instance, json=body)
    context = (operation, body, status, answer)
    assert status < 500, context
    assert str(status) in OPERATIONS[operation][2]["responses"], context
    assert isinstance(answer, dict), context
    if status >= 400:
        assert isinstance(answer.get("error"), str), context
        assert isinstance(answer.get("description"), str) and answer["description"], context
    else:
        assert status == 200 and answer["ok"] is False, context  # nothing answers there
    assert await _snapshot(api) == before, context
