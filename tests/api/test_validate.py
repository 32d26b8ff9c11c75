"""Destination validation and restore point deletion against real servers: SeaweedFS for S3
(it checks SigV4 signatures; a second identity may only read) and OpenStack Swift (tempauth
and a Keystone v3 stand-in). Each failure must carry the right ``error`` code and a sentence
that tells the user what to fix, and never the secret."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from storage import S3Settings, SwiftSettings, open_store
from tests.api.conftest import Api, add_instance, insert_restore_point
from tests.servers.ports import free_port
from tests.servers.s3 import SeaweedS3, running_s3
from tests.servers.seed import destination_body
from tests.servers.swift import SwiftCluster


@pytest.fixture
async def inst(api: Api) -> AsyncIterator[str]:
    yield await add_instance(api.db)


async def _validate(api: Api, inst: str, body: dict[str, Any]) -> dict[str, Any]:
    status, answer = await api.call("POST", "/destinations/validate", instance=inst, json=body)
    assert status == 200, answer
    secret = body.get("secret_access_key") or body.get("password")
    assert secret not in str(answer)  # the secret never comes back, even in a failure
    return answer


def _fails(answer: dict[str, Any], code: str, *words: str) -> None:
    assert answer["ok"] is False and answer["error"] == code, answer
    for word in words:
        assert word in answer["description"], (word, answer["description"])
    failed = [s for s in answer["steps"] if not s["ok"]]
    assert failed and failed[0]["error_code"] == code, answer["steps"]


async def test_s3_good_settings_pass(api: Api, inst: str, s3_settings: S3Settings) -> None:
    good = await _validate(api, inst, destination_body(s3_settings))
    assert good["ok"] is True and good["error"] is None, good
    assert [(s["name"], s["ok"]) for s in good["steps"]] == [
        ("write", True), ("read", True), ("delete", True)
    ]  # fmt: skip
    assert s3_settings.bucket in good["description"]
    # the probe was deleted again
    async with open_store(s3_settings) as objects:
        assert [o.key async for o in objects.list()] == []


async def test_s3_failures_say_what_to_fix(
    api: Api, inst: str, s3_server: SeaweedS3, s3_settings: S3Settings
) -> None:
    answer = await _validate(api, inst, destination_body(s3_settings, bucket="no-such-bucket-here"))
    _fails(answer, "storage_container_not_found", "'no-such-bucket-here' does not exist",
           "create it or correct its name")  # fmt: skip
    answer = await _validate(
        api, inst, destination_body(s3_settings, secret_access_key="wrong-secret")
    )
    _fails(answer, "storage_auth_failed", "refused the credentials",
           "check the access key id and secret access key")  # fmt: skip
    answer = await _validate(
        api, inst, destination_body(s3_settings, access_key_id="AKUNKNOWN0000")
    )
    _fails(answer, "storage_auth_failed", "check the access key id")
    reader = destination_body(
        s3_settings,
        access_key_id=s3_server.reader_key,
        secret_access_key=s3_server.reader_secret,
    )
    answer = await _validate(api, inst, reader)
    _fails(answer, "storage_permission_denied", "grant them read, write and delete")
    closed = f"http://127.0.0.1:{free_port()}"
    answer = await _validate(api, inst, destination_body(s3_settings, endpoint=closed))
    _fails(answer, "storage_unreachable", "cannot be reached", "check the host name and port")
    # HTTPS spoken to a plain-HTTP port: the TLS handshake fails
    https = s3_settings.endpoint.replace("http://", "https://")  # type: ignore[union-attr]
    answer = await _validate(api, inst, destination_body(s3_settings, endpoint=https))
    _fails(answer, "storage_tls_failed", "does not speak HTTPS on that port", "plain_http")


@pytest.fixture
def s3_tls_server(tmp_path: Path) -> Iterator[SeaweedS3]:
    """SeaweedFS serving HTTPS with a certificate from a private CA the manager does not
    trust, as an on-premises S3 with an internal CA would."""
    with running_s3(tmp_path / "s3-tls", tls=True) as server:
        yield server


async def test_s3_untrusted_certificate(api: Api, inst: str, s3_tls_server: SeaweedS3) -> None:
    settings = s3_tls_server.settings()
    assert settings.endpoint and settings.endpoint.startswith("https://")
    body = destination_body(settings)
    answer = await _validate(api, inst, body)
    _fails(answer, "storage_tls_failed", "certificate is not trusted", "verify_tls")
    answer = await _validate(api, inst, {**body, "verify_tls": False})
    assert answer["ok"] is True, answer


async def test_stored_destination_and_validate_before_saving(
    api: Api, inst: str, s3_settings: S3Settings
) -> None:
    status, dest = await api.call(
        "POST", "/destinations", instance=inst, json=destination_body(s3_settings)
    )
    assert status == 201
    path = f"/destinations/{dest['id']}"
    status, answer = await api.call("POST", f"{path}/validate", instance=inst)
    assert status == 200 and answer["ok"] is True, answer
    # a change that breaks it is refused when asked to validate first, and nothing changes
    status, answer = await api.call(
        "PATCH", f"{path}?validate=true", instance=inst, json={"bucket": "missing-bucket"}
    )
    assert status == 422 and answer["error"] == "storage_container_not_found", answer
    assert answer["description"].startswith("Not saved:")
    assert (await api.call("GET", path, instance=inst))[1] == dest
    # without validate it is stored, and validating the stored one then says what is wrong
    status, _ = await api.call("PATCH", path, instance=inst, json={"bucket": "missing-bucket"})
    assert status == 200
    status, answer = await api.call("POST", f"{path}/validate", instance=inst)
    assert status == 200
    _fails(answer, "storage_container_not_found", "'missing-bucket' does not exist")
    # creation with validate=true: a wrong key is refused and nothing is stored
    bad = destination_body(s3_settings, name="bad", secret_access_key="wrong-secret")
    status, answer = await api.call("POST", "/destinations?validate=true", instance=inst, json=bad)
    assert status == 422 and answer["error"] == "storage_auth_failed", answer
    assert "wrong-secret" not in str(answer)
    assert await api.db.destinations.count_documents({"name": "bad"}) == 0
    good = destination_body(s3_settings, name="good")
    status, _ = await api.call("POST", "/destinations?validate=true", instance=inst, json=good)
    assert status == 201
    status, answer = await api.call(
        "POST", "/destinations?validate=maybe", instance=inst, json=good
    )
    assert status == 400 and answer["field"] == "validate"


async def test_swift_tempauth(
    api: Api, inst: str, swift_server: SwiftCluster, swift_settings: SwiftSettings
) -> None:
    good = await _validate(api, inst, destination_body(swift_settings))
    assert good["ok"] is True, good
    answer = await _validate(api, inst, destination_body(swift_settings, password="wrong"))
    _fails(answer, "storage_auth_failed", "refused the credentials", "check the user name")
    answer = await _validate(api, inst, destination_body(swift_settings, container="no-such-one"))
    _fails(answer, "storage_container_not_found", "'no-such-one' does not exist")
    reader = destination_body(
        swift_settings, username=swift_server.reader, password=swift_server.reader_key
    )
    answer = await _validate(api, inst, reader)
    _fails(answer, "storage_permission_denied", "grant them read, write and delete")
    port = free_port()
    closed = destination_body(swift_settings, auth_url=f"http://127.0.0.1:{port}/auth/v1.0")
    answer = await _validate(api, inst, closed)
    _fails(answer, "storage_unreachable", "cannot be reached")
    https = destination_body(
        swift_settings, auth_url=swift_settings.auth_url.replace("http:", "https:")
    )
    answer = await _validate(api, inst, https)
    _fails(answer, "storage_tls_failed", "does not speak HTTPS", "http:// address")


async def test_swift_keystone_v3(api: Api, inst: str, swift_server: SwiftCluster) -> None:
    settings = swift_server.keystone_settings()
    good = await _validate(api, inst, destination_body(settings))
    assert good["ok"] is True, good
    answer = await _validate(api, inst, destination_body(settings, password="wrong-password"))
    _fails(answer, "storage_auth_failed", "check the user name and key (or password")
    status, dest = await api.call(
        "POST", "/destinations", instance=inst, json=destination_body(settings)
    )
    assert status == 201 and dest["password_set"] is True and dest["auth_version"] == "3"
    status, answer = await api.call("POST", f"/destinations/{dest['id']}/validate", instance=inst)
    assert status == 200 and answer["ok"] is True, answer


async def _put(settings: S3Settings | SwiftSettings, keys: list[str]) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"backup bytes"

    async with open_store(settings) as objects:
        for key in keys:
            await objects.upload(key, chunks())


async def _keys(settings: S3Settings | SwiftSettings) -> list[str]:
    async with open_store(settings) as objects:
        return sorted([o.key async for o in objects.list()])


@pytest.mark.parametrize("kind", ["s3", "swift"])
async def test_delete_restore_point_removes_files_then_record(
    api: Api, inst: str, kind: str, request: pytest.FixtureRequest
) -> None:
    settings: S3Settings | SwiftSettings = request.getfixturevalue(f"{kind}_settings")
    status, dest = await api.call(
        "POST", "/destinations", instance=inst, json=destination_body(settings)
    )
    assert status == 201
    point = await insert_restore_point(api, inst, dest["id"], "plan")
    other = await insert_restore_point(api, inst, dest["id"], "plan", keys=["kept"])
    await _put(settings, ["orders.gz", "customers.gz", "kept.gz"])
    status, _ = await api.call("DELETE", f"/restore_points/{point}", instance=inst)
    assert status == 204
    assert await api.db.restore_points.count_documents({"_id": point}) == 0
    assert await _keys(settings) == ["kept.gz"]  # only this point's files went
    assert (await api.call("GET", f"/restore_points/{point}", instance=inst))[0] == 404
    assert (await api.call("GET", f"/restore_points/{other}", instance=inst))[0] == 200


async def test_delete_restore_point_when_storage_refuses_keeps_the_record(
    api: Api, inst: str, s3_settings: S3Settings
) -> None:
    body = destination_body(s3_settings, secret_access_key="wrong-secret")
    status, dest = await api.call("POST", "/destinations", instance=inst, json=body)
    assert status == 201
    point = await insert_restore_point(api, inst, dest["id"], "plan")
    await _put(s3_settings, ["orders.gz", "customers.gz"])
    status, answer = await api.call("DELETE", f"/restore_points/{point}", instance=inst)
    assert status == 503 and answer["error"] == "storage_unavailable", answer
    assert "retry" in answer["description"] and "wrong-secret" not in str(answer)
    stored = await api.db.restore_points.find_one({"_id": point})
    assert stored["state"] == "deleting"
    assert await _keys(s3_settings) == ["customers.gz", "orders.gz"]
    # fixed credentials: the retry deletes the files, then the record
    fix = {"secret_access_key": s3_settings.secret_access_key.get_secret_value()}
    assert (await api.call("PATCH", f"/destinations/{dest['id']}", instance=inst, json=fix))[
        0
    ] == 200
    status, _ = await api.call("DELETE", f"/restore_points/{point}", instance=inst)
    assert status == 204
    assert await _keys(s3_settings) == []
