"""The three calls a data-service broker built on evoila's osb-core makes when it deprovisions
an instance with backups enabled, in its order and with its HTTP Basic credentials:
``DELETE /backupJobs/byInstance/{id}``, ``/backupPlans/byInstance/{id}``,
``/fileDestinations/byInstance/{id}``. Each answers 204, also when repeated and for an unknown
instance; only the broker's (or an operator's) credentials may make them. Files live on the
real S3 server (SeaweedFS); the instance is registered over OSB with a real agent."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from storage import S3Settings, open_store
from tests.broker.conftest import TRANSIENT, Osb, parameters
from tests.broker.test_deprovision import exists, records, seed_backups
from tests.broker.test_instances import running_job
from tests.servers.broker import BROKER_PASSWORD, BROKER_USER, Service, start_service, stop_service
from tests.servers.cloud_controller import CloudController, cloud_controller  # noqa: F401
from tests.servers.log_audit import audit_secret
from tests.servers.ports import free_port
from tests.servers.seed import seed_instance
from tests.servers.uaa import Uaa, uaa  # noqa: F401

CALLS = ("backupJobs", "backupPlans", "fileDestinations")
BROKER = (BROKER_USER, BROKER_PASSWORD)


async def call(
    service: Service,
    what: str,
    iid: str,
    *,
    auth: tuple[str, str] | None = BROKER,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One of the three calls, as osb-core's RestTemplate makes it (HTTP Basic, no body)."""
    sent = dict(headers or {})
    if auth is not None:
        sent["Authorization"] = aiohttp.encode_basic_auth(*auth)
    async with service.http.delete(f"{service.url}/{what}/byInstance/{iid}", headers=sent) as r:
        raw = await r.read()
        return r.status, (await r.json(content_type=None)) if raw else None


async def seeded_instance(
    osb: Osb, broker: Service, agent_url: str, s3: S3Settings, **params: Any
) -> tuple[str, list[str], str]:
    """A registered instance with a binding, a destination, a plan, two restore points whose
    files are in the bucket, a queued, a running and a failed job (whose upload was left in
    the bucket, to be deleted). Returns the id, the kept keys and the failed upload's key."""
    iid = await osb.ready_instance(parameters(agent_url, **params))
    assert (await osb.bind(iid, f"b-{iid}"))[0] == 201
    keys = await seed_backups(broker, iid, s3)
    dest = await broker.db.destinations.find_one({"instance_id": iid})
    orphan = f"{iid}/failed-job/dump.sql"
    async with open_store(s3) as store:

        async def chunks() -> Any:
            yield b"half a backup"

        await store.upload(orphan, chunks())
    await broker.db.jobs.insert_one(
        {
            **running_job(iid, f"failed-{iid}"),
            "status": "FAILED",
            "pending_deletes": [{"destination_id": dest["_id"], "key": orphan}],
        }
    )
    await broker.db.jobs.insert_one(running_job(iid, f"running-{iid}"))
    return iid, keys, orphan


async def snapshot(broker: Service, iid: str) -> dict[str, Any]:
    """Everything of the instance a call could change."""
    out: dict[str, Any] = {}
    for name in ("plans", "jobs", "destinations", "restore_points", "bindings"):
        docs = await getattr(broker.db, name).find({"instance_id": iid}).to_list()
        out[name] = sorted(docs, key=lambda d: str(d["_id"]))
    out["instance"] = await broker.db.instances.find_one({"_id": iid})
    return out


