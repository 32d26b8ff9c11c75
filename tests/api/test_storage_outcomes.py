"""What users are told for each storage outcome, and restore point deletion, with an in-memory
object store standing in for S3/Swift (the real servers are exercised in test_validate.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

import broker.api
import broker.api.validation
from storage import (
    AuthenticationFailed,
    ObjectInfo,
    ObjectStore,
    StoredObject,
    ValidationReport,
    ValidationStep,
)
from tests.api.conftest import S3_BODY, SWIFT_BODY, Api, add_instance, start_api
from tests.api.test_jobs import _restore_point
from tests.servers.broker import stop_service
from tests.servers.cloud_controller import CloudController
from tests.servers.uaa import Uaa


class MemoryStore(ObjectStore):
    """Records deletes; ``validate`` answers ``report`` or raises ``error``."""

    deleted: list[str] = []
    report: ValidationReport = ValidationReport(True, [ValidationStep("write", True)])
    error: Exception | None = None
    fail_delete: bool = False

    def __init__(self, settings: Any, transfer: Any = None) -> None:
        self.settings = settings

    async def upload(self, key: str, chunks: AsyncIterator[bytes]) -> StoredObject:
        raise NotImplementedError

    def download(self, key: str, *, expected_sha256: str | None = None) -> AsyncIterator[bytes]:
        raise NotImplementedError

    async def delete(self, key: str) -> None:
        if MemoryStore.fail_delete:
            raise AuthenticationFailed("The credentials were refused.", step="delete")
        MemoryStore.deleted.append(key)

    def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        raise NotImplementedError

    async def stat(self, key: str) -> ObjectInfo:
        raise NotImplementedError

    async def validate(self) -> ValidationReport:
        if MemoryStore.error is not None:
            raise MemoryStore.error
        return MemoryStore.report

    async def aclose(self) -> None:
        return None


@pytest.fixture
async def mem_api(
    mongo_url: str,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    uaa: Uaa,
    cloud_controller: CloudController,
) -> AsyncIterator[Api]:
    monkeypatch.setattr(broker.api, "open_store", MemoryStore)
    monkeypatch.setattr(broker.api.validation, "open_store", MemoryStore)
    monkeypatch.setattr(MemoryStore, "deleted", [])
    api = await start_api(mongo_url, tmp_path, monkeypatch, uaa, cloud_controller)
    yield api
    await stop_service(api.service)


def _failing(step: str, code: str, message: str) -> ValidationReport:
    return ValidationReport(
        False, [ValidationStep("write", step != "write", None if step != "write" else code,
                               message if step == "write" else None),
                ValidationStep("read", step != "read", code if step == "read" else None,
                               message if step == "read" else None)]
    )  # fmt: skip


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        (S3_BODY, "storage_container_not_found", "bucket 'backups' does not exist"),
        (SWIFT_BODY, "storage_container_not_found", "container 'backups' does not exist"),
        (S3_BODY, "storage_auth_failed", "check the access key id and secret key"),
        (SWIFT_BODY, "storage_auth_failed", "check the user name and key"),
        (S3_BODY, "storage_permission_denied", "grant them read, write and delete"),
        (S3_BODY, "storage_unreachable", "cannot be reached"),
        (S3_BODY, "storage_tls_failed", "certificate is not trusted"),
    ],
)
async def test_validation_failures_are_explained(
    mem_api: Api, monkeypatch: pytest.MonkeyPatch, body: dict, code: str, words: str
) -> None:
    inst = await add_instance(mem_api.store)
    monkeypatch.setattr(MemoryStore, "report", _failing("write", code, "the raw storage message"))
    status, answer = await mem_api.call("POST", "/destinations/validate", instance=inst, json=body)
    assert status == 200, answer
    assert answer["ok"] is False and answer["error"] == code
    assert words in answer["description"]
    if code != "storage_container_not_found":
        assert "write a probe" in answer["description"]
    assert "the raw storage message" in answer["description"]
    assert answer["steps"][0] == {
        "name": "write", "ok": False, "error_code": code, "message": "the raw storage message"
    }  # fmt: skip
    assert body.get("secret_access_key", body.get("password")) not in str(answer)


async def test_validation_success_and_raised_errors(
    mem_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    inst = await add_instance(mem_api.store)
    body = {k: v for k, v in S3_BODY.items() if k != "name"}  # a name is not needed to validate
    status, answer = await mem_api.call("POST", "/destinations/validate", instance=inst, json=body)
    assert status == 200 and answer["ok"] is True and "probe" in answer["description"], answer
    monkeypatch.setattr(MemoryStore, "error", AuthenticationFailed("denied", step="connect"))
    status, answer = await mem_api.call("POST", "/destinations/validate", instance=inst, json=body)
    assert answer["ok"] is False and answer["error"] == "storage_auth_failed"
    _, dest = await mem_api.call("POST", "/destinations", instance=inst, json=S3_BODY)
    status, answer = await mem_api.call(
        "POST", f"/destinations/{dest['id']}/validate", instance=inst
    )
    assert status == 200 and answer["error"] == "storage_auth_failed"
    status, answer = await mem_api.call("POST", "/destinations/nope/validate", instance=inst)
    assert status == 404


async def test_delete_restore_point_removes_files_then_record(
    mem_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    inst = await add_instance(mem_api.store)
    _, dest = await mem_api.call("POST", "/destinations", instance=inst, json=S3_BODY)
    point = await _restore_point(mem_api, inst, dest, "plan")
    monkeypatch.setattr(MemoryStore, "fail_delete", True)
    status, answer = await mem_api.call("DELETE", f"/restore_points/{point}", instance=inst)
    assert status == 503 and "retry" in answer["description"]
    assert (await mem_api.store.restore_points.find_one({"_id": point}))["state"] == "deleting"
    monkeypatch.setattr(MemoryStore, "fail_delete", False)
    status, _ = await mem_api.call("DELETE", f"/restore_points/{point}", instance=inst)
    assert status == 204
    assert sorted(MemoryStore.deleted) == ["customers.gz", "orders.gz"]
    assert await mem_api.store.restore_points.count_documents({"_id": point}) == 0
