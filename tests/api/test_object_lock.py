"""Object lock through the HTTP API against SeaweedFS (which enforces S3 Object Lock): the
destination's object_lock is validated, stored and shown back; validation detects a bucket
without object lock; a locked restore point's DELETE answers 409 with the date and changes
nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from storage import S3Settings, SwiftSettings
from tests.api.conftest import Api, add_instance, insert_restore_point
from tests.servers.s3 import SeaweedS3
from tests.servers.seed import destination_body
from tests.storage.test_object_lock import locked_bucket  # noqa: F401 - a fixture

LOCK = {"mode": "GOVERNANCE", "margin_days": 3}


@pytest.fixture
async def inst(api: Api) -> AsyncIterator[str]:
    yield await add_instance(api.db)


async def test_validation_detects_a_bucket_without_object_lock(
    api: Api,
    inst: str,
    s3_server: SeaweedS3,
    s3_settings: S3Settings,
    locked_bucket: str,  # noqa: F811
) -> None:
    body = destination_body(s3_server.settings(locked_bucket), object_lock=LOCK)
    status, answer = await api.call("POST", "/destinations/validate", instance=inst, json=body)
    assert status == 200 and answer["ok"] is True, answer
    assert [s["name"] for s in answer["steps"]] == ["lock", "write", "read", "delete"]

    body = destination_body(s3_settings, object_lock=LOCK)
    status, answer = await api.call("POST", "/destinations/validate", instance=inst, json=body)
    assert status == 200 and answer["ok"] is False, answer
    assert answer["error"] == "storage_object_lock_missing"
    assert answer["description"].startswith(
        f"The bucket {s3_settings.bucket!r} at {s3_server.endpoint_url} does not have S3 "
        "Object Lock enabled, which object_lock requires"
    ), answer["description"]
    assert "use a bucket created with object lock, or remove object_lock" in answer["description"]
    assert [(s["name"], s["ok"]) for s in answer["steps"]] == [
        ("lock", False),
    ]  # fmt: skip
    assert s3_server.secret_key not in str(answer)

    # Created with validate=true, such a destination is refused and nothing is stored.
    status, answer = await api.call("POST", "/destinations?validate=true", instance=inst, json=body)
    assert status == 422, answer
    assert await api.db.destinations.count_documents({"instance_id": inst}) == 0


async def test_object_lock_is_stored_and_shown(
    api: Api,
    inst: str,
    s3_server: SeaweedS3,
    locked_bucket: str,  # noqa: F811
) -> None:
    body = destination_body(s3_server.settings(locked_bucket), object_lock=LOCK)
    status, created = await api.call(
        "POST", "/destinations?validate=true", instance=inst, json=body
    )
    assert status == 201, created
    assert created["object_lock"] == LOCK
    path = f"/destinations/{created['id']}"
    status, shown = await api.call("GET", path, instance=inst)
    assert status == 200 and shown["object_lock"] == LOCK
    status, changed = await api.call(
        "PATCH", path, instance=inst, json={"object_lock": {"mode": "COMPLIANCE"}}
    )
    assert status == 200, changed
    assert changed["object_lock"] == {"mode": "COMPLIANCE", "margin_days": 3}  # merged
    status, changed = await api.call("PATCH", path, instance=inst, json={"object_lock": None})
    assert status == 200 and changed["object_lock"] is None, changed


@pytest.mark.parametrize(
    ("lock", "field"),
    [
        ({"mode": "ALWAYS", "margin_days": 1}, "object_lock.mode"),
        ({"margin_days": 1}, "object_lock.mode"),
        ({"mode": "COMPLIANCE", "margin_days": -1}, "object_lock.margin_days"),
        ({"mode": "COMPLIANCE", "margin_days": 3651}, "object_lock.margin_days"),
        ({"mode": "COMPLIANCE", "margin_days": "1"}, "object_lock.margin_days"),
        ({"mode": "COMPLIANCE", "margin_days": 1.5}, "object_lock.margin_days"),
        ({"mode": "COMPLIANCE", "until": "2030-01-01"}, "object_lock.until"),
        ("COMPLIANCE", "object_lock"),
    ],
)
async def test_invalid_object_lock_is_refused(
    api: Api, inst: str, s3_settings: S3Settings, lock: Any, field: str
) -> None:
    body = destination_body(s3_settings, object_lock=lock)
    status, answer = await api.call("POST", "/destinations", instance=inst, json=body)
    assert status == 400, answer
    assert answer["error"] == "invalid_input" and answer["field"] == field, answer
    assert await api.db.destinations.count_documents({"instance_id": inst}) == 0


async def test_a_swift_destination_takes_no_object_lock(
    api: Api, inst: str, swift_settings: SwiftSettings
) -> None:
    body = destination_body(swift_settings, object_lock=LOCK)
    status, answer = await api.call("POST", "/destinations", instance=inst, json=body)
    assert status == 400 and answer["field"] == "object_lock", answer


async def test_deleting_a_locked_restore_point_answers_409_with_the_date(
    api: Api,
    inst: str,
    s3_server: SeaweedS3,
    locked_bucket: str,  # noqa: F811
) -> None:
    body = destination_body(s3_server.settings(locked_bucket), object_lock=LOCK)
    status, dest = await api.call("POST", "/destinations", instance=inst, json=body)
    assert status == 201, dest
    point_id = await insert_restore_point(api, inst, dest["id"], "p", keys=["orders"])
    until = (datetime.now(UTC) + timedelta(days=10)).replace(microsecond=0)
    await api.db.restore_points.update_one({"_id": point_id}, {"$set": {"locked_until": until}})

    status, answer = await api.call("DELETE", f"/restore_points/{point_id}", instance=inst)
    assert status == 409, answer
    assert answer["error"] == "restore_point_locked"
    assert until.isoformat() in answer["description"]
    status, point = await api.call("GET", f"/restore_points/{point_id}", instance=inst)
    assert status == 200 and point["state"] == "available", point
    assert datetime.fromisoformat(point["locked_until"].replace("Z", "+00:00")) == until

    # Once the date has passed, the delete goes to the storage (nothing there is locked).
    past = datetime.now(UTC) - timedelta(seconds=1)
    await api.db.restore_points.update_one({"_id": point_id}, {"$set": {"locked_until": past}})
    status, answer = await api.call("DELETE", f"/restore_points/{point_id}", instance=inst)
    assert status == 204, answer
