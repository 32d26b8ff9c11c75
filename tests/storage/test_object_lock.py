"""S3 Object Lock against a real server that enforces it (SeaweedFS: a bucket created with
object lock is versioned, keeps each version's retention, and refuses to delete a locked
version, also to credentials that could bypass governance retention).

Everything goes through :func:`storage.open_store` with the manager's own credentials; the
server is looked at directly only to check what it holds."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from botocore.exceptions import ClientError

from storage import ObjectLock, ObjectLocked, S3Settings, TransferSettings, open_store
from storage.s3 import S3Store
from tests.servers.s3 import SeaweedS3
from tests.storage.support import MiB, digest, download_digest, stream

SMALL_PARTS = TransferSettings(part_size=5 * MiB, max_concurrency=2)


def versions(server: SeaweedS3, bucket: str, key: str) -> list[dict[str, Any]]:
    answer = server.client().list_object_versions(Bucket=bucket, Prefix=key)
    return [
        v
        for v in [*(answer.get("Versions") or []), *(answer.get("DeleteMarkers") or [])]
        if v["Key"] == key
    ]


@pytest.fixture
def locked_bucket(s3_server: SeaweedS3) -> Iterator[str]:
    """A bucket created with object lock; emptied afterwards by bypassing governance
    retention (what the tests' own admin client may do, never the store)."""
    name = "lock-" + uuid.uuid4().hex[:20]
    client = s3_server.client()
    client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    yield name
    with contextlib.suppress(Exception):
        answer = client.list_object_versions(Bucket=name)
        for v in [*(answer.get("Versions") or []), *(answer.get("DeleteMarkers") or [])]:
            with contextlib.suppress(ClientError):
                client.delete_object(
                    Bucket=name,
                    Key=v["Key"],
                    VersionId=v["VersionId"],
                    BypassGovernanceRetention=True,
                )
        client.delete_bucket(Bucket=name)


def lock_settings(server: SeaweedS3, bucket: str, mode: str = "GOVERNANCE") -> S3Settings:
    return server.settings(bucket, object_lock={"mode": mode, "margin_days": 0})


@pytest.mark.parametrize("size", [1000, 6 * MiB], ids=["single", "multipart"])
async def test_a_locked_object_cannot_be_deleted_before_its_date(
    s3_server: SeaweedS3, locked_bucket: str, size: int
) -> None:
    settings = lock_settings(s3_server, locked_bucket)
    until = (datetime.now(UTC) + timedelta(minutes=10)).replace(microsecond=0)
    async with open_store(settings, SMALL_PARTS) as store:
        assert isinstance(store, S3Store)
        await store.upload("points/a", stream(size), retain_until=until)

        retention = s3_server.client().get_object_retention(Bucket=locked_bucket, Key="points/a")
        assert retention["Retention"]["Mode"] == "GOVERNANCE"
        assert retention["Retention"]["RetainUntilDate"] == until
        assert await store.locked_until("points/a") == until

        with pytest.raises(ObjectLocked) as caught:
            await store.delete("points/a")
        assert caught.value.until == until
        assert caught.value.code == "storage_object_locked"
        assert until.isoformat() in caught.value.message

        # Nothing was deleted, not even hidden behind a delete marker.
        assert [o.key async for o in store.list("points/")] == ["points/a"]
        assert len(versions(s3_server, locked_bucket, "points/a")) == 1
        assert await download_digest(store, "points/a") == (size, digest(size))

    # The same credentials, straight to the server, cannot delete that version either.
    (version,) = versions(s3_server, locked_bucket, "points/a")
    with pytest.raises(ClientError) as refused:
        s3_server.client().delete_object(
            Bucket=locked_bucket, Key="points/a", VersionId=version["VersionId"]
        )
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


async def test_an_overwrite_keeps_the_locked_version(
    s3_server: SeaweedS3, locked_bucket: str
) -> None:
    settings = lock_settings(s3_server, locked_bucket, "COMPLIANCE")
    until = datetime.now(UTC) + timedelta(minutes=10)
    async with open_store(settings) as store:
        assert isinstance(store, S3Store)
        await store.upload("k", stream(100), retain_until=until)
        await store.upload("k", stream(5), retain_until=until)
        held = versions(s3_server, locked_bucket, "k")
        assert sorted(v["Size"] for v in held) == [5, 100]  # the first bytes are still there
        with pytest.raises(ObjectLocked):
            await store.delete("k")
        assert len(versions(s3_server, locked_bucket, "k")) == 2


async def test_deleted_with_all_its_versions_once_the_lock_lapses(
    s3_server: SeaweedS3, locked_bucket: str
) -> None:
    settings = lock_settings(s3_server, locked_bucket, "COMPLIANCE")
    until = datetime.now(UTC) + timedelta(seconds=3)
    async with open_store(settings) as store:
        assert isinstance(store, S3Store)
        await store.upload("soon", stream(10), retain_until=until)
        with pytest.raises(ObjectLocked):
            await store.delete("soon")
        await asyncio.sleep(max(0.0, (until - datetime.now(UTC)).total_seconds()) + 1.5)
        assert await store.locked_until("soon") is None
        await store.delete("soon")
        assert versions(s3_server, locked_bucket, "soon") == []  # no delete marker, no version
        assert [o async for o in store.list()] == []
        await store.delete("soon")  # a missing object is not an error


async def test_validation_checks_that_the_bucket_has_object_lock(
    s3_server: SeaweedS3, locked_bucket: str, s3_settings: S3Settings
) -> None:
    async with open_store(lock_settings(s3_server, locked_bucket)) as store:
        report = await store.validate()
        assert report.ok, report
        assert [s.name for s in report.steps] == ["lock", "write", "read", "delete"]
        # The probe left nothing behind, not even a delete marker.
        assert s3_server.client().list_object_versions(Bucket=locked_bucket).get("Versions") is None

    plain = s3_settings.model_copy(update={"object_lock": ObjectLock(mode="GOVERNANCE")})
    async with open_store(plain) as store:
        report = await store.validate()
        assert not report.ok
        failure = report.failure
        assert failure is not None and failure.name == "lock"
        assert failure.error_code == "storage_object_lock_missing"
        assert "does not have S3 Object Lock enabled" in (failure.message or "")
        assert s3_settings.bucket in (failure.message or "")

    # Without object_lock, a bucket without it validates as before.
    async with open_store(s3_settings) as store:
        report = await store.validate()
        assert report.ok and [s.name for s in report.steps] == ["write", "read", "delete"]


async def test_validation_passes_on_a_bucket_with_a_default_retention(
    s3_server: SeaweedS3, locked_bucket: str
) -> None:
    """A bucket whose default retention locks every new object for a day: the probe is
    written with its own lock of a moment (an explicit retention overrides the default), so
    it can be deleted, and the check leaves nothing behind."""
    s3_server.client().put_object_lock_configuration(
        Bucket=locked_bucket,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}},
        },
    )
    async with open_store(lock_settings(s3_server, locked_bucket, "COMPLIANCE")) as store:
        report = await store.validate()
        assert report.ok, report
    listing = s3_server.client().list_object_versions(Bucket=locked_bucket)
    assert listing.get("Versions") is None and listing.get("DeleteMarkers") is None


