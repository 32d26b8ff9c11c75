"""Destinations for the agent tests: the storage teammate's real S3 / Swift fixtures when they
exist, else nothing (the caller skips with a reason, or fails in CI)."""

from __future__ import annotations

import importlib.util
import uuid
from typing import Any

import pytest

from tests.conftest import skip_unless_available


def storage_available(kind: str) -> bool:
    module = {"s3": "storage.s3", "swift": "storage.swift"}[kind]
    return importlib.util.find_spec(module) is not None


def settings_for(request: pytest.FixtureRequest, kind: str) -> Any:
    if not storage_available(kind):
        skip_unless_available(f"storage/{kind}.py not written yet")
    try:
        return request.getfixturevalue(f"{kind}_settings")
    except pytest.FixtureLookupError:
        skip_unless_available(f"fixture {kind}_settings (tests/servers/{kind}.py) not available")


def destination_for(settings: Any, kind: str) -> dict[str, Any]:
    prefix = f"agent-e2e-{uuid.uuid4().hex[:8]}/"
    if kind == "local":
        return {"type": "S3", "skipStorage": True, "filenamePrefix": prefix}
    if kind == "s3-dummy":  # for the in-process stand-in store
        return {
            "type": "S3",
            "bucket": "stand-in",
            "endpoint": "127.0.0.1:1",
            "authKey": "k",
            "authSecret": "dummy-secret",
            "skipSSL": True,
            "filenamePrefix": prefix,
        }
    if kind == "s3":
        endpoint = settings.endpoint or ""
        return {
            "type": "S3",
            "skipStorage": False,
            "bucket": settings.bucket,
            "region": settings.region,
            "endpoint": endpoint,
            "authKey": settings.access_key_id,
            "authSecret": settings.secret_access_key.get_secret_value(),
            "skipSSL": endpoint.startswith("http://"),
            "filenamePrefix": prefix,
        }
    dest = {
        "type": "SWIFT",
        "skipStorage": False,
        "authUrl": settings.auth_url,
        "container_name": settings.container,
        "username": settings.username,
        "password": settings.password.get_secret_value(),
        "filenamePrefix": prefix,
    }
    if settings.auth_version == "3":
        dest["domain"] = settings.user_domain_name or "Default"
        dest["project_name"] = settings.project_name
    return dest
