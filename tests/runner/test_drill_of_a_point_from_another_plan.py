"""A restore point can name a plan of another instance: an import that maps a source instance
to another one keeps the point's plan id, and the source instance may still be registered
here. A drill of that point, started by the point's instance, belongs to that instance only:
its outcome is not written on the other instance's plan, and the other instance's drills of
its own plan neither block it nor are named to it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from backup import drill, jobs
from backup.errors import Conflict
from tests.runner.conftest import GoRig, seed_instance
from tests.servers.seed import seed_destination

NOW = datetime.now(UTC)


async def test_a_drill_of_a_point_naming_another_instances_plan_stays_in_its_instance(
    go: GoRig,
) -> None:
    _, plan_a, backup = await go.backup(items=["orders"])
    runner = go.make_runner()
    await runner.run_once()
    assert (await go.final(backup["_id"]))["status"] == "SUCCEEDED"
    point_a = await go.db.restore_points.find_one({"_id": backup["_id"]})

    instance_b = await seed_instance(go.db, go.box, agent_url=go.agent.url)
    dest_b = await seed_destination(go.db, go.box, instance_b["_id"], go.s3)
    imported = {
        **point_a,
        "_id": uuid.uuid4().hex,
        "instance_id": instance_b["_id"],
        "destination_id": dest_b["_id"],
        "source_instance_id": plan_a["instance_id"],
    }
    await go.db.restore_points.insert_one(imported)
    # as POST .../restore_points/{id}/drill makes it from the point
    as_b = {
        "_id": imported["plan_id"],
        "instance_id": instance_b["_id"],
        "destination_id": dest_b["_id"],
    }
    # A's own drill of its plan under way: B's drill is neither refused nor told of it
    drill_a = await jobs.start_drill(go.db, plan_a, point_a)
    try:
        drill_b = await jobs.start_drill(go.db, as_b, imported)
    except Conflict as exc:
        raise AssertionError(f"B was refused because of A's drill: {exc}") from None
    await go.db.jobs.update_one({"_id": drill_a["_id"]}, {"$set": {"status": "CANCELLED"}})
    await runner.run_once()
    done = await go.final(drill_b["_id"])
    assert done["status"] == "SUCCEEDED", (done["reason"], done["items"])
    proved = await go.db.restore_points.find_one({"_id": imported["_id"]})
    assert proved["last_drill"]["job_id"] == drill_b["_id"]
    untouched = await go.db.plans.find_one({"_id": plan_a["_id"]})
    assert "last_drill" not in untouched, untouched["last_drill"]


async def test_a_plans_drill_proves_its_own_instances_point_not_a_newer_imported_copy(
    go: GoRig,
) -> None:
    _, plan_a, backup = await go.backup(items=["orders"])
    runner = go.make_runner()
    await runner.run_once()
    assert (await go.final(backup["_id"]))["status"] == "SUCCEEDED"
    point_a = await go.db.restore_points.find_one({"_id": backup["_id"]})
    instance_b = await seed_instance(go.db, go.box, agent_url=go.agent.url)
    dest_b = await seed_destination(go.db, go.box, instance_b["_id"], go.s3)
    imported = {
        **point_a,
        "_id": uuid.uuid4().hex,
        "instance_id": instance_b["_id"],
        "destination_id": dest_b["_id"],
        "created_at": point_a["created_at"] + timedelta(hours=1),  # newer than A's own
    }
    await go.db.restore_points.insert_one(imported)
    assert (await drill.newest_point(go.db, plan_a["_id"], instance_id=plan_a["instance_id"]))[
        "_id"
    ] == point_a["_id"]
    # a drill of B's (imported) point does not make A's plan busy for its scheduled drill
    as_b = {"_id": plan_a["_id"], "instance_id": instance_b["_id"], "destination_id": dest_b["_id"]}
    await jobs.start_drill(go.db, as_b, imported)  # (it runs too, proving B's copy)
    await go.db.plans.update_one(
        {"_id": plan_a["_id"]},
        {"$set": {"drill": {"frequency": "0 3 * * *", "enabled": True}, "drill_next_run_at": NOW}},
    )
    assert await drill.fire_due_drills(go.db, NOW + timedelta(seconds=1)) == 1
    scheduled = await go.db.jobs.find_one(
        {"plan_id": plan_a["_id"], "instance_id": plan_a["instance_id"], "type": "DRILL"}
    )
    assert scheduled is not None and scheduled["status"] == "QUEUED", scheduled
    await runner.run_once()
    done = await go.final(scheduled["_id"])
    assert done["status"] == "SUCCEEDED", (done["reason"], done["items"])
    assert done["restore_point_id"] == point_a["_id"]
    proved = await go.db.restore_points.find_one({"_id": point_a["_id"]})
    assert proved["last_drill"]["job_id"] == scheduled["_id"]
    other = await go.db.restore_points.find_one({"_id": imported["_id"]})
    assert (other.get("last_drill") or {}).get("job_id") != scheduled["_id"]
