"""Who may do what: user tokens (UAA/OIDC + Cloud Controller permissions), binding keys,
broker Basic auth, the operator scope; unknown and forbidden instances look the same."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import time
import uuid
from typing import Any
from urllib.parse import unquote

import jwt
import pytest

from broker.api.routes import OPERATIONS, PLATFORM_OPERATIONS
from broker.api.settings import load_api_settings
from broker.config import ConfigError
from tests.api.conftest import (
    ITEMS,
    S3_BODY,
    Api,
    ApiFactory,
    add_instance,
    plan_body,
    sample_body,
    seed,
)
from tests.servers.broker import BROKER_PASSWORD, BROKER_USER
from tests.servers.ports import free_port
from tests.servers.uaa import rsa_key


async def test_no_or_bad_credentials_get_401_with_challenge(api: Api, instance: str) -> None:
    for headers in (
        {},
        {"Authorization": "Digest abc"},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic !!!"},
        {"Authorization": "Basic " + base64.b64encode(b"test-broker:wrong").decode()},
        {"Authorization": "Basic " + base64.b64encode(b"nobody").decode()},
        {"Authorization": "Bearer not.a.jwt"},
        {"Authorization": "Bearer bmk_unknownkey"},
        {"Authorization": "Bearer bmk_\u00e9\u00e9"},
        {"Authorization": "Bearer \u00e9yJ.x.y"},
        {"Authorization": "Basic " + base64.b64encode("\u00e9:\u00e9".encode()).decode()},
    ):
        status, body = await api.call(
            "GET", "/plans", instance=instance, headers=headers, basic=None
        )
        assert status == 401, (headers, body)
        assert body["error"] == "unauthorized"
        assert "Bearer" in api.last_headers["WWW-Authenticate"]


async def test_user_sees_only_instances_the_cloud_controller_grants(api: Api) -> None:
    a = await add_instance(api.db)
    b = await add_instance(api.db)
    api.cc.grant("alice", a)
    token = api.uaa.token("alice")
    status, _ = await api.call("POST", "/destinations", instance=a, token=token, json=S3_BODY)
    assert status == 201
    assert (await api.call("GET", "/destinations", instance=a, token=token))[0] == 200
    status, denied = await api.call("GET", "/destinations", instance=b, token=token)
    assert status == 404
    status, unknown = await api.call("GET", "/destinations", instance="no-such-id", token=token)
    assert status == 404
    # a user cannot tell an instance it may not see from one that does not exist
    assert denied["error"] == unknown["error"] == "instance_not_found"
    assert denied["description"].replace(b, "X") == unknown["description"].replace(
        "no-such-id", "X"
    )
    status, _ = await api.call("POST", "/destinations", instance=b, token=token, json=S3_BODY)
    assert status == 404
    assert await api.db.destinations.count_documents({"instance_id": b}) == 0


async def test_read_only_user_cannot_change_anything(
    api: Api, instance: str, destination: dict, plan: dict
) -> None:
    api.cc.grant("auditor", instance, read=True, manage=False)
    token = api.uaa.token("auditor")
    for path in (
        "/plans",
        f"/plans/{plan['id']}",
        "/destinations",
        "/jobs",
        "/items",
        "/restore_points",
    ):
        status, body = await api.call("GET", path, instance=instance, token=token)
        assert status == 200, (path, body)
    for method, path, body in (
        ("POST", "/destinations", S3_BODY),
        ("PATCH", f"/destinations/{destination['id']}", {"bucket": "zzz"}),
        ("DELETE", f"/destinations/{destination['id']}", None),
        ("POST", "/plans", plan_body(destination["id"], name="x")),
        ("PATCH", f"/plans/{plan['id']}", {"paused": True}),
        ("DELETE", f"/plans/{plan['id']}", None),
        ("POST", f"/plans/{plan['id']}/backups", None),
        ("POST", "/restores", {"restore_point_id": "x"}),
        ("POST", "/destinations/validate", S3_BODY),
    ):
        status, answer = await api.call(method, path, instance=instance, token=token, json=body)
        assert status == 403 and answer["error"] == "forbidden", (method, path, answer)
    assert await api.db.plans.count_documents({}) == 1
    assert await api.db.jobs.count_documents({}) == 0


async def test_bad_tokens_are_refused(api: Api, instance: str) -> None:
    api.cc.grant("alice", instance)
    other_key = rsa_key()
    now = int(time.time())
    tokens = {
        "expired": api.uaa.token("alice", expires_in=-120),
        "wrong signature": api.uaa.token("alice", key=other_key),
        "unknown kid": api.uaa.token("alice", key=other_key, kid="nope"),
        "wrong audience": api.uaa.token("alice", aud=["other"]),
        "wrong issuer": api.uaa.token("alice", issuer="https://evil/oauth/token"),
        "not yet valid": api.uaa.token("alice", nbf=now + 3600),
        "HS256": jwt.encode({"sub": "alice", "exp": now + 60, "iss": api.uaa.issuer}, "k" * 32),
        "none": jwt.encode({"sub": "alice", "exp": now + 60}, None, algorithm="none"),
    }
    for what, token in tokens.items():
        status, body = await api.call("GET", "/plans", instance=instance, token=token)
        assert status == 401, (what, body)
        assert "WWW-Authenticate" in api.last_headers
    assert (await api.call("GET", "/plans", instance=instance, token=api.uaa.token("alice")))[
        0
    ] == 200


async def test_key_rotation_refetches_keys_and_es256_works(api: Api, instance: str) -> None:
    api.cc.grant("alice", instance)
    assert (await api.call("GET", "/plans", instance=instance, token=api.uaa.token("alice")))[
        0
    ] == 200
    fetched = api.uaa.jwks_requests
    api.uaa.add_ec_key("key-ec")
    token = api.uaa.token("alice", kid="key-ec")
    assert (await api.call("GET", "/plans", instance=instance, token=token))[0] == 200
    assert api.uaa.jwks_requests == fetched + 1
    assert (await api.call("GET", "/items", instance=instance, token=token))[0] == 200
    assert api.uaa.jwks_requests == fetched + 1  # cached


async def test_permissions_are_cached(api: Api, instance: str) -> None:
    api.cc.grant("alice", instance)
    token = api.uaa.token("alice")
    for _ in range(5):
        assert (await api.call("GET", "/plans", instance=instance, token=token))[0] == 200
    assert api.cc.requests == 1


async def test_operator_scope_acts_everywhere(api: Api) -> None:
    a = await add_instance(api.db)
    b = await add_instance(api.db)
    token = api.uaa.token("ops", scope=["openid", "backup_manager.admin"])
    for inst in (a, b):
        status, _ = await api.call(
            "POST", "/destinations", instance=inst, token=token, json=S3_BODY
        )
        assert status == 201
    assert api.cc.requests == 0
    updating = await add_instance(api.db, state="updating")
    assert (await api.call("GET", "/items", instance=updating, token=token))[0] == 200
    # but not on unknown or deleted instances
    gone = await add_instance(api.db, state="deleted")
    deprov = await add_instance(api.db, state="deprovisioning")
    for inst in ("missing", gone, deprov):
        assert (await api.call("GET", "/plans", instance=inst, token=token))[0] == 404


async def test_binding_key_works_only_for_its_instance(api: Api) -> None:
    a = await add_instance(api.db)
    b = await add_instance(api.db)
    key = "bmk_" + "k" * 43
    await api.db.bindings.insert_one(
        {
            "_id": "bind-1",
            "instance_id": a,
            "key_hash": hashlib.sha256(key.encode()).hexdigest(),
            "state": "ready",
            "schema_version": 1,
        }
    )
    status, dest = await api.call("POST", "/destinations", instance=a, token=key, json=S3_BODY)
    assert status == 201
    _, plan = await api.call("POST", "/plans", instance=a, token=key, json=plan_body(dest["id"]))
    status, _job = await api.call("POST", f"/plans/{plan['id']}/backups", instance=a, token=key)
    assert status == 202
    assert (await api.call("GET", "/plans", instance=b, token=key))[0] == 404
    assert (await api.call("POST", "/destinations", instance=b, token=key, json=S3_BODY))[0] == 404
    await api.db.bindings.update_one({"_id": "bind-1"}, {"$set": {"state": "deleted"}})
    assert (await api.call("GET", "/plans", instance=a, token=key))[0] == 401


async def test_user_without_cloud_controller_grant_on_unknown_instance(api: Api) -> None:
    token = api.uaa.token("mallory")
    status, _body = await api.call("GET", "/jobs", instance="x" * 5000, token=token)
    assert status == 404


async def test_unknown_kids_do_not_hammer_the_issuer(make_api: ApiFactory) -> None:
    api = await make_api(JWKS_MIN_REFRESH_SECONDS="60")
    inst = await add_instance(api.db)
    api.cc.grant("alice", inst)
    assert (await api.call("GET", "/plans", instance=inst, token=api.uaa.token("alice")))[0] == 200
    fetched = api.uaa.jwks_requests
    forged = rsa_key()
    for n in range(10):
        token = api.uaa.token("alice", key=forged, kid=f"forged-{n}")
        assert (await api.call("GET", "/plans", instance=inst, token=token))[0] == 401
    assert api.uaa.jwks_requests == fetched


def test_bad_api_configuration_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIN_PLAN_INTERVAL_SECONDS", "-5")
    with pytest.raises(ConfigError, match="MIN_PLAN_INTERVAL_SECONDS"):
        load_api_settings()


async def test_unreachable_issuer_or_cloud_controller_is_503(make_api: ApiFactory) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    api = await make_api(CLOUD_CONTROLLER_URL=closed)
    inst = await add_instance(api.db)
    status, body = await api.call("GET", "/plans", instance=inst, token=api.uaa.token("alice"))
    assert status == 503 and body["error"] == "authorization_unavailable"

    api = await make_api(OIDC_ISSUER=closed + "/oauth/token")
    inst = await add_instance(api.db)
    token = api.uaa.token("alice", issuer=closed + "/oauth/token")
    status, body = await api.call("GET", "/plans", instance=inst, token=token)
    assert status == 503 and body["error"] == "identity_provider_unavailable"
    # Basic auth does not depend on them
    assert (await api.call("GET", "/plans", instance=inst))[0] == 200


# --- every operation, derived from the registry, so a new endpoint is covered too -----------

COLLECTIONS = ("instances", "bindings", "destinations", "plans", "jobs", "restore_points")


async def _snapshot(api: Api) -> dict[str, list[Any]]:
    return {n: await api.db.mongo[n].find().sort("_id", 1).to_list() for n in COLLECTIONS}


def _same_answer(a: tuple[int, Any], b: tuple[int, Any], a_id: str, b_id: str) -> bool:
    """Equal once the instance ids named in them are swapped for a placeholder."""

    def norm(answer: tuple[int, Any], instance_id: str) -> tuple[int, Any]:
        status, body = answer
        if not isinstance(body, dict):
            return answer
        decoded = unquote(instance_id)
        text = str(body.get("description", ""))
        text = text.replace(repr(decoded[:100]), "ID").replace(decoded, "ID")
        return status, {**body, "description": text}

    return norm(a, a_id) == norm(b, b_id)


async def _add_binding(api: Api, instance: str) -> str:
    key = "bmk_" + uuid.uuid4().hex + "x" * 11
    await api.db.bindings.insert_one(
        {
            "_id": uuid.uuid4().hex,
            "instance_id": instance,
            "key_hash": hashlib.sha256(key.encode()).hexdigest(),
            "state": "ready",
            "schema_version": 1,
        }
    )
    return key


async def test_callers_of_one_instance_get_nothing_of_another(api: Api) -> None:
    a = await seed(api)
    b = await seed(api)
    api.cc.grant("alice", a.instance)
    api.cc.grant("alice", "unknown-instance")  # even where the platform says yes
    callers = {
        "user of A": {"token": api.uaa.token("alice")},
        "binding of A": {"token": await _add_binding(api, a.instance)},
        "user of nothing": {"token": api.uaa.token("mallory")},
    }
    before = await _snapshot(api)
    for who, auth in callers.items():
        for operation in OPERATIONS:
            answers = []
            for target in (b.instance, "unknown-instance"):
                answers.append(
                    await api.call(
                        operation.method,
                        b.path(operation),
                        instance=target,
                        json=sample_body(operation, b),
                        **auth,
                    )
                )
            (status, body), other = answers
            assert status == 404 and body["error"] == "instance_not_found", (who, operation.path)
            assert _same_answer(answers[0], other, b.instance, "unknown-instance"), (who, answers)
    assert await _snapshot(api) == before
    # and each works on its own instance
    for auth in list(callers.values())[:2]:
        assert (await api.call("GET", "/plans", instance=a.instance, **auth))[0] == 200


async def test_read_only_user_reads_everything_and_changes_nothing(api: Api) -> None:
    s = await seed(api)
    api.cc.grant("auditor", s.instance, read=True, manage=False)
    token = api.uaa.token("auditor")
    before = await _snapshot(api)
    for operation in OPERATIONS:
        status, body = await api.call(
            operation.method,
            s.path(operation),
            instance=s.instance,
            token=token,
            json=sample_body(operation, s),
        )
        if not operation.manage:  # the audit trail is read with manage rights
            assert status == 200, (operation.path, body)
        else:
            assert (status, body["error"]) == (403, "forbidden"), (operation.path, body)
            assert "read" in body["description"]
    assert await _snapshot(api) == before


async def test_unseen_and_unknown_instances_answer_alike_on_any_path(api: Api) -> None:
    """Methods a path does not accept, paths that do not exist, malformed ids: a caller that
    may not see an instance cannot tell it from one that does not exist."""
    s = await seed(api)
    binding_of_other = await _add_binding(api, await add_instance(api.db))
    callers: dict[str, dict[str, Any]] = {
        "stranger": {"token": api.uaa.token("mallory")},
        "other binding": {"token": binding_of_other},
        "anonymous": {"basic": None},
        "expired": {"token": api.uaa.token("alice", expires_in=-3600)},
    }
    api.cc.grant("alice", s.instance)
    paths = {s.path(o) for o in OPERATIONS} | {
        "/nothing-here",
        "/plans/x/y",
        "/jobs/%2F..%2F",
        "/restore_points/" + "r" * 300,
        "",
    }
    unknown_ids = ["unknown-instance", "x" * 300, "%C3%A9%00", "q%2Fq", "$ne", "zq%20zq"]
    for who, auth in callers.items():
        for path in sorted(paths):
            for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
                seen = await api.call(method, path, instance=s.instance, json={}, **auth)
                assert seen[0] in (401, 404, 405), (who, method, path, seen)
                for unknown in unknown_ids:
                    answer = await api.call(method, path, instance=unknown, json={}, **auth)
                    assert _same_answer(seen, answer, s.instance, unknown), (
                        who, method, path, unknown, seen, answer
                    )  # fmt: skip


async def test_operator_basic_credentials(
    make_api: ApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = await make_api(OPERATOR_USERNAME="ops", OPERATOR_PASSWORD="ops-password-123")
    inst = await add_instance(api.db)
    status, _ = await api.call(
        "POST", "/destinations", instance=inst, basic=("ops", "ops-password-123"), json=S3_BODY
    )
    assert status == 201
    for wrong in (("ops", "nope"), ("ops", BROKER_PASSWORD), (BROKER_USER, "ops-password-123")):
        assert (await api.call("GET", "/plans", instance=inst, basic=wrong))[0] == 401
    assert (await api.call("GET", "/plans", instance=inst))[0] == 200  # broker too

    monkeypatch.setenv("OPERATOR_PASSWORD", "")
    with pytest.raises(ConfigError, match="together"):
        load_api_settings()


async def test_retired_signing_keys_stop_working_after_the_maximum_age(
    make_api: ApiFactory,
) -> None:
    api = await make_api(JWKS_MIN_REFRESH_SECONDS="3600", JWKS_MAX_AGE_SECONDS="0.3")
    inst = await add_instance(api.db)
    api.cc.grant("alice", inst)
    old = api.uaa.token("alice")
    assert (await api.call("GET", "/plans", instance=inst, token=old))[0] == 200
    api.uaa.keys = {"key-2": rsa_key()}  # the issuer rotated and retired key-1
    deadline = time.monotonic() + 30
    status = 200
    while status == 200 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        status, body = await api.call("GET", "/plans", instance=inst, token=old)
    assert status == 401, body
    new = api.uaa.token("alice", kid="key-2")
    assert (await api.call("GET", "/plans", instance=inst, token=new))[0] == 200


async def test_issuer_down_is_503_every_time_not_401(make_api: ApiFactory) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    api = await make_api(OIDC_JWKS_URL=closed + "/token_keys", JWKS_MIN_REFRESH_SECONDS="3600")
    inst = await add_instance(api.db)
    for _ in range(3):
        status, body = await api.call("GET", "/plans", instance=inst, token=api.uaa.token("alice"))
        assert (status, body["error"]) == (503, "identity_provider_unavailable"), body


async def test_a_binding_made_through_osb_gives_the_application_its_instance(api: Api) -> None:
    """The platform binds an app (OSB), the app uses the credentials it got."""
    svc = api.service
    async with await svc.osb("GET", "/v2/catalog") as r:
        assert r.status == 200
        service = (await r.json())["services"][0]
    plan = next(p for p in service["plans"] if p.get("bindable", service.get("bindable")))
    instance = await add_instance(api.db)
    await api.db.instances.update_one(
        {"_id": instance}, {"$set": {"service_id": service["id"], "plan_id": plan["id"]}}
    )
    other = await add_instance(api.db)
    path = f"/v2/service_instances/{instance}/service_bindings/app-1"
    body = {"service_id": service["id"], "plan_id": plan["id"], "app_guid": "app"}
    async with await svc.osb("PUT", path, json=body) as r:
        assert r.status == 201, await r.text()
        credentials = (await r.json())["credentials"]
    key = credentials["key"]
    assert credentials["uri"].endswith(f"/v1/service_instances/{instance}")
    async with svc.http.get(
        credentials["uri"] + "/items", headers={"Authorization": f"Bearer {key}"}
    ) as r:
        assert r.status == 200 and (await r.json())["items"] == ITEMS
    created = await api.call("POST", "/destinations", instance=instance, token=key, json=S3_BODY)
    assert created[0] == 201
    assert (await api.call("GET", "/plans", instance=other, token=key))[0] == 404
    async with await svc.osb(
        "DELETE", path + f"?service_id={service['id']}&plan_id={plan['id']}"
    ) as r:
        assert r.status == 200, await r.text()
    status, body = await api.call("GET", "/plans", instance=instance, token=key)
    assert status == 401 and body["error"] == "unauthorized"


# --- platform-wide operations: operators only ---------------------------------------------


async def test_platform_operations_are_for_operators_only(make_api: ApiFactory) -> None:
    """Every platform-scoped operation (derived from the registry): users, even operators of
    every instance they can see, and binding keys get 403, never a list; the broker's and the
    operator's credentials and the operator scope are let in; anonymous callers get 401."""
    api = await make_api(OPERATOR_USERNAME="ops", OPERATOR_PASSWORD="ops-password-123")
    s = await seed(api)
    api.cc.grant("alice", s.instance)  # alice manages an instance: still not an operator
    refused: dict[str, dict[str, Any]] = {
        "user": {"token": api.uaa.token("alice")},
        "user of nothing": {"token": api.uaa.token("mallory")},
        "binding": {"token": await _add_binding(api, s.instance)},
    }
    admitted: dict[str, dict[str, Any]] = {
        "broker": {},
        "operator basic": {"basic": ("ops", "ops-password-123")},
        "operator scope": {"token": api.uaa.token("ops", scope=["backup_manager.admin"])},
    }
    assert PLATFORM_OPERATIONS
    before = await _snapshot(api)
    for operation in PLATFORM_OPERATIONS:
        # Path parameters (an orphaned restore point's id): a tenant is refused before any
        # lookup, so any id does.
        path = re.sub(r"{\w+}", "some-id", operation.path)
        for who, auth in refused.items():
            status, body = await api.call(operation.method, path, json={}, **auth)
            assert (status, body["error"]) == (403, "forbidden"), (who, operation.path, body)
            assert "items" not in body
        status, body = await api.call(operation.method, path, basic=None)
        assert status == 401, (operation.path, body)
        if operation.method == "GET" and path == operation.path:  # the lists
            for who, auth in admitted.items():
                status, body = await api.call("GET", operation.path, **auth)
                assert status == 200 and "items" in body, (who, operation.path, body)
    assert await _snapshot(api) == before
