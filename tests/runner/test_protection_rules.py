"""Protection state: the rule (backup.protection.assess, a pure function of what is known about
a plan at a moment), the objective derived from a schedule, and the evaluation and change
detection on the real database, with a manual clock moving time across the objective."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from backup import protection
from backup.clock import ManualClock
from backup.database import Database, Document
from backup.jobs import new_item, new_job
from backup.protection import Facts, ProtectionState, assess, effective_rpo
from backup.secrets import SecretBox
from storage import S3Settings
from tests.servers.seed import seed_destination, seed_instance, seed_plan

T0 = datetime(2026, 3, 2, 3, 0, tzinfo=UTC)
DAY = 86400


def facts(**over: Any) -> Facts:
    base: dict[str, Any] = {
        "now": T0 + timedelta(hours=1),
        "rpo_seconds": DAY,
        "last_good_at": T0,
        "next_run_at": T0 + timedelta(hours=12),
        "typical_duration_seconds": 600,
    }
    return Facts(**{**base, **over})


# --- the rule --------------------------------------------------------------------------------


def test_a_plan_across_its_objective() -> None:
    rpo = 24 * 3600
    good = assess(facts(rpo_seconds=rpo, next_run_at=T0 + timedelta(hours=12)))
    assert good.state == ProtectionState.PROTECTED
    assert good.reason == "The newest good backup is 60 minutes old (objective 24 hours)."
    assert good.lapses_at == T0 + timedelta(days=1)

    late = assess(facts(now=T0 + timedelta(hours=26), next_run_at=T0 + timedelta(hours=27)))
    assert late.state == ProtectionState.UNPROTECTED
    assert late.reason == "No good backup for 26 hours; the objective is 24 hours."

    # exactly at the objective still meets it
    edge = assess(facts(now=T0 + timedelta(days=1), next_run_at=T0 + timedelta(hours=2)))
    assert edge.state == ProtectionState.PROTECTED


def test_the_objective_lapsing_before_the_next_backup_can_finish_is_at_risk() -> None:
    # the next fire is due just before the objective lapses, but the backup takes 10 minutes
    risky = assess(
        facts(next_run_at=T0 + timedelta(hours=23, minutes=55), typical_duration_seconds=600)
    )
    assert risky.state == ProtectionState.AT_RISK
    assert risky.reason.startswith("The objective of 24 hours lapses at 2026-03-03 03:00 UTC")
    assert "before the next backup (due 2026-03-03 02:55 UTC) can finish" in risky.reason
    fast = assess(
        facts(next_run_at=T0 + timedelta(hours=23, minutes=55), typical_duration_seconds=60)
    )
    assert fast.state == ProtectionState.PROTECTED


def test_failed_job_paused_plan_failed_drill_and_recovery() -> None:
    failed = assess(facts(last_job_status="FAILED", last_job_reason="pg_dump exited with 1"))
    assert failed.state == ProtectionState.AT_RISK
    assert failed.reason == "The last backup failed: pg_dump exited with 1."

    paused = assess(facts(paused=True))
    assert paused.state == ProtectionState.UNPROTECTED
    assert paused.reason.startswith("The plan is paused")

    drill = assess(
        facts(
            drills_configured=True,
            last_drill_outcome="failed",
            last_drill_reason="checksum mismatch on orders",
        )
    )
    assert drill.state == ProtectionState.AT_RISK
    assert drill.reason == "The last restore drill failed: checksum mismatch on orders."

    untested = assess(facts(drills_configured=True))
    assert untested.state == ProtectionState.AT_RISK
    assert "none has run yet" in untested.reason

    check = assess(facts(destination_check_ok=False, destination_check_reason="bucket gone"))
    assert (check.state, check.reason) == (
        ProtectionState.AT_RISK,
        "The destination's last check failed: bucket gone.",
    )

    # recovered: the next backup succeeded and the drill passed
    recovered = assess(
        facts(last_job_status="SUCCEEDED", drills_configured=True, last_drill_outcome="passed")
    )
    assert recovered.state == ProtectionState.PROTECTED
    assert recovered.reason.endswith("and the last restore drill passed.")


def test_no_backup_at_all_and_reasons_worst_first() -> None:
    none = assess(facts(last_good_at=None))
    assert none.state == ProtectionState.UNPROTECTED
    assert none.reason == "No good backup yet; the objective is 24 hours."
    both = assess(facts(now=T0 + timedelta(days=3), last_job_status="FAILED", last_job_reason="x"))
    assert both.state == ProtectionState.UNPROTECTED
    assert both.reasons == (
        "No good backup for 3 days; the objective is 24 hours.",
        "The last backup failed: x.",
    )


def test_worst_state_and_durations_in_words() -> None:
    P, R, U = ProtectionState
    assert protection.worst([P, R, P]) == R
    assert protection.worst([P, U, R]) == U
    assert protection.worst([]) == U  # an instance with no plan
    words = protection.duration_words
    assert [words(s) for s in (0, 59, 60, 3599, 7200, 93600, 2 * DAY, 40 * DAY)] == [
        "0 seconds",
        "59 seconds",
        "1 minute",
        "59 minutes",
        "2 hours",
        "26 hours",
        "2 days",
        "40 days",
    ]


# --- the objective from the schedule -------------------------------------------------------


def test_objective_derived_from_the_schedule() -> None:
    daily = {"frequency": "0 3 * * *", "timezone": "Europe/Berlin"}
    # the longest gap of a daily plan in Berlin is 25 hours (the clocks go back in October)
    assert protection.longest_gap_seconds("0 3 * * *", "Europe/Berlin", 2026) == 25 * 3600
    assert effective_rpo(daily, year=2026) == protection.Rpo(int(1.5 * 25 * 3600), True)
    assert effective_rpo({**daily, "frequency": "0 3 * * 1-5"}, year=2026).seconds == int(
        1.5 * 73 * 3600  # Friday 03:00 to Monday 03:00, and a Sunday of 25 hours
    )
    utc = effective_rpo({**daily, "timezone": "UTC"}, year=2026)
    assert utc == protection.Rpo(36 * 3600, True)
    # set: used as it is
    assert effective_rpo({**daily, "rpo_seconds": 7200}) == protection.Rpo(7200, False)
    # 29 February: four years between fires
    leap = protection.longest_gap_seconds("0 3 29 2 *", "UTC", 2026)
    assert (
        leap == (datetime(2032, 2, 29, tzinfo=UTC) - datetime(2028, 2, 29, tzinfo=UTC)).days * DAY
    )


# --- evaluation on the database, with a manual clock -----------------------------------------


async def _point(store: Database, plan: Document, at: datetime, job_id: str) -> None:
    await store.restore_points.insert_one(
        {
            "_id": uuid.uuid4().hex,
            "instance_id": plan["instance_id"],
            "plan_id": plan["_id"],
            "destination_id": plan["destination_id"],
            "job_id": job_id,
            "created_at": at,
            "expires_at": at + timedelta(days=30),
            "items": [],
            "state": "available",
            "schema_version": 1,
        }
    )


async def _job(store: Database, plan: Document, status: str, start: datetime, **more: Any) -> str:
    job = new_job(
        instance_id=plan["instance_id"],
        type="BACKUP",
        plan_id=plan["_id"],
        destination_id=plan["destination_id"],
        trigger="SCHEDULE",
        items=[new_item("orders")],
        compression=True,
        encryption={"enabled": False},
    )
    job.update(status=status, started_at=start, ended_at=start + timedelta(minutes=10), **more)
    await store.jobs.insert_one(job)
    await store.plans.update_one({"_id": plan["_id"]}, {"$set": {"last_job_id": job["_id"]}})
    return str(job["_id"])


async def test_evaluation_and_changes_across_time(store: Database, box: SecretBox) -> None:
    clock = ManualClock(T0)
    instance = await seed_instance(store)
    settings = S3Settings(
        endpoint="http://127.0.0.1:9", bucket="backups", access_key_id="a", secret_access_key="s"
    )
    dest = await seed_destination(store, box, instance["_id"], settings)
    plan = await seed_plan(
        store, box, instance, dest["_id"], at=T0, frequency="0 3 * * *", rpo_seconds=36 * 3600
    )
    bare = await seed_instance(store)  # no plan at all
    gone = await seed_instance(store, state="deleted")
    # a webhook that wants protection changes (its deliveries are the outbox rows)
    await store.webhooks.insert_one(
        {
            "_id": "hook-1",
            "instance_id": instance["_id"],
            "enabled": True,
            "events": ["protection.changed"],
            "created_at": T0,
        }
    )

    first = await protection.refresh(store, clock.now())
    assert first == []  # the first look is no change
    stored = {d["_id"]: d async for d in store.protection.find()}
    assert set(stored) == {instance["_id"], bare["_id"]}  # not the deleted one
    assert gone["_id"] not in stored
    assert stored[bare["_id"]]["state"] == "unprotected"
    assert stored[bare["_id"]]["reason"] == "The instance has no backup plan."
    assert stored[instance["_id"]]["state"] == "unprotected"  # no backup yet

    # a backup succeeds: protected, and the change is an event
    job = await _job(store, plan, "SUCCEEDED", T0)
    await _point(store, plan, T0 + timedelta(minutes=10), job)
    await clock.advance(3600)
    changes = await protection.refresh(store, clock.now())
    assert [(c.plan_id, c.previous, c.state) for c in changes] == [
        (plan["_id"], ProtectionState.UNPROTECTED, ProtectionState.PROTECTED)
    ]
    deliveries = await store.webhook_deliveries.find().to_list()
    assert [(d["event_type"], json.loads(d["body"])["data"]["state"]) for d in deliveries] == [
        ("protection.changed", "protected")
    ]

    # the next fire fails: at risk, with the job's reason
    await clock.advance(DAY)
    await _job(store, plan, "FAILED", clock.now(), reason="The agent could not be reached.")
    [change] = await protection.refresh(store, clock.now())
    assert change.state == ProtectionState.AT_RISK
    assert change.reason == "The last backup failed: The agent could not be reached."

    # time passes beyond the objective: unprotected, saying for how long
    await clock.advance(13 * 3600)
    [change] = await protection.refresh(store, clock.now())
    assert change.state == ProtectionState.UNPROTECTED
    assert change.reason == "No good backup for 37 hours; the objective is 36 hours."
    doc = await store.protection.find_one({"_id": instance["_id"]})
    assert doc["state"] == "unprotected" and doc["evaluated_at"] == clock.now()

    # recovered: a manual backup succeeds
    job = await _job(store, plan, "SUCCEEDED", clock.now())
    await _point(store, plan, clock.now() + timedelta(minutes=10), job)
    await clock.advance(1200)
    [change] = await protection.refresh(store, clock.now())
    assert (change.previous, change.state) == (
        ProtectionState.UNPROTECTED,
        ProtectionState.PROTECTED,
    )
    assert await protection.refresh(store, clock.now()) == []  # nothing changed since

    # a failed drill on the plan (as backup/drill.py records it) puts it at risk
    await store.plans.update_one(
        {"_id": plan["_id"]},
        {
            "$set": {
                "drill": {"frequency": "0 5 * * 0", "enabled": True},
                "last_drill": {"outcome": "failed", "reason": "verify exited with 3", "at": T0},
            }
        },
    )
    [change] = await protection.refresh(store, clock.now())
    assert change.reason == "The last restore drill failed: verify exited with 3."

    # paused: unprotected; the instance is the worst of its plans
    await store.plans.update_one({"_id": plan["_id"]}, {"$set": {"paused": True}})
    [result] = await protection.evaluate(store, clock.now(), instance_ids=[instance["_id"]])
    assert result.state == ProtectionState.UNPROTECTED
    assert result.reason.startswith("The plan is paused")

    # the instance is deprovisioned: it leaves the fleet view
    await store.instances.update_one({"_id": instance["_id"]}, {"$set": {"state": "deleted"}})
    await protection.refresh(store, clock.now())
    assert await store.protection.find_one({"_id": instance["_id"]}) is None


async def test_a_copy_in_another_instance_does_not_protect_the_plan(
    store: Database, box: SecretBox
) -> None:
    """A restore point imported into another instance keeps its plan's id; it protects that
    instance's data, not the plan's own instance: neither the fleet's evaluation nor one
    instance's counts it."""
    instance = await seed_instance(store)
    other = await seed_instance(store)
    settings = S3Settings(
        endpoint="http://127.0.0.1:9", bucket="backups", access_key_id="a", secret_access_key="s"
    )
    dest = await seed_destination(store, box, instance["_id"], settings)
    plan = await seed_plan(
        store, box, instance, dest["_id"], at=T0, frequency="0 3 * * *", rpo_seconds=36 * 3600
    )
    await _point(store, {**plan, "instance_id": other["_id"]}, T0 + timedelta(hours=1), "job-x")
    at = T0 + timedelta(hours=2)
    for scope in (None, [instance["_id"]]):
        [found] = [
            r
            for r in await protection.evaluate(store, at, instance_ids=scope)
            if r.instance_id == instance["_id"]
        ]
        assert found.plans[0].state == ProtectionState.UNPROTECTED, scope
    # its own point does protect it
    await _point(store, plan, T0 + timedelta(hours=1), "job-y")
    for scope in (None, [instance["_id"]]):
        [found] = [
            r
            for r in await protection.evaluate(store, at, instance_ids=scope)
            if r.instance_id == instance["_id"]
        ]
        assert found.plans[0].state == ProtectionState.PROTECTED, scope
