"""Destination validation and restore point deletion against real S3 (SeaweedFS) and Swift.

The servers and the storage implementations come with the storage work; until they exist these
tests are skipped (and fail in CI)."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from typing import Any

import pytest

import tests.servers.s3 as s3_fixtures
import tests.servers.swift as swift_fixtures
from storage import S3Settings, SwiftSettings, open_store
from tests.api.conftest import Api, add_instance
from tests.api.test_jobs import _restore_point
from tests.conftest import IN_CI
from tests.servers.ports import free_port

HAS_S3 = hasattr(s3_fixtures, "s3_settings") and importlib.util.find_spec("storage.s3")
HAS_SWIFT = hasattr(swift_fixtures, "swift_settings") and importlib.util.find_spec("storage.swift")
needs_s3 = pytest.mark.skipif(not HAS_S3 and not IN_CI, reason="S3 fixtures/storage not yet there")
needs_swift = pytest.mark.skipif(
    not HAS_SWIFT and not IN_CI, reason="Swift fixtures/storage not yet there"
)


def s3_body(s: S3Settings, **over: Any) -> dict[str, Any]:
    body = {
        "type": "S3",
        "name": "s3",
        "endpoint": s.endpoint,
        "region": s.region,
        "bucket": s.bucket,
        "access_key_id": s.access_key_id,
        "secret_access_key": s.secret_access_key.get_secret_value(),
        "addressing_style": s.addressing_style,
        "prefix": s.prefix,
    }
    return {k: v for k, v in {**body, **over}.items() if v is not None}


def swift_body(s: SwiftSettings, **over: Any) -> dict[str, Any]:
    body = {
        "type": "SWIFT",
        "name": "swift",
        "auth_url": s.auth_url,
        "auth_version": s.auth_version,
        "username": s.username,
        "password": s.password.get_secret_value(),
        "user_domain_name": s.user_domain_name,
        "project_name": s.project_name,
        "project_domain_name": s.project_domain_name,
        "region_name": s.region_name,
        "container": s.container,
        "prefix": s.prefix,
    }
    return {k: v for k, v in {**body, **over}.items() if v is not None}


@pytest.fixture
async def inst(api: Api) -> AsyncIterator[str]:
    yield await add_instance(api.store)


async def _validate(api: Api, inst: str, body: dict[str, Any]) -> dict[str, Any]:
    status, answer = await api.call("POST", "/destinations/validate", instance=inst, json=body)
    assert status == 200, answer
    return answer


@needs_s3
async def test_s3_validate(api: Api, inst: str, s3_settings: S3Settings) -> None:
    good = await _validate(api, inst, s3_body(s3_settings))
    assert good["ok"] is True and all(s["ok"] for s in good["steps"]), good
    bad = await _validate(api, inst, s3_body(s3_settings, bucket="no-such-bucket-here"))
    assert bad["ok"] is False and bad["error"] == "storage_container_not_found", bad
    assert "does not exist" in bad["description"] and "no-such-bucket-here" in bad["description"]
    bad = await _validate(api, inst, s3_body(s3_settings, secret_access_key="wrong-secret"))
    assert bad["error"] == "storage_auth_failed", bad
    assert "credentials" in bad["description"]
    bad = await _validate(
        api, inst, s3_body(s3_settings, endpoint=f"http://127.0.0.1:{free_port()}")
    )
    assert bad["error"] == "storage_unreachable", bad
    assert "cannot be reached" in bad["description"]
    # a stored destination
    status, dest = await api.call("POST", "/destinations", instance=inst, json=s3_body(s3_settings))
    assert status == 201
    status, answer = await api.call("POST", f"/destinations/{dest['id']}/validate", instance=inst)
    assert status == 200 and answer["ok"] is True, answer


@needs_swift
async def test_swift_validate(api: Api, inst: str, swift_settings: SwiftSettings) -> None:
    good = await _validate(api, inst, swift_body(swift_settings))
    assert good["ok"] is True, good
    bad = await _validate(api, inst, swift_body(swift_settings, password="wrong"))
    assert bad["error"] == "storage_auth_failed", bad
    bad = await _validate(api, inst, swift_body(swift_settings, container="no-such-container"))
    assert bad["ok"] is False and bad["error"] == "storage_container_not_found", bad
    port = free_port()
    bad = await _validate(
        api, inst, swift_body(swift_settings, auth_url=f"http://127.0.0.1:{port}/auth/v1.0")
    )
    assert bad["error"] == "storage_unreachable", bad


@needs_s3
async def test_delete_restore_point_removes_files(
    api: Api, inst: str, s3_settings: S3Settings
) -> None:
    status, dest = await api.call("POST", "/destinations", instance=inst, json=s3_body(s3_settings))
    assert status == 201

    async def chunks() -> AsyncIterator[bytes]:
        yield b"backup bytes"

    point = await _restore_point(api, inst, dest, "plan")
    async with open_store(s3_settings) as objects:
        for name in ("orders", "customers"):
            await objects.upload(f"{name}.gz", chunks())
    status, _ = await api.call("DELETE", f"/restore_points/{point}", instance=inst)
    assert status == 204
    assert await api.store.restore_points.count_documents({"_id": point}) == 0
    async with open_store(s3_settings) as objects:
        assert [o.key async for o in objects.list()] == []
