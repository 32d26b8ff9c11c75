"""The runner's side of restores into another item or instance (issue 17, part 3), against two
Go-protocol agents (stand-ins, one per instance) and real S3: the restore goes to the target's
agent only, with the target's database connection details and the target item, downloading
from the source's destination with the restore point's sealed key; and a restore stopped
because its source is being deleted says so."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from backup import jobs, restore_points
from backup.database import Document
from tests.runner.conftest import GoRig, seed_instance, until
from tests.runner.go_agent import GoAgentStandIn
from tests.servers.seed import DB_PASSWORD

TARGET_DB = {
    "host": "db-b.internal",
    "port": 6543,
    "username": "b-user",
    "parameters": {"PGSSLMODE": "require"},
}


@pytest.fixture
async def agent_b() -> AsyncIterator[GoAgentStandIn]:
    agent = await GoAgentStandIn().start()
    yield agent
    await agent.stop()


async def _backed_up(go: GoRig) -> tuple[Document, Document, Document]:
    """(instance a, its plan, the restore point of an encrypted backup of it)."""
    instance, plan, job = await go.backup(encryption=True)
    runner = go.make_runner()
    assert await runner.run_once() == 1
    done = await go.final(job["_id"])
    assert done["status"] == "SUCCEEDED", done["reason"]
    point = await go.db.restore_points.find_one({"_id": job["_id"]})
    assert point is not None
    return instance, plan, point


async def _target(go: GoRig, agent: GoAgentStandIn) -> Document:
    b = await seed_instance(go.db, go.box, agent_url=agent.url, items=["orders_copy", "customers"])
    await go.db.instances.update_one({"_id": b["_id"]}, {"$set": {"database": TARGET_DB}})
    return {**b, "database": TARGET_DB}


async def test_the_targets_agent_restores_into_the_targets_database(
    go: GoRig, agent_b: GoAgentStandIn
) -> None:
    a, plan, point = await _backed_up(go)
    b = await _target(go, agent_b)
    sent_to_a = len(go.agent.requests)
    restore = await jobs.start_restore(
        go.db, point, [("orders", "orders_copy"), ("customers", None)], target=b
    )
    assert restore["instance_id"] == b["_id"] and restore["source_instance_id"] == a["_id"]
    runner = go.make_runner()
    assert await runner.run_once() == 1
    done = await go.final(restore["_id"])
    assert done["status"] == "SUCCEEDED", done["reason"]
    assert len(go.agent.requests) == sent_to_a, "the source's agent was asked nothing"
    sent = [body for kind, body in agent_b.requests if kind == "restore"]
    assert [b_["restore"]["database"] for b_ in sent] == ["orders_copy", "customers"]
    key = go.box.open_map(plan["secrets"], f"plans/{plan['_id']}")["encryption_key"]
    for body, item in zip(sent, point["items"], strict=True):
        section = body["restore"]
        assert section["host"] == "db-b.internal" and section["username"] == "b-user"
        assert section["password"] == DB_PASSWORD
        assert {"BACKUP_PORT": "6543"} in section["parameters"]
        assert {"PGSSLMODE": "require"} in section["parameters"]
        # the source's destination and the point's own key
        assert body["destination"]["bucket"] == go.s3.bucket
        assert (
            body["destination"]["filenamePrefix"] + body["destination"]["filename"] == (item["key"])
        )
        assert body["encryption_key"] == key
    assert agent_b.downloaded == [i["key"] for i in point["items"]]
    # the restore point is still the source's, unchanged
    kept = await go.db.restore_points.find_one({"_id": point["_id"]})
    assert kept is not None and kept["instance_id"] == a["_id"] and kept["state"] == "available"
    assert restore_points.encryption_key(go.box, kept) == key
    await runner.idle()


async def test_a_restore_stopped_because_its_source_goes_says_so(
    go: GoRig, agent_b: GoAgentStandIn
) -> None:
    a, _plan, point = await _backed_up(go)
    b = await _target(go, agent_b)
    restore = await jobs.start_restore(
        go.db, point, [("orders", "orders_copy"), ("customers", None)], target=b
    )
    agent_b.hold()
    runner = go.make_runner()
    assert await runner.run_once() == 1
    await until(lambda: _started(agent_b, f"{restore['_id']}-0"), clock=go.clock)
    # what a deprovision of the source does (backup/deprovision.py Steps.stop_jobs)
    await go.db.instances.update_one({"_id": a["_id"]}, {"$set": {"state": "deprovisioning"}})
    await go.db.jobs.update_one({"_id": restore["_id"]}, {"$set": {"cancel_requested": True}})
    agent_b.let_go()
    done = await go.final(restore["_id"])
    assert done["status"] == "CANCELLED", done
    assert done["reason"] == (
        "Cancelled: the instance of its restore point is being deleted after restoring orders."
    )
    await runner.idle()


async def _started(agent: GoAgentStandIn, agent_job_id: str) -> bool:
    return agent.starts[agent_job_id] > 0
