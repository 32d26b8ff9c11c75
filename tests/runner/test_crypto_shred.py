"""Crypto-shredding: a real encrypted backup (our agent as a process, SeaweedFS) deleted with
its instance while the storage refuses the deletion. The keys are destroyed first, so the
files left in the bucket cannot be decrypted by anyone holding the manager's master key and
its database: every sealed value in every collection is decrypted with the master key, the
AES-GCM tag ignored (holding the key, one can), and each result tried on the file. The same
file does decrypt with the point's key taken before the shred: the test can fail.

The one copy that survives is the point's manifest (recovery without the database), which
holds the data key sealed with the master key: the answer names it, and the retention sweep
deletes it with the files once the storage is back (docs/security.md, "Crypto-shredding").
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from agent.transforms import TransformError, decoder
from backup import restore_points
from backup.clock import SystemClock
from backup.database import Database
from backup.deprovision import Steps
from backup.retention import RetentionSweeper
from backup.secrets import SecretBox, parse_master_keys
from storage import S3Settings, open_store
from tests.runner.conftest import final
from tests.runner.test_our_agent import PAYLOAD, Ours, ours  # noqa: F401
from tests.servers.ports import free_port
from tests.servers.s3 import SeaweedS3

MASTER = secrets.token_bytes(32)


@pytest.fixture
def box() -> SecretBox:
    """The manager's master key, known to this test (the attacker's position)."""
    spec = "k1:" + base64.urlsafe_b64encode(MASTER).decode().rstrip("=")
    return SecretBox(parse_master_keys(spec))


def _sealed_values(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        if {"kid", "n", "ct"} <= set(value):
            yield value
        for inner in value.values():
            yield from _sealed_values(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _sealed_values(inner)


def _open_without_tag(key: bytes, sealed: dict[str, Any]) -> bytes:
    """AES-GCM's plaintext without checking its tag or associated data: what anyone holding
    the key can read from a sealed value, whatever document it was bound to."""
    nonce, ciphertext = bytes(sealed["n"]), bytes(sealed["ct"])[:-16]
    counter = nonce + (2).to_bytes(4, "big")
    decryptor = Cipher(algorithms.AES(key), modes.CTR(counter)).decryptor()
    return decryptor.update(ciphertext) + decryptor.finalize()


async def _everything_the_manager_holds(db: Database) -> list[str]:
    """Every secret the manager's database still holds, opened with the master key."""
    found: list[str] = []
    for name in await db.mongo.list_collection_names():
        async for doc in db.mongo[name].find({}):
            for sealed in _sealed_values(doc):
                plain = _open_without_tag(MASTER, sealed)
                found.append(plain.decode(errors="replace"))
    return found


def _decrypts(stored: bytes, passphrase: str) -> bool:
    try:
        chain = decoder("zstd", passphrase)
        out = chain.update(stored) + chain.finalize()
    except (TransformError, ValueError):
        return False
    return out == PAYLOAD.encode()


async def test_files_left_after_a_shred_cannot_be_decrypted_with_the_master_key(
    ours: Ours,  # noqa: F811
    s3_server: SeaweedS3,
    s3_settings: S3Settings,
) -> None:
    agent = ours.agent()
    instance, _, job = await ours.backup(
        agent, s3_settings, items=["orders"], encryption=True, compression=True
    )
    runner = ours.runner()
    assert await runner.run_once() == 1
    done = await final(ours.db, job["_id"])
    assert done["status"] == "SUCCEEDED", (done["reason"], done["items"])
    point = await ours.db.restore_points.find_one({"_id": job["_id"]})
    (item,) = point["items"]
    client = s3_server.client()
    stored = client.get_object(Bucket=s3_settings.bucket, Key=item["key"])["Body"].read()
    data_key = restore_points.encryption_key(ours.box, point)
    assert data_key and _decrypts(stored, data_key), "the right key decrypts the file"
    # Before the shred, the manager's own records open it.
    assert data_key in await _everything_the_manager_holds(ours.db)

    # The instance is deleted with its backups while the storage refuses every request.
    await ours.db.destinations.update_many(
        {"instance_id": instance["_id"]},
        {"$set": {"endpoint": f"http://127.0.0.1:{free_port()}"}},
    )
    steps = Steps(
        ours.db,
        ours.box,
        SystemClock(),
        open_store,
        storage_attempts=2,
        storage_retry_delay=0.05,
    )
    await steps.remove_plans(instance["_id"])
    result = await steps.delete_stored_backups(instance["_id"])
    assert result.shredded == [point["_id"]]
    assert set(result.remaining[point["_id"]]) >= {item["key"]}
    assert "could not be deleted yet" in result.describe()

    # The file is still there, and nothing the manager holds decrypts it.
    left = client.get_object(Bucket=s3_settings.bucket, Key=item["key"])["Body"].read()
    assert left == stored
    held = await _everything_the_manager_holds(ours.db)
    assert held, "the instance's own secrets are still sealed there"
    assert data_key not in held
    assert not any(_decrypts(stored, candidate) for candidate in held)
    record = await ours.db.restore_points.find_one({"_id": point["_id"]})
    assert record["state"] == "deleting" and "secrets" not in record and record["shredded_at"]

    # The manifest (if this build writes one) is the copy that survives: named in the answer.
    if point.get("manifest_key"):
        assert result.manifests_left == {point["_id"]: point["manifest_key"]}
        assert "manifest" in result.describe()

    # The storage is back: the sweep deletes what was left, the manifest first.
    await ours.db.destinations.update_many(
        {"instance_id": instance["_id"]}, {"$set": {"endpoint": s3_settings.endpoint}}
    )
    swept = await RetentionSweeper(ours.db, ours.box).run_once()
    assert swept.deleted == 1, swept
    names = [
        o["Key"]
        for o in client.list_objects_v2(Bucket=s3_settings.bucket).get("Contents", [])
        if o["Key"].startswith(f"{instance['_id']}/")
    ]
    assert names == []
    assert await ours.db.restore_points.find_one({"_id": point["_id"]}) is None
