"""A restart keeps every instance, binding and operation; an operation in progress is resumed
by the next replica, after a clean stop at once, after a crash when the lease lapses."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from backup.secrets import generate_master_key_spec
from tests.broker.conftest import FAST, Osb, go_parameters, provision_body
from tests.broker.test_bindings import api_get
from tests.runner.go_agent import GoAgentStandIn
from tests.servers.broker import start_service, stop_service
from tests.servers.log_audit import audit_secret


async def test_restart_keeps_instances_bindings_and_operations(
    mongo_url: str, tmp_path: Path, go_agent: GoAgentStandIn
) -> None:
    database = f"t_{uuid.uuid4().hex[:12]}"
    keys = generate_master_key_spec()
    settings = {**FAST, "AGENT_PROBE_TIMEOUT_SECONDS": "600", "SECRETS_MASTER_KEYS": keys}
    first = await start_service(mongo_url, tmp_path, database, **settings)
    osb = Osb(first)
    ready = await osb.ready_instance(go_parameters(go_agent))
    status, bound = await osb.bind(ready, "binding-1")
    assert status == 201
    key = audit_secret(bound["credentials"]["key"])
    # An operation under way at the restart: its agent is not up yet.
    late = GoAgentStandIn()
    pending = str(uuid.uuid4())
    status, accepted = await osb.provision(pending, provision_body(go_parameters(late)))
    assert status == 202
    await stop_service(first)

    second = await start_service(mongo_url, tmp_path, database, **settings)
    try:
        osb = Osb(second)
        await late.start()
        result = await osb.wait(pending, accepted["operation"])
        assert result["state"] == "succeeded", result
        pending_doc = await second.db.instances.find_one({"_id": pending})
        assert pending_doc["state"] == "ready" and pending_doc["agent"]["kind"] == "go"
        # Everything done before the restart is still there and usable.
        status, view, _ = await osb.call("GET", f"/v2/service_instances/{ready}")
        assert status == 200 and view["metadata"]["attributes"]["agent_kind"] == "go"
        doc = await second.db.instances.find_one({"_id": ready})
        first_op = doc["last_operation"]["id"]
        assert (await osb.last_operation(ready, first_op))[1]["state"] == "succeeded"
        status, _, _ = await osb.call(
            "GET", f"/v2/service_instances/{ready}/service_bindings/binding-1"
        )
        assert status == 200
        assert await api_get(second, key, ready) == 200
        # The secrets still open with the same master key.
        assert (await osb.provision(ready, provision_body(go_parameters(go_agent))))[0] == 200
    finally:
        await stop_service(second)
        await late.stop()


async def test_a_crashed_replicas_operation_is_taken_over(mongo_url: str, tmp_path: Path) -> None:
    """What a replica killed mid-operation leaves behind is an operation in progress whose
    lease nobody renews. The test writes that state over two operations this service is
    working on (its worker then loses them: fencing); the sweep takes over the one whose lease
    lapsed, and leaves alone the one whose owner is alive."""
    settings = {**FAST, "AGENT_PROBE_TIMEOUT_SECONDS": "600", "OPERATION_LEASE_SECONDS": "2"}
    service = await start_service(mongo_url, tmp_path, **settings)
    late = GoAgentStandIn()
    try:
        osb = Osb(service)
        crashed, alive = str(uuid.uuid4()), str(uuid.uuid4())
        ops = {}
        for iid in (crashed, alive):
            status, data = await osb.provision(iid, provision_body(go_parameters(late)))
            assert status == 202
            ops[iid] = data["operation"]
        now = datetime.now(UTC)
        for iid, owner, expires in [
            (crashed, "crashed-replica", now - timedelta(seconds=1)),
            (alive, "live-replica", now + timedelta(hours=1)),
        ]:
            await service.db.instances.update_one(
                {"_id": iid},
                {
                    "$set": {
                        "last_operation.lease_owner": owner,
                        "last_operation.lease_expires_at": expires,
                    }
                },
            )
        await late.start()
        assert (await osb.wait(crashed, ops[crashed]))["state"] == "succeeded"
        doc = await service.db.instances.find_one({"_id": crashed})
        assert doc["last_operation"]["lease_owner"] is None
        # Several sweeps later the live replica's operation is still its own.
        await asyncio.sleep(3)
        live = await service.db.instances.find_one({"_id": alive})
        assert live["last_operation"]["state"] == "in progress", "a live lease is not stolen"
        assert live["last_operation"]["lease_owner"] == "live-replica"
    finally:
        await stop_service(service)
        await late.stop()


async def test_master_key_rotation(
    mongo_url: str, tmp_path: Path, go_agent: GoAgentStandIn
) -> None:
    """A new master key first, the old one after: stored secrets still open, the sweep
    re-seals them with the new key, and then the old key can be dropped."""
    database = f"t_{uuid.uuid4().hex[:12]}"
    old = generate_master_key_spec("k1")
    new = generate_master_key_spec("k2")
    body = provision_body(go_parameters(go_agent))
    service = await start_service(mongo_url, tmp_path, database, SECRETS_MASTER_KEYS=old, **FAST)
    iid = await Osb(service).ready_instance(body["parameters"])
    await stop_service(service)

    service = await start_service(
        mongo_url, tmp_path, database, SECRETS_MASTER_KEYS=f"{new},{old}", **FAST
    )
    try:
        await service.instances.reseal()  # the sweep does it too, at start and then regularly
        doc = await service.db.instances.find_one({"_id": iid})
        assert {v["kid"] for v in doc["secrets"].values()} == {"k2"}
    finally:
        await stop_service(service)

    service = await start_service(mongo_url, tmp_path, database, SECRETS_MASTER_KEYS=new, **FAST)
    try:
        # An identical repeat compares the stored secrets: they open with the new key alone.
        assert (await Osb(service).provision(iid, body))[0] == 200
    finally:
        await stop_service(service)