async def test_no_lock_requested_no_lock_written(
    s3_server: SeaweedS3, s3_settings: S3Settings
) -> None:
    """A destination without object_lock ignores a retain-until date: its bucket would refuse
    lock headers."""
    async with open_store(s3_settings) as store:
        assert isinstance(store, S3Store)
        await store.upload("x", stream(10), retain_until=datetime.now(UTC) + timedelta(days=1))
        await store.delete("x")
        assert s3_server.keys(s3_settings.bucket) == []


@pytest.mark.parametrize(
    ("lock", "field"),
    [
        ({"mode": "SOMETIMES", "margin_days": 1}, "object_lock.mode"),
        ({"mode": "COMPLIANCE", "margin_days": -1}, "object_lock.margin_days"),
        ({"mode": "COMPLIANCE", "margin_days": 3651}, "object_lock.margin_days"),
        ({"mode": "COMPLIANCE", "margin_days": "2"}, "object_lock.margin_days"),
        ({"mode": "COMPLIANCE", "margin_days": 1, "legal_hold": True}, "object_lock.legal_hold"),
    ],
)
def test_object_lock_settings_are_validated(lock: dict[str, Any], field: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        S3Settings(bucket="bkt", access_key_id="a", secret_access_key="s", object_lock=lock)
    assert [".".join(map(str, e["loc"])) for e in caught.value.errors()] == [field]
