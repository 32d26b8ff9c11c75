"""Restore point manifests (backup/manifest.py) and the import that rebuilds the catalogue from
them (backup/importer.py), with the runner, the Go agent's stand-in, a real database and real
S3 and Swift servers. The API and the command line are tested end to end in
tests/e2e/test_import.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from backup import importer, jobs, manifest, orphans, restore_points
from backup.database import Database, Document, connect
from backup.errors import InvalidInput, NotFound
from backup.pagination import now
from backup.secrets import SecretBox, generate_master_key_spec, parse_master_keys
from storage import S3Settings, SwiftSettings, open_store
from tests.agent.helpers import PASSWORD, USER, AgentProcess
from tests.runner.conftest import GoRig, final, seed_instance, seed_plan
from tests.servers import seed


async def _stored(settings: S3Settings | SwiftSettings, key: str) -> bytes:
    async with open_store(settings.model_copy(update={"prefix": ""})) as objects:
        return b"".join([c async for c in objects.download(key)])


async def _put(settings: S3Settings | SwiftSettings, key: str, data: bytes) -> None:
    async with open_store(settings.model_copy(update={"prefix": ""})) as objects:
        await objects.upload(key, manifest.chunks(data))


async def _keys(settings: S3Settings | SwiftSettings) -> list[str]:
    async with open_store(settings.model_copy(update={"prefix": ""})) as objects:
        return sorted([o.key async for o in objects.list()])


async def _backed_up(
    go: GoRig,
    settings: S3Settings | SwiftSettings,
    agent: AgentProcess | None = None,
    **plan_fields: Any,
) -> tuple[Document, Document, Document]:
    """(instance, plan, restore point) of a successful backup to ``settings``, by the Go
    agent's stand-in or by ``agent`` (ours)."""
    if agent is None:
        instance = await seed_instance(go.db, go.box, agent_url=go.agent.url)
    else:
        url = f"http://127.0.0.1:{agent.port}"
        instance = await seed_instance(
            go.db, go.box, agent_url=url, username=USER, password=PASSWORD
        )
    plan = await seed_plan(go.db, go.box, instance, settings, **plan_fields)
    job = await jobs.start_backup(go.db, plan)
    runner = go.make_runner(
        clock=None if agent else go.clock, agent_poll_min_seconds=0.2, agent_poll_max_seconds=0.5
    )
    assert await runner.run_once() == 1
    done = await final(go.db, job["_id"], None if agent else go.clock)
    assert done["status"] == "SUCCEEDED", (done["reason"], done["items"])
    point = await go.db.restore_points.find_one({"_id": job["_id"]})
    assert point is not None
    return instance, plan, point


def _body(settings: S3Settings | SwiftSettings) -> dict[str, Any]:
    body = seed.destination_body(settings)
    body.pop("name")
    return body


BACKUP = 'printf "row;row;row;" > "$BACKUP_DIRECTORY/$BACKUP_FILENAME.txt"'


@pytest.fixture
async def fresh(mongo_url: str) -> Any:
    """A second, empty catalogue on the same server: the manager after its database is lost."""
    import uuid

    db = connect(mongo_url, f"t_{uuid.uuid4().hex[:12]}")
    await db.ensure_indexes()
    yield db
    await db.client.drop_database(db.mongo.name)
    await db.close()


@pytest.mark.parametrize(
    ("backend", "agent_kind"), [("s3", "go"), ("swift", "ours")], ids=["s3-go", "swift-ours"]
)
async def test_a_backup_writes_a_sealed_manifest_beside_its_files(
    request: pytest.FixtureRequest,
    go: GoRig,
    make_agent: Callable[..., AgentProcess],
    backend: str,
    agent_kind: str,
    fresh: Database,
) -> None:
    settings: S3Settings | SwiftSettings = request.getfixturevalue(f"{backend}_settings")
    agent = make_agent(backup_body=BACKUP) if agent_kind == "ours" else None
    instance, plan, point = await _backed_up(go, settings, agent, encryption=True)
    scheme = "aes-256-gcm-stream-v1" if agent else "script"
    key = f"{instance['_id']}/{plan['_id']}/{point['_id']}{manifest.SUFFIX}"
    assert point["manifest_key"] == key
    assert key in await _keys(settings)
    data = await _stored(settings, key)
    plan_key = go.box.open_map(plan["secrets"], f"plans/{plan['_id']}")["encryption_key"]
    assert plan_key.encode() not in data, "the data key is never in plain text"

    body = manifest.parse(data, go.box)
    assert body["format"] == 1 and body["restore_point_id"] == point["_id"]
    assert body["instance_id"] == instance["_id"]
    assert body["plan"] == {"id": plan["_id"], "name": plan["name"]}
    assert body["created_at"] == point["created_at"].isoformat()
    assert [i["key"] for i in body["items"]] == [i["key"] for i in point["items"]]
    assert [i["checksum"] for i in body["items"]] == [i["checksum"] for i in point["items"]]
    assert [i["stored_size"] for i in body["items"]] == [i["stored_size"] for i in point["items"]]
    assert body["encryption"]["scheme"] == scheme
    assert body["encryption"]["data_key"]["key_id"] == go.box.active_key_id
    assert body["seal"]["key_id"] == go.box.active_key_id
    assert manifest.data_key(go.box, body) == plan_key

    # and the catalogue comes back from it
    result = await importer.run(fresh, go.box, {"destination": _body(settings)})
    assert [(p.id, p.status) for p in result.points] == [
        (point["_id"], importer.ImportStatus.IMPORTED)
    ]
    got = await fresh.restore_points.find_one({"_id": point["_id"]})
    assert got is not None and restore_points.encryption_key(go.box, got) == plan_key
    assert got["items"] == point["items"] and got["manifest_key"] == key


