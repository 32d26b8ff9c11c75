"""What deprovisioning an instance does, once its operation has been started.

In the order of docs/osb.md ("Deprovision"), each step safe to repeat, so that a deletion
resumed by another replica, or repeated after a failure, picks up where it stopped: the
instance's plans are deleted; queued jobs are cancelled and running ones asked to stop,
waited for up to ``job_wait`` (counted from the request) and then abandoned; the files
failed backups left are deleted, and the stored backups too when the instance says so,
each retried a few times before the operation fails; the records go; the instance becomes
a tombstone (:meth:`backup.operations.Operations.bury`).

Every step renews the operation's lease and says where it is (``last_operation``'s
description), and raises :class:`~backup.operations.LeaseLost` as soon as another replica
took the operation over.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog

from backup import events, restore_points
from backup.clock import Clock
from backup.errors import BackupError, Conflict, NotFound
from backup.operations import OperationFailed, Operations, human_duration
from backup.retention import RetentionSweeper
from backup.secrets import SecretBox
from backup.store import Document, Store
from storage import ObjectStore

log = structlog.get_logger(__name__)

StoreOpener = Callable[[Any], ObjectStore]


class _StorageRetry(Exception):
    """A storage failure worth retrying; its message says what failed, in words."""


def _describe(exc: Exception) -> str:
    return exc.description if isinstance(exc, BackupError) else str(exc)


async def nothing_to_wait_for(store: Store, doc: Document) -> bool:
    """Whether deleting the instance can be done within the request: no running job, no
    file of a failed backup to delete, and no stored backup to delete."""
    running = await store.jobs.find_one(
        {"instance_id": doc["_id"], "status": "RUNNING"}, {"_id": 1}
    )
    if running is not None:
        return False
    leftovers = await store.jobs.find_one(
        {"instance_id": doc["_id"], "pending_deletes.0": {"$exists": True}}, {"_id": 1}
    )
    if leftovers is not None:
        return False
    if doc.get("delete_backups_on_deprovision"):
        point = await store.restore_points.find_one({"instance_id": doc["_id"]}, {"_id": 1})
        return point is None
    return True


@dataclass
class Deprovision:
    """One run of a deprovision operation on ``doc`` (as read when the worker claimed it)."""

    store: Store
    box: SecretBox
    ops: Operations
    clock: Clock
    opener: StoreOpener
    job_wait: float  # how long running jobs are waited for, from the request
    storage_attempts: int  # per restore point (or job's leftovers), before the operation fails
    storage_retry_delay: float  # doubled after each attempt

    async def run(self, doc: Document) -> None:
        iid = doc["_id"]
        removed = await self.store.plans.delete_many({"instance_id": iid})
        if removed.deleted_count:
            events.plans_changed.fire()
        abandoned = await self._stop_jobs(doc)

        await self._delete_failed_uploads(doc)
        kept_files = 0
        if doc.get("delete_backups_on_deprovision"):
            await self._delete_stored_backups(doc)
        else:
            kept_files = await self.store.restore_points.count_documents({"instance_id": iid})

        await self.ops.heartbeat(doc, "Removing the instance's records.")
        for coll in ("restore_points", "jobs", "plans", "destinations", "bindings"):
            await getattr(self.store, coll).delete_many({"instance_id": iid})
        description = "Deleted."
        if kept_files:
            description += (
                f" The files of {kept_files} restore point(s) were kept in their storage."
            )
        if abandoned:
            description += f" {abandoned} running job(s) were abandoned."
        if await self.ops.bury(doc, description, unset={"secrets": ""}):
            log.info("instance_deprovisioned", kept_files=kept_files, abandoned=abandoned)

    async def _stop_jobs(self, doc: Document) -> int:
        """Cancel the queued jobs, ask the running ones to stop and wait for them until
        ``job_wait`` after the request; returns how many were abandoned then."""
        iid, jobs = doc["_id"], self.store.jobs
        await self.ops.heartbeat(doc, "Cancelling the instance's jobs.")
        started: datetime = doc["last_operation"]["started_at"]
        deadline = started + timedelta(seconds=self.job_wait)
        while True:
            now = self.clock.now()
            await jobs.update_many(
                {"instance_id": iid, "status": "QUEUED"},
                {
                    "$set": {
                        "status": "CANCELLED",
                        "cancel_requested": True,
                        "reason": "Cancelled: the service instance is being deleted.",
                        "ended_at": now,
                    },
                    "$inc": {"version": 1},
                },
            )
            asked = await jobs.update_many(
                {"instance_id": iid, "status": "RUNNING", "cancel_requested": {"$ne": True}},
                {"$set": {"cancel_requested": True}, "$inc": {"version": 1}},
            )
            if asked.modified_count:
                events.jobs_queued.fire()  # wakes this replica's runner to act on it
            running = await jobs.count_documents({"instance_id": iid, "status": "RUNNING"})
            if not running:
                return 0
            if now >= deadline:
                gave_up = await jobs.update_many(
                    {"instance_id": iid, "status": "RUNNING"},
                    {
                        "$set": {
                            "status": "CANCELLED",
                            "reason": (
                                "Abandoned: the service instance was deleted while this job "
                                f"ran and it did not stop within {human_duration(self.job_wait)}"
                                "; the agent may still finish it on its own."
                            ),
                            "ended_at": now,
                        },
                        "$inc": {"version": 1},
                    },
                )
                return gave_up.modified_count
            await self.ops.heartbeat(doc, f"Waiting for {running} running job(s) to stop.")
            await self.clock.sleep(min(1.0, max((deadline - now).total_seconds(), 0.0)))

    async def _delete_stored_backups(self, doc: Document) -> None:
        iid = doc["_id"]
        points = await self.store.restore_points.find({"instance_id": iid}, {"_id": 1}).to_list()
        total = len(points)
        for n, point in enumerate(points, 1):
            progress = f"Deleting stored backups ({n} of {total})"

            async def delete(point_id: str = point["_id"]) -> None:
                try:
                    await restore_points.delete(
                        self.store, self.box, iid, point_id, opener=self.opener
                    )
                except NotFound:
                    pass
                except Conflict as exc:
                    # Its destination is gone: nothing can reach those files any more.
                    log.warning("restore_point_files_unreachable", point=point_id, code=exc.code)

            await self._with_storage_retries(
                doc,
                progress,
                delete,
                f"Stored backups could not be deleted: {{error}} {total - n + 1} restore "
                "point(s) remain; delete the instance again to retry.",
            )

    async def _delete_failed_uploads(self, doc: Document) -> None:
        """Files that failed or cancelled backups uploaded are not backups: whatever was chosen
        for the backups, they go with the instance, because the job records about to be deleted
        are the only trace of them (see backup/retention.py, ``pending_deletes``)."""
        iid = doc["_id"]
        sweeper = RetentionSweeper(self.store, self.box, clock=self.clock, opener=self.opener)
        jobs = await self.store.jobs.find(
            {"instance_id": iid, "pending_deletes.0": {"$exists": True}}, {"pending_deletes": 1}
        ).to_list()
        for n, job in enumerate(jobs, 1):

            async def delete(job_id: str = job["_id"]) -> None:
                current = await self.store.jobs.find_one({"_id": job_id}, {"pending_deletes": 1})
                result = await sweeper.delete_job_files(
                    job_id, (current or {}).get("pending_deletes") or []
                )
                if result.errors:
                    raise _StorageRetry(result.errors[0])

            await self._with_storage_retries(
                doc,
                f"Deleting files of failed backups ({n} of {len(jobs)})",
                delete,
                "Files left by failed backups could not be deleted: {error}; delete the "
                "instance again to retry.",
            )

    async def _with_storage_retries(
        self,
        doc: Document,
        progress: str,
        attempt: Callable[[], Awaitable[None]],
        failure: str,
    ) -> None:
        """Run ``attempt`` until it succeeds, retrying a storage failure with a doubling delay
        up to ``storage_attempts``; then fail the operation with ``failure`` (``{error}`` is
        the last failure, in words)."""
        attempts, delay = 0, self.storage_retry_delay
        await self.ops.heartbeat(doc, progress + ".")
        while True:
            try:
                await attempt()
                return
            except (BackupError, _StorageRetry) as exc:
                attempts += 1
                if attempts >= self.storage_attempts:
                    raise OperationFailed(failure.format(error=_describe(exc))) from None
                await self.ops.heartbeat(doc, f"{progress}: retrying.")
                await self.clock.sleep(delay)
                delay *= 2
