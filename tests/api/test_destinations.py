"""Destinations: create, list, read, update, delete, and the secrets they never show."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.api.conftest import S3_BODY, SWIFT_BODY, Api, add_instance, plan_body


async def test_create_s3_answers_without_the_secret(api: Api, instance: str) -> None:
    status, body = await api.call("POST", "/destinations", instance=instance, json=S3_BODY)
    assert status == 201, body
    assert body["type"] == "S3"
    assert body["endpoint"] == "http://127.0.0.1:9"
    assert body["plain_http"] is True
    assert body["secret_access_key_set"] is True
    assert "secret_access_key" not in body
    assert S3_BODY["secret_access_key"] not in str(body)
    raw = await api.db.destinations.find_one({"_id": body["id"]})
    assert raw["instance_id"] == instance
    assert raw["bucket"] == "backups" and raw["schema_version"] == 1 and raw["version"] == 1
    assert S3_BODY["secret_access_key"].encode() not in repr(raw).encode()
    assert set(raw["secrets"]) == {"secret_access_key"}


async def test_create_swift_and_list_and_read(api: Api, instance: str) -> None:
    s1, a = await api.call("POST", "/destinations", instance=instance, json=S3_BODY)
    s2, b = await api.call("POST", "/destinations", instance=instance, json=SWIFT_BODY)
    assert (s1, s2) == (201, 201), (a, b)
    assert b["password_set"] is True and "password" not in b
    status, page = await api.call("GET", "/destinations", instance=instance)
    assert status == 200
    assert page["total"] == 2 and page["next_cursor"] is None
    assert [d["id"] for d in page["items"]] == [b["id"], a["id"]]  # newest first
    status, one = await api.call("GET", f"/destinations/{a['id']}", instance=instance)
    assert status == 200 and one == a


async def test_destination_of_another_instance_is_not_found(api: Api, instance: str) -> None:
    other = await add_instance(api.db)
    _, dest = await api.call("POST", "/destinations", instance=other, json=S3_BODY)
    status, body = await api.call("GET", f"/destinations/{dest['id']}", instance=instance)
    assert status == 404 and body["error"] == "destination_not_found"


async def test_invalid_destination_bodies(api: Api, instance: str) -> None:
    cases: list[tuple[Any, str]] = [
        ({**S3_BODY, "bucket": "x"}, "bucket"),
        ({**S3_BODY, "type": "FTP"}, "type"),
        ({**S3_BODY, "endpoint": "ftp://x"}, "endpoint"),
        ({**S3_BODY, "endpoint": "https://h:1", "plain_http": True}, "endpoint"),
        ({**S3_BODY, "endpoint": "h:99999"}, "endpoint"),
        ({**S3_BODY, "unknown": 1}, "unknown"),
        ({**S3_BODY, "verify_tls": "yes"}, "verify_tls"),
        ({k: v for k, v in S3_BODY.items() if k != "secret_access_key"}, "secret_access_key"),
        ({**SWIFT_BODY, "auth_url": "not a url"}, "auth_url"),
        ([S3_BODY], "request body"),
    ]
    for body, field in cases:
        status, answer = await api.call("POST", "/destinations", instance=instance, json=body)
        assert status == 400, (body, answer)
        assert answer["error"] == "invalid_input"
        assert field in answer["description"], answer
    status, answer = await api.call(
        "POST",
        "/destinations",
        instance=instance,
        data=b"{nope",
        headers={"Content-Type": "application/json"},
    )
    assert status == 400 and answer["error"] == "malformed_json"
    assert await api.db.destinations.count_documents({}) == 0


async def test_duplicate_name_is_a_conflict(api: Api, instance: str, destination: dict) -> None:
    status, body = await api.call("POST", "/destinations", instance=instance, json=S3_BODY)
    assert status == 409 and body["error"] == "duplicate_name"


async def test_patch_keeps_the_secret_and_bumps_version(
    api: Api, instance: str, destination: dict
) -> None:
    path = f"/destinations/{destination['id']}"
    before = await api.db.destinations.find_one({"_id": destination["id"]})
    status, body = await api.call(
        "PATCH", path, instance=instance, json={"bucket": "other-bucket", "prefix": "db/"}
    )
    assert status == 200, body
    assert body["bucket"] == "other-bucket" and body["prefix"] == "db/"
    assert body["secret_access_key_set"] is True and body["version"] == 2
    assert body["endpoint"] == "http://127.0.0.1:9"
    after = await api.db.destinations.find_one({"_id": destination["id"]})
    assert (
        after["secrets"]["secret_access_key"]["ct"] != before["secrets"]["secret_access_key"]["ct"]
    )
    # switching to HTTPS through the plain-HTTP switch alone
    status, body = await api.call("PATCH", path, instance=instance, json={"plain_http": False})
    assert status == 200 and body["endpoint"] == "https://127.0.0.1:9", body
    # a bad merged result changes nothing
    status, body = await api.call("PATCH", path, instance=instance, json={"bucket": "b"})
    assert status == 400
    status, body = await api.call("GET", path, instance=instance)
    assert body["bucket"] == "other-bucket" and body["version"] == 3


async def test_patch_changing_type_needs_the_new_type_fields(
    api: Api, instance: str, destination: dict
) -> None:
    path = f"/destinations/{destination['id']}"
    status, body = await api.call("PATCH", path, instance=instance, json={"type": "SWIFT"})
    assert status == 400
    swift = {k: v for k, v in SWIFT_BODY.items() if k != "name"}
    status, body = await api.call("PATCH", path, instance=instance, json=swift)
    assert status == 200, body
    assert body["type"] == "SWIFT" and body["password_set"] and body["name"] == "primary"
    raw = await api.db.destinations.find_one({"_id": destination["id"]})
    assert "bucket" not in raw and set(raw["secrets"]) == {"password"}


async def test_delete_refused_while_a_plan_uses_it(
    api: Api, instance: str, destination: dict, plan: dict
) -> None:
    path = f"/destinations/{destination['id']}"
    status, body = await api.call("DELETE", path, instance=instance)
    assert status == 409 and body["error"] == "destination_in_use"
    assert "nightly" in body["description"]
    assert (await api.call("DELETE", f"/plans/{plan['id']}", instance=instance))[0] == 204
    await api.db.restore_points.insert_one(
        {"_id": "rp1", "instance_id": instance, "destination_id": destination["id"]}
    )
    status, body = await api.call("DELETE", path, instance=instance)
    assert status == 409 and "restore point" in body["description"]
    await api.db.restore_points.delete_one({"_id": "rp1"})
    status, _ = await api.call("DELETE", path, instance=instance)
    assert status == 204
    assert (await api.call("GET", path, instance=instance))[0] == 404
    assert (await api.call("DELETE", path, instance=instance))[0] == 404


async def test_secrets_never_reach_the_logs(
    api: Api, instance: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    secret = S3_BODY["secret_access_key"]
    _, dest = await api.call("POST", "/destinations", instance=instance, json=S3_BODY)
    await api.call("PATCH", f"/destinations/{dest['id']}", instance=instance, json=S3_BODY)
    await api.call("POST", "/destinations", instance=instance, json={**S3_BODY, "bucket": 5})
    await api.call("POST", "/destinations", instance=instance, json={**S3_BODY, "x": secret})
    key = "an-encryption-key-123456"
    body = plan_body(dest["id"], encryption={"enabled": True, "key": key}, frequency="bad")
    _, answer = await api.call("POST", "/plans", instance=instance, json=body)
    captured = capsys.readouterr()
    text = captured.out + captured.err + caplog.text
    assert secret not in text and key not in text
    assert key not in str(answer)


async def test_concurrent_creations_with_one_name_make_one_destination(
    api: Api, instance: str
) -> None:
    results = await asyncio.gather(
        *(api.call("POST", "/destinations", instance=instance, json=S3_BODY) for _ in range(6))
    )
    assert sorted(s for s, _ in results) == [201] + [409] * 5, results
    assert {b["error"] for s, b in results if s == 409} == {"duplicate_name"}
    assert await api.db.destinations.count_documents({"instance_id": instance}) == 1
    # the same name in another instance is fine
    other = await add_instance(api.db)
    assert (await api.call("POST", "/destinations", instance=other, json=S3_BODY))[0] == 201


async def test_patch_changes_only_what_it_names(api: Api, instance: str) -> None:
    body = {**SWIFT_BODY, "user_domain_name": None, "project_domain_name": None}
    status, dest = await api.call("POST", "/destinations", instance=instance, json=body)
    assert status == 201 and dest["user_domain_name"] is None, dest
    path = f"/destinations/{dest['id']}"
    status, changed = await api.call(
        "PATCH", path, instance=instance, json={"container": "other", "password": None}
    )
    assert status == 200, changed
    assert changed["container"] == "other" and changed["password_set"] is True
    assert changed["user_domain_name"] is None and changed["project_domain_name"] is None
    assert {
        k: v for k, v in changed.items() if k not in ("container", "version", "updated_at")
    } == {k: v for k, v in dest.items() if k not in ("container", "version", "updated_at")}
    # renaming onto another destination's name is a conflict; nothing changes
    assert (await api.call("POST", "/destinations", instance=instance, json=S3_BODY))[0] == 201
    status, answer = await api.call(
        "PATCH", path, instance=instance, json={"name": S3_BODY["name"]}
    )
    assert status == 409 and answer["error"] == "duplicate_name"
    assert (await api.call("GET", path, instance=instance))[1] == changed
    status, answer = await api.call("PATCH", "/destinations/nope", instance=instance, json={})
    assert status == 404 and answer["error"] == "destination_not_found"


async def test_endpoint_must_be_only_scheme_host_and_port(api: Api, instance: str) -> None:
    for endpoint in ("https://h/bucket", "https://u:p@h", "https://h?x=1", "https://", "h:0x"):
        status, answer = await api.call(
            "POST", "/destinations", instance=instance, json={**S3_BODY, "endpoint": endpoint}
        )
        assert status == 400 and answer["field"] == "endpoint", (endpoint, answer)
    status, dest = await api.call(
        "POST", "/destinations", instance=instance, json={**S3_BODY, "endpoint": "h.example:9000/"}
    )
    assert status == 201 and dest["endpoint"] == "http://h.example:9000", dest


async def test_delete_refused_while_files_wait_to_be_deleted(
    api: Api, instance: str, destination: dict
) -> None:
    await api.db.jobs.insert_one(
        {
            "_id": "failed-job",
            "instance_id": instance,
            "status": "FAILED",
            "destination_id": destination["id"],
            "pending_deletes": [{"destination_id": destination["id"], "key": "orders.gz"}],
        }
    )
    status, body = await api.call("DELETE", f"/destinations/{destination['id']}", instance=instance)
    assert (
        status == 409
        and body["error"] == "destination_in_use"
        and "retention" in body["description"]
    )
    await api.db.jobs.update_one({"_id": "failed-job"}, {"$unset": {"pending_deletes": ""}})
    status, _ = await api.call("DELETE", f"/destinations/{destination['id']}", instance=instance)
    assert status == 204


async def test_concurrent_changes_never_lose_one_silently(
    api: Api, instance: str, destination: dict
) -> None:
    """Each change is a compare-and-set on the version: a change based on a version another one
    replaced is refused (409), never applied over it. Six changes of six different fields race;
    every accepted one must carry all changes accepted before it."""
    path = f"/destinations/{destination['id']}"
    patches = [
        {"bucket": "bucket-two"},
        {"prefix": "db/"},
        {"region": "eu-west-1"},
        {"access_key_id": "AKIA-other"},
        {"addressing_style": "path"},
        {"name": "renamed"},
    ]
    results = await asyncio.gather(
        *(api.call("PATCH", path, instance=instance, json=p) for p in patches)
    )
    won = sorted(
        ((body["version"], patch) for (status, body), patch in zip(results, patches, strict=True)
         if status == 200),
        key=lambda w: w[0],
    )  # fmt: skip
    lost = [body for status, body in results if status != 200]
    assert won and all(b["error"] == "concurrent_update" for b in lost), results
    answers = {body["version"]: body for status, body in results if status == 200}
    for n, (version, _) in enumerate(won):
        for _, earlier in won[: n + 1]:
            field, value = next(iter(earlier.items()))
            assert answers[version][field] == value, (version, earlier, answers[version])
    _, final = await api.call("GET", path, instance=instance)
    assert final["version"] == 1 + len(won) == won[-1][0]