async def test_a_manifest_written_or_changed_elsewhere_is_refused(go: GoRig) -> None:
    point = {
        "_id": "p1",
        "instance_id": "i1",
        "plan_id": "pl1",
        "job_id": "p1",
        "created_at": now(),
        "items": [{"name": "db", "key": "i1/pl1/p1-0/db.gz", "size": 3, "stored_size": 3}],
    }
    body = manifest.build(go.box, point, plan_name="n", encryption_key="secret-key-material")
    assert manifest.parse(manifest.encode(body), go.box)["instance_id"] == "i1"

    moved = {**body, "instance_id": "someone-else"}
    with pytest.raises(manifest.ManifestError, match="changed after it was written"):
        manifest.parse(manifest.encode(moved), go.box)
    other = SecretBox(parse_master_keys(generate_master_key_spec("k9")))
    with pytest.raises(manifest.ManifestError, match="configured master keys"):
        manifest.parse(manifest.encode(body), other)
    with pytest.raises(manifest.ManifestError, match="reads format 1"):
        manifest.parse(manifest.encode({**body, "format": 2}), go.box)
    for junk in (b"", b"[]", b"{", b"x" * (manifest.MAX_BYTES + 1)):
        with pytest.raises(manifest.ManifestError):
            manifest.parse(junk, go.box)
    # the key only opens for its own point
    stolen = {**body, "restore_point_id": "p2"}
    with pytest.raises(manifest.ManifestError):
        manifest.parse(manifest.encode(stolen), go.box)


async def test_deleting_a_point_deletes_its_manifest_too(go: GoRig) -> None:
    instance, _, point = await _backed_up(go, go.s3)
    assert point["manifest_key"] in await _keys(go.s3)
    await restore_points.delete(go.db, go.box, instance["_id"], point["_id"])
    assert await _keys(go.s3) == []


async def test_import_rebuilds_the_catalogue_once(go: GoRig, fresh: Database) -> None:
    instance, plan, point = await _backed_up(go, go.s3, encryption=True)
    plan_key = go.box.open_map(plan["secrets"], f"plans/{plan['_id']}")["encryption_key"]
    # the new manager knows the instance again (the platform registered it)
    await fresh.instances.insert_one({k: v for k, v in instance.items() if k not in ("secrets",)})

    preview = await importer.run(fresh, go.box, {"destination": _body(go.s3), "dry_run": True})
    assert [(p.id, p.status) for p in preview.points] == [
        (point["_id"], importer.ImportStatus.WOULD_IMPORT)
    ]
    assert await fresh.restore_points.count_documents({}) == 0
    assert await fresh.destinations.count_documents({}) == 0

    result = await importer.run(fresh, go.box, {"destination": _body(go.s3)})
    assert result.found == 1 and result.count(importer.ImportStatus.IMPORTED) == 1
    (outcome,) = result.points
    assert outcome.instance_id == instance["_id"] and not outcome.orphaned
    assert outcome.plan_name == plan["name"]
    got = await fresh.restore_points.find_one({"_id": point["_id"]})
    assert got is not None and got["imported"] is True and got["state"] == "available"
    assert got["instance_id"] == instance["_id"] and got["plan_id"] == plan["_id"]
    assert got["items"] == point["items"] and got["created_at"] == point["created_at"]
    assert restore_points.encryption_key(go.box, got) == plan_key
    dest = await fresh.destinations.find_one({"_id": got["destination_id"]})
    assert dest is not None and dest["instance_id"] == instance["_id"]
    assert dest["bucket"] == go.s3.bucket and "secret_access_key" not in dest

    again = await importer.run(fresh, go.box, {"destination": _body(go.s3)})
    assert [p.status for p in again.points] == [importer.ImportStatus.EXISTING]
    assert await fresh.restore_points.count_documents({}) == 1
    assert await fresh.destinations.count_documents({}) == 1


