"""Webhook events where they happen: the job runner (a job that ends SUCCEEDED or FAILED),
a restore point deleted, and the retention sweep (a restore point expired) each queue an
event in the outbox for the instance's webhooks that want it, with the CloudEvents body
that will be sent. (Delivery itself: tests/broker/test_webhook_delivery.py.)"""

from __future__ import annotations

import json
from typing import Any

from backup import jobs, restore_points, webhooks
from backup.database import Database, Document
from backup.retention import RetentionSweeper
from backup.secrets import SecretBox
from backup.webhooks import WebhookSettings, WebhookSpec
from tests.runner.conftest import GoRig

# A name that does not resolve: the URL check leaves it to the delivery (nothing is sent here)
URL = "https://receiver.invalid/hooks"
SECRET = "runner-events-Secret-0123456789"


async def subscribe(db: Database, box: SecretBox, instance_id: str, *events: str) -> Document:
    spec = WebhookSpec.model_validate({"url": URL, "events": list(events), "secret": SECRET})
    return await webhooks.create(db, box, instance_id, spec, WebhookSettings())


async def queued(db: Database, instance_id: str) -> list[dict[str, Any]]:
    """The events queued for ``instance_id``, oldest first (the bodies that will be sent)."""
    rows = await db.webhook_deliveries.find({"instance_id": instance_id}).to_list()
    rows.sort(key=lambda r: r["created_at"])
    return [json.loads(r["body"]) | {"_row": r} for r in rows]


async def test_a_job_that_succeeds_and_a_deleted_restore_point_are_events(go: GoRig) -> None:
    instance, _plan, job = await go.backup()
    hook = await subscribe(
        go.db, go.box, instance["_id"], "job.succeeded", "job.failed", "restore_point.deleted"
    )
    await subscribe(go.db, go.box, instance["_id"], "drill.failed")  # wants none of these
    runner = go.make_runner()
    assert await runner.run_once() == 1
    done = await go.final(job["_id"])
    assert done["status"] == "SUCCEEDED", done["reason"]
    await runner.idle()

    (event,) = await queued(go.db, instance["_id"])
    assert event["type"] == "io.osbbackup.job.succeeded"
    assert event["subject"] == job["_id"]
    assert event["source"] == f"/v1/service_instances/{instance['_id']}"
    assert event["data"]["status"] == "SUCCEEDED"
    assert event["data"]["restore_point_id"] == job["_id"]
    assert event["data"]["type"] == "BACKUP"
    assert event["_row"]["webhook_id"] == hook["_id"] and event["_row"]["state"] == "pending"
    assert webhooks.NOTIFY_PENDING not in await go.final(job["_id"])  # queued: mark cleared

    await restore_points.delete(go.db, go.box, instance["_id"], job["_id"])
    first, second = await queued(go.db, instance["_id"])
    assert first["id"] == event["id"]
    assert second["type"] == "io.osbbackup.restore_point.deleted"
    assert second["subject"] == job["_id"]
    assert second["data"]["restore_point_id"] == job["_id"]


async def test_a_job_that_fails_is_an_event_with_its_reason(go: GoRig) -> None:
    instance, _, job = await go.backup(password="wrong")
    await subscribe(go.db, go.box, instance["_id"], "job.failed")
    runner = go.make_runner()
    await runner.run_once()
    done = await go.final(job["_id"])
    assert done["status"] == "FAILED"
    await runner.idle()
    (event,) = await queued(go.db, instance["_id"])
    assert event["type"] == "io.osbbackup.job.failed"
    assert event["data"]["reason"] == done["reason"]
    assert event["data"]["status"] == "FAILED"


async def test_a_restore_point_the_retention_sweep_deletes_is_an_expired_event(
    go: GoRig,
) -> None:
    instance, plan, first = await go.backup(retention={"style": "FILES", "period": 1})
    await subscribe(go.db, go.box, instance["_id"], "restore_point.expired")
    runner = go.make_runner()
    await runner.run_once()
    assert (await go.final(first["_id"]))["status"] == "SUCCEEDED"
    await go.clock.advance(60)
    second = await jobs.start_backup(go.db, plan)
    await runner.run_once()
    assert (await go.final(second["_id"]))["status"] == "SUCCEEDED"
    await runner.idle()

    # the runner sweeps a plan's retention after each backup; a sweep after finds no more
    await RetentionSweeper(go.db, go.box, clock=go.clock).run_once()
    assert await go.db.restore_points.count_documents({"plan_id": plan["_id"]}) == 1
    (event,) = await queued(go.db, instance["_id"])
    assert event["type"] == "io.osbbackup.restore_point.expired"
    assert event["subject"] == first["_id"]
    assert event["data"]["plan_id"] == plan["_id"]


async def test_a_job_event_lost_in_a_crash_is_queued_later_once(go: GoRig) -> None:
    """A replica that ends a job and dies before queuing its event leaves the job marked
    (the mark is written with the final state): any replica's delivery loop queues the event
    then, with the id the dead replica would have used, and never twice per webhook."""
    instance, _plan, job = await go.backup()
    hook = await subscribe(go.db, go.box, instance["_id"], "job.succeeded")
    runner = go.make_runner()
    assert await runner.run_once() == 1
    assert (await go.final(job["_id"]))["status"] == "SUCCEEDED"
    await runner.idle()
    (sent,) = await queued(go.db, instance["_id"])

    # as if the replica had died between its two writes: the mark set, the event not queued
    await go.db.webhook_deliveries.delete_many({"instance_id": instance["_id"]})
    await go.db.jobs.update_one({"_id": job["_id"]}, {"$set": {webhooks.NOTIFY_PENDING: True}})
    assert await webhooks.requeue_job_events(go.db) == 1
    (again,) = await queued(go.db, instance["_id"])
    assert again["id"] == sent["id"] and again["type"] == "io.osbbackup.job.succeeded"
    assert again["_row"]["webhook_id"] == hook["_id"]
    assert webhooks.NOTIFY_PENDING not in await go.final(job["_id"])
    assert await webhooks.requeue_job_events(go.db) == 0

    # as if it had died after queuing but before clearing the mark: queued again, not twice
    await go.db.jobs.update_one({"_id": job["_id"]}, {"$set": {webhooks.NOTIFY_PENDING: True}})
    assert await webhooks.requeue_job_events(go.db) == 1
    assert [e["id"] for e in await queued(go.db, instance["_id"])] == [sent["id"]]