async def test_the_three_calls_in_order_keep_the_backups_by_default(
    osb: Osb, broker: Service, agent_url: str, s3_settings: S3Settings
) -> None:
    broker.instances.job_wait = 1.0  # the running job here has no runner: it is abandoned
    iid, kept, orphan = await seeded_instance(osb, broker, agent_url, s3_settings)

    # 1. Jobs: the queued one cancelled, the running one asked to stop, then abandoned.
    assert await call(broker, "backupJobs", iid) == (204, None)
    jobs = {j["_id"]: j for j in await broker.db.jobs.find({"instance_id": iid}).to_list()}
    assert jobs["queued-1"]["status"] == "CANCELLED"
    assert jobs[f"running-{iid}"]["status"] == "CANCELLED"
    assert "Abandoned" in jobs[f"running-{iid}"]["reason"]
    assert await records(broker, iid) == {
        "plans": 1,
        "jobs": 3,
        "destinations": 1,
        "restore_points": 2,
        "bindings": 1,
    }

    # 2. Plans: removed; the restore points outlive them.
    assert await call(broker, "backupPlans", iid) == (204, None)
    assert (await records(broker, iid))["plans"] == 0
    assert (await records(broker, iid))["restore_points"] == 2

    # 3. Destinations: as a deprovision with the default (keep), the stored backups stay in
    # the bucket, the records that address the destination go with it; the failed backup's
    # upload is deleted (its job record was its only trace).
    assert await call(broker, "fileDestinations", iid) == (204, None)
    assert await records(broker, iid) == {
        "plans": 0,
        "jobs": 0,
        "destinations": 0,
        "restore_points": 0,
        "bindings": 1,
    }
    for key in kept:
        assert await exists(s3_settings, key), "kept"
    assert not await exists(s3_settings, orphan)

    # The instance itself stays registered (its OSB deprovision removes it) and usable.
    doc = await broker.db.instances.find_one({"_id": iid})
    assert doc["state"] == "ready"
    status, body = await osb.deprovision(iid, accepts=False)
    assert (status, body) == (200, {}), "nothing left to wait for"

    # Repeated: 204, nothing else changes; then an unknown (deleted) instance: 204.
    for what in CALLS:
        assert await call(broker, what, iid) == (204, None), what
    for key in kept:
        assert await exists(s3_settings, key)


async def test_each_call_repeated_is_a_204_that_changes_nothing_more(
    osb: Osb, broker: Service, agent_url: str, s3_settings: S3Settings
) -> None:
    broker.instances.job_wait = 1.0
    iid, kept, _ = await seeded_instance(osb, broker, agent_url, s3_settings)
    for what in CALLS:
        assert await call(broker, what, iid) == (204, None), what
        after = await snapshot(broker, iid)
        assert await call(broker, what, iid) == (204, None), what
        assert await snapshot(broker, iid) == after, what
    for key in kept:
        assert await exists(s3_settings, key)


async def test_stored_backups_are_deleted_when_the_instance_says_so(
    osb: Osb, broker: Service, agent_url: str, s3_settings: S3Settings
) -> None:
    broker.instances.job_wait = 1.0
    iid, kept, orphan = await seeded_instance(
        osb, broker, agent_url, s3_settings, delete_backups_on_deprovision=True
    )
    for what in CALLS:
        assert await call(broker, what, iid) == (204, None), what
    for key in [*kept, orphan]:
        assert not await exists(s3_settings, key), key
    assert (await records(broker, iid))["restore_points"] == 0
    assert (await records(broker, iid))["destinations"] == 0


async def test_storage_down_is_a_503_that_loses_nothing_and_a_repeat_finishes(
    osb: Osb, broker: Service, agent_url: str, s3_settings: S3Settings
) -> None:
    broker.instances.job_wait = 1.0
    broker.instances.storage_attempts = 2
    broker.instances.storage_retry_delay = 0.1
    iid = await osb.ready_instance(parameters(agent_url), plan_id=TRANSIENT)
    keys = await seed_backups(broker, iid, s3_settings, objects=1)
    real = s3_settings.endpoint
    await broker.db.destinations.update_many(
        {"instance_id": iid}, {"$set": {"endpoint": f"http://127.0.0.1:{free_port()}"}}
    )
    assert await call(broker, "backupJobs", iid) == (204, None)
    assert await call(broker, "backupPlans", iid) == (204, None)
    status, body = await call(broker, "fileDestinations", iid)
    assert status == 503 and body["error"] == "storage_unavailable", body
    assert "repeat the request" in body["description"]
    assert "1 restore point(s) remain" in body["description"]
    assert (await records(broker, iid))["destinations"] == 1
    assert (await records(broker, iid))["restore_points"] == 1
    assert await exists(s3_settings, keys[0])
    await broker.db.destinations.update_many({"instance_id": iid}, {"$set": {"endpoint": real}})
    assert await call(broker, "fileDestinations", iid) == (204, None)
    assert not await exists(s3_settings, keys[0])
    assert (await records(broker, iid))["destinations"] == 0


async def test_an_unknown_instance_is_a_204(broker: Service) -> None:
    iid = str(uuid.uuid4())
    for what in CALLS:
        assert await call(broker, what, iid) == (204, None), what
    assert await broker.db.instances.count_documents({}) == 0