async def test_import_keeps_points_of_unknown_instances_as_orphans(
    go: GoRig, fresh: Database
) -> None:
    instance, _, point = await _backed_up(go, go.s3)
    result = await importer.run(fresh, go.box, {"destination": _body(go.s3)})
    (outcome,) = result.points
    assert outcome.status == importer.ImportStatus.IMPORTED and outcome.orphaned
    assert outcome.instance_id is None and outcome.source_instance_id == instance["_id"]
    got = await fresh.restore_points.find_one({"_id": point["_id"]})
    assert got is not None and got["instance_id"] is None
    assert got["orphaned"]["instance_id"] == instance["_id"]
    # as a deprovision that keeps backups leaves them: the operators' orphan views see it
    page = await orphans.list_page(fresh, former_instance_id=None, limit=10, cursor=None)
    assert [p["_id"] for p in page.items] == [point["_id"]]
    dest = await fresh.destinations.find_one({"_id": got["destination_id"]})
    assert dest is not None and dest["instance_id"].startswith(orphans.DESTINATION_OWNER)
    assert await fresh.instances.count_documents({}) == 0


async def test_import_maps_points_to_another_instance(go: GoRig, fresh: Database) -> None:
    instance, _, point = await _backed_up(go, go.s3)
    with pytest.raises(NotFound, match="not registered here"):
        await importer.run(
            fresh, go.box, {"destination": _body(go.s3), "instances": {instance["_id"]: "x"}}
        )
    target = await seed_instance(fresh, go.box, agent_url=go.agent.url)
    result = await importer.run(
        fresh,
        go.box,
        {"destination": _body(go.s3), "instances": {instance["_id"]: target["_id"]}},
    )
    (outcome,) = result.points
    assert outcome.instance_id == target["_id"] and not outcome.orphaned
    got = await fresh.restore_points.find_one({"_id": point["_id"]})
    assert got is not None and got["instance_id"] == target["_id"]
    assert got["source_instance_id"] == instance["_id"]


async def test_import_refuses_incomplete_and_forged_points(go: GoRig, fresh: Database) -> None:
    _, _, point = await _backed_up(go, go.s3)
    _, _, other = await _backed_up(go, go.s3)
    # one point lost a file; another's manifest was edited by someone with the credentials
    async with open_store(go.s3) as objects:
        await objects.delete(point["items"][0]["key"])
    forged = json.loads(await _stored(go.s3, other["manifest_key"]))
    forged["instance_id"] = "victim"
    await _put(go.s3, other["manifest_key"], json.dumps(forged).encode())
    await _put(go.s3, f"junk/x{manifest.SUFFIX}", b"not json")

    result = await importer.run(fresh, go.box, {"destination": _body(go.s3)})
    by_id = {p.id: p for p in result.points}
    assert by_id[point["_id"]].status == importer.ImportStatus.INCOMPLETE
    assert "missing" in str(by_id[point["_id"]].reason)
    assert by_id[other["_id"]].status == importer.ImportStatus.INVALID
    assert "changed" in str(by_id[other["_id"]].reason)
    assert by_id["x"].status == importer.ImportStatus.INVALID
    assert await fresh.restore_points.count_documents({}) == 0
    assert await fresh.destinations.count_documents({}) == 0


async def test_full_verification_reads_every_byte(
    go: GoRig, fresh: Database, make_agent: Callable[..., AgentProcess]
) -> None:
    _, _, point = await _backed_up(go, go.s3, make_agent(backup_body=BACKUP))
    item = point["items"][0]
    assert item["checksum"].startswith("sha256:")
    data = await _stored(go.s3, item["key"])
    await _put(go.s3, item["key"], bytes([data[0] ^ 1]) + data[1:])  # same size, other bytes
    body = {"destination": _body(go.s3), "dry_run": True}
    quick = await importer.run(fresh, go.box, body)
    assert [p.status for p in quick.points] == [importer.ImportStatus.WOULD_IMPORT]
    full = await importer.run(fresh, go.box, {**body, "verify_checksums": True})
    assert [p.status for p in full.points] == [importer.ImportStatus.INCOMPLETE]
    assert "checksum" in str(full.points[0].reason)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({}, "body.destination"),
        ({"destination": {"type": "S3"}}, "destination.bucket"),
        ({"destination": {"type": "FTP"}}, "destination"),
        ({"destination": {}, "extra": 1}, "body.extra"),
        ({"destination": {}, "dry_run": "yes"}, "body.dry_run"),
    ],
)
async def test_a_bad_request_is_refused_before_anything(
    go: GoRig, fresh: Database, raw: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        await importer.run(fresh, go.box, raw)
    assert str(caught.value.field).startswith(field)