@pytest.mark.parametrize(
    ("case", "auth", "headers", "status"),
    [
        ("no credentials", None, None, 401),
        ("wrong password", (BROKER_USER, "not-the-password"), None, 401),
        ("wrong user", ("evoila", BROKER_PASSWORD), None, 401),
        ("not basic", None, {"Authorization": "Digest abc"}, 401),
        ("unknown binding key", None, {"Authorization": "Bearer bmk_" + "x" * 43}, 401),
    ],
    ids=["none", "wrong-password", "wrong-user", "not-basic", "unknown-binding-key"],
)
async def test_wrong_credentials_are_401_and_change_nothing(
    osb: Osb,
    broker: Service,
    agent_url: str,
    s3_settings: S3Settings,
    case: str,
    auth: tuple[str, str] | None,
    headers: dict[str, str] | None,
    status: int,
) -> None:
    iid, kept, orphan = await seeded_instance(osb, broker, agent_url, s3_settings)
    before = await snapshot(broker, iid)
    for what in CALLS:
        got, body = await call(broker, what, iid, auth=auth, headers=headers)
        assert got == status and body["error"] == "unauthorized", (case, what, body)
        assert BROKER_PASSWORD not in str(body)
    assert await snapshot(broker, iid) == before
    for key in [*kept, orphan]:
        assert await exists(s3_settings, key)


async def test_a_binding_key_is_refused_and_changes_nothing(
    osb: Osb, broker: Service, agent_url: str, s3_settings: S3Settings
) -> None:
    """The key of the instance's own binding may manage its backups through /v1, but not
    clean them up wholesale the way only the broker does when it deletes the instance."""
    iid, kept, _ = await seeded_instance(osb, broker, agent_url, s3_settings)
    status, bound = await osb.bind(iid, "app-key")
    assert status == 201
    key = bound["credentials"]["key"]
    audit_secret(key, "a binding key of test_evoila_compat")
    before = await snapshot(broker, iid)
    for what in CALLS:
        got, body = await call(
            broker, what, iid, auth=None, headers={"Authorization": f"Bearer {key}"}
        )
        assert got == 403 and body["error"] == "forbidden", (what, body)
        assert key not in str(body)
    assert await snapshot(broker, iid) == before
    for key_ in kept:
        assert await exists(s3_settings, key_)


async def test_operator_credentials_are_accepted(
    mongo_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = "operator-pw-7Hq2Lm"
    audit_secret(password, "the operator password of test_evoila_compat")
    monkeypatch.setenv("OPERATOR_USERNAME", "ops")
    monkeypatch.setenv("OPERATOR_PASSWORD", password)
    service = await start_service(mongo_url, tmp_path)
    try:
        operator = ("ops", password)
        for what in CALLS:
            assert await call(service, what, str(uuid.uuid4()), auth=operator) == (204, None)
    finally:
        await stop_service(service)


async def test_a_user_token_is_refused_and_an_operator_token_accepted(
    mongo_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    uaa: Uaa,  # noqa: F811
    cloud_controller: CloudController,  # noqa: F811
) -> None:
    """A space developer who may manage the instance's backups through /v1 still may not
    make the broker's cleanup calls; a token with the operator scope may."""
    monkeypatch.setenv("OIDC_ISSUER", uaa.issuer)
    monkeypatch.setenv("OIDC_AUDIENCE", "backup_manager")
    monkeypatch.setenv("CLOUD_CONTROLLER_URL", cloud_controller.url)
    monkeypatch.setenv("OPERATOR_SCOPE", "backup_manager.admin")
    service = await start_service(mongo_url, tmp_path)
    try:
        doc = await seed_instance(service.db)
        iid = doc["_id"]
        cloud_controller.grant("alice", iid, read=True, manage=True)
        await service.db.plans.insert_one({"_id": "p1", "instance_id": iid, "name": "n"})
        user = {"Authorization": f"Bearer {uaa.token('alice')}"}
        for what in CALLS:
            status, body = await call(service, what, iid, auth=None, headers=user)
            assert status == 403 and body["error"] == "forbidden", (what, body)
        assert await service.db.plans.count_documents({"instance_id": iid}) == 1
        admin = {"Authorization": f"Bearer {uaa.token('ops', scope=['backup_manager.admin'])}"}
        assert await call(service, "backupPlans", iid, auth=None, headers=admin) == (204, None)
        assert await service.db.plans.count_documents({"instance_id": iid}) == 0
    finally:
        await stop_service(service)
