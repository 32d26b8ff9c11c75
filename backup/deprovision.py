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

The steps also run on their own, outside an operation and on an instance that stays
registered (:class:`InstanceCleanup`), for brokers that clean up an instance's backups in
three calls of their own before they delete it (``broker/compat.py``): stopping its jobs,
removing its plans, and removing its storage (restore points as the instance says, then
the job records and the destinations).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog

from backup import destinations, orphans, plans, webhooks
from backup.agent_client import AgentJobKind
from backup.clock import Clock
from backup.database import Database, Document
from backup.errors import BackupError, NotFound, StorageUnavailable
from backup.job_run import after_agent
from backup.jobs import JobStatus, JobType
from backup.operations import InstanceState, OperationFailed, Operations, human_duration
from backup.retention import RetentionSweeper
from backup.secrets import SecretBox
from storage import ObjectStore

log = structlog.get_logger(__name__)

StoreOpener = Callable[[Any], ObjectStore]
Progress = Callable[[str], Awaitable[None]]


class _StorageRetry(Exception):
    """A storage failure worth retrying; its message says what failed, in words."""


def _describe(exc: Exception) -> str:
    return exc.description if isinstance(exc, BackupError) else str(exc)


async def nothing_to_wait_for(store: Database, doc: Document) -> bool:
    """Whether deleting the instance can be done within the request: no running job, no
    file of a failed backup to delete, and no stored backup to delete."""
    running = await store.jobs.find_one(
        {"instance_id": doc["_id"], "status": JobStatus.RUNNING}, {"_id": 1}
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


async def _quietly(_: str) -> None:
    return None


@dataclass
class Steps:
    """The steps of a deprovision, each safe to repeat. ``progress`` is told where a step is
    (an operation's heartbeat, which also stops the work when its lease is lost); a storage
    failure that outlasts the retries raises ``failure(description)``."""

    db: Database
    box: SecretBox
    clock: Clock
    opener: StoreOpener
    storage_attempts: int  # per restore point (or job's leftovers), before the step fails
    storage_retry_delay: float  # doubled after each attempt
    progress: Progress = _quietly
    failure: Callable[[str], Exception] = OperationFailed
    retry: str = "delete the instance again to retry."  # how the caller repeats the step

    async def remove_plans(self, iid: str) -> int:
        """Delete the instance's plans (nothing new is scheduled; their queued jobs are
        cancelled); returns how many were removed."""
        removed = 0
        for plan in await self.db.plans.find({"instance_id": iid}, {"_id": 1}).to_list():
            try:
                await plans.delete(self.db, iid, plan["_id"])
            except NotFound:
                continue  # removed concurrently: the same outcome
            removed += 1
        return removed

    async def stop_jobs(self, iid: str, deadline: datetime, job_wait: float) -> int:
        """Cancel the queued jobs, ask the running ones to stop and wait for them until
        ``deadline``; returns how many were abandoned then (marked CANCELLED: their agent may
        still finish them on its own). ``job_wait`` is how long that was, for the reason."""
        jobs = self.db.jobs
        # Also restores from its restore points into other instances (recorded under their
        # target): they keep its points, whose files may be deleted next, in use.
        mine: dict[str, Any] = {"$or": [{"instance_id": iid}, {"source_instance_id": iid}]}
        await self.progress("Cancelling the instance's jobs.")
        while True:
            now = self.clock.now()
            for query, why in (
                ({"instance_id": iid}, "the service instance is being deleted"),
                ({"source_instance_id": iid}, "the instance of its restore point is being deleted"),
            ):
                await jobs.update_many(
                    {**query, "status": JobStatus.QUEUED},
                    {
                        "$set": {
                            "status": JobStatus.CANCELLED,
                            "cancel_requested": True,
                            "reason": f"Cancelled: {why}.",
                            "ended_at": now,
                        },
                        "$inc": {"version": 1},
                    },
                )
            asked = await jobs.update_many(
                {**mine, "status": JobStatus.RUNNING, "cancel_requested": {"$ne": True}},
                {"$set": {"cancel_requested": True}, "$inc": {"version": 1}},
            )
            if asked.modified_count:
                self.db.events.jobs_queued.fire()  # wakes this replica's runner to act on it
            running = await jobs.count_documents({**mine, "status": JobStatus.RUNNING})
            if not running:
                return 0
            if now >= deadline:
                abandoned = 0
                running_jobs = await jobs.find(
                    {**mine, "status": JobStatus.RUNNING}, {"type": 1, "agent": 1}
                ).to_list()
                for job in running_jobs:
                    # The reason says what the job's agent does next (by its kind).
                    kind = (job.get("agent") or {}).get("kind")
                    what = (
                        AgentJobKind.RESTORE
                        if job.get("type") == JobType.RESTORE
                        else AgentJobKind.BACKUP
                    )
                    gave_up = await jobs.update_one(
                        {"_id": job["_id"], "status": JobStatus.RUNNING},
                        {
                            "$set": {
                                "status": JobStatus.CANCELLED,
                                "reason": (
                                    "Abandoned: the service instance was deleted while this "
                                    "job ran and it did not stop within "
                                    f"{human_duration(job_wait)}; "
                                    + after_agent(kind, what, "abandoned")
                                    + "."
                                ),
                                "ended_at": now,
                            },
                            "$inc": {"version": 1},
                        },
                    )
                    abandoned += gave_up.modified_count
                return abandoned
            await self.progress(f"Waiting for {running} running job(s) to stop.")
            await self.clock.sleep(min(1.0, max((deadline - now).total_seconds(), 0.0)))

    async def delete_stored_backups(self, iid: str) -> orphans.ShredResult:
        """Crypto-shred the instance's restore points (pinned ones excepted): their keys are
        destroyed first, in one committed write, then their files deleted, each point retried
        up to ``storage_attempts`` times. Files that still could not be deleted are left to the
        retention sweep on the keyless records (state ``deleting``): the data is unreadable
        already, so they no longer hold the deletion up; the result names them."""
        await self.progress("Destroying the encryption keys of the stored backups.")
        result, points = await orphans.destroy_keys(
            self.db,
            self.box,
            {"instance_id": iid, "shredded_at": {"$exists": False}},
            at=self.clock.now(),
        )
        # Points shredded by an earlier, interrupted run of this step: their files are next.
        points += await self.db.restore_points.find(
            {
                "instance_id": iid,
                "shredded_at": {"$exists": True},
                "_id": {"$nin": [p["_id"] for p in points]},
            }
        ).to_list()
        total = len(points)
        for n, point in enumerate(points, 1):
            attempts, delay = 0, self.storage_retry_delay
            await self.progress(f"Deleting stored backups ({n} of {total}).")
            while True:
                done = await orphans.delete_files(self.db, self.box, [point], opener=self.opener)
                attempts += 1
                if not done.remaining or attempts >= self.storage_attempts:
                    result.add(done)
                    break
                await self.progress(f"Deleting stored backups ({n} of {total}): retrying.")
                await self.clock.sleep(delay)
                delay *= 2
        return result

    async def delete_failed_uploads(self, iid: str) -> None:
        """Files that failed or cancelled backups uploaded are not backups: whatever was chosen
        for the backups, they go with the instance, because the job records about to be deleted
        are the only trace of them (see backup/retention.py, ``pending_deletes``)."""
        sweeper = RetentionSweeper(self.db, self.box, clock=self.clock, opener=self.opener)
        jobs = await self.db.jobs.find(
            {"instance_id": iid, "pending_deletes.0": {"$exists": True}}, {"pending_deletes": 1}
        ).to_list()
        for n, job in enumerate(jobs, 1):

            async def delete(job_id: str = job["_id"]) -> None:
                current = await self.db.jobs.find_one({"_id": job_id}, {"pending_deletes": 1})
                result = await sweeper.delete_job_files(
                    job_id, (current or {}).get("pending_deletes") or []
                )
                if result.errors:
                    raise _StorageRetry(result.errors[0])

            await self._with_storage_retries(
                f"Deleting files of failed backups ({n} of {len(jobs)})",
                delete,
                "Files left by failed backups could not be deleted: {error}; {retry}",
            )

    async def _with_storage_retries(
        self, progress: str, attempt: Callable[[], Awaitable[None]], failure: str
    ) -> None:
        """Run ``attempt`` until it succeeds, retrying a storage failure with a doubling delay
        up to ``storage_attempts``; then raise ``self.failure`` with ``failure`` filled in
        (``{error}``: the last failure, in words; ``{retry}``: how to repeat the step)."""
        attempts, delay = 0, self.storage_retry_delay
        await self.progress(progress + ".")
        while True:
            try:
                await attempt()
                return
            except (BackupError, _StorageRetry) as exc:
                attempts += 1
                if attempts >= self.storage_attempts:
                    raise self.failure(
                        failure.format(error=_describe(exc), retry=self.retry)
                    ) from None
                await self.progress(f"{progress}: retrying.")
                await self.clock.sleep(delay)
                delay *= 2


@dataclass
class Deprovision:
    """One run of a deprovision operation on ``doc`` (as read when the worker claimed it)."""

    db: Database
    box: SecretBox
    ops: Operations
    clock: Clock
    opener: StoreOpener
    job_wait: float  # how long running jobs are waited for, from the request
    storage_attempts: int  # per restore point (or job's leftovers), before the operation fails
    storage_retry_delay: float  # doubled after each attempt

    async def run(self, doc: Document) -> None:
        iid = doc["_id"]

        async def heartbeat(description: str) -> None:
            await self.ops.heartbeat(doc, description)

        steps = Steps(
            self.db,
            self.box,
            self.clock,
            self.opener,
            self.storage_attempts,
            self.storage_retry_delay,
            progress=heartbeat,
        )
        await steps.remove_plans(iid)
        started: datetime = doc["last_operation"]["started_at"]
        deadline = started + timedelta(seconds=self.job_wait)
        abandoned = await steps.stop_jobs(iid, deadline, self.job_wait)

        await steps.delete_failed_uploads(iid)
        shred = orphans.ShredResult()
        if doc.get("delete_backups_on_deprovision"):
            shred = await steps.delete_stored_backups(iid)
        # What is left is kept: points not to be deleted, pinned ones, and the keyless records
        # of shredded points whose files the retention sweep still has to delete.
        pinned = await self.db.restore_points.count_documents({"instance_id": iid, "pinned": True})
        kept_points = await self.db.restore_points.count_documents(
            {"instance_id": iid, "shredded_at": {"$exists": False}}
        )
        await orphans.keep(self.db, iid, self.clock.now())

        await self.ops.heartbeat(doc, "Removing the instance's records.")
        for coll in ("restore_points", "jobs", "plans", "destinations", "bindings"):
            await getattr(self.db, coll).delete_many({"instance_id": iid})
        # Its webhooks go with it, and with them the deliveries not yet sent: nobody may be
        # told of an instance that no longer exists, at an address its tenant chose.
        await webhooks.delete_all(self.db, iid)
        description = "Deleted."
        if kept_points:
            description += (
                f" {kept_points} restore point(s) were kept, with their files and encryption "
                "keys, as orphaned restore points that an operator can restore into another "
                "instance or delete; they expire by their retention."
            )
            if pinned and doc.get("delete_backups_on_deprovision"):
                description += f" {pinned} of them are pinned."
        if shred.describe():
            description += " " + shred.describe()
        if abandoned:
            description += f" {abandoned} running job(s) were abandoned."
        if await self.ops.bury(doc, description, unset={"secrets": ""}):
            log.info(
                "instance_deprovisioned",
                kept_points=kept_points,
                shredded=len(shred.shredded),
                files_left=len(shred.remaining_files),
                abandoned=abandoned,
            )


@dataclass
class CleanupResult:
    """What one cleanup step did."""

    stopped_jobs: int = 0  # queued jobs cancelled and running ones stopped
    abandoned_jobs: int = 0  # running jobs that did not stop in time
    plans: int = 0
    deleted_points: int = 0  # restore points deleted with their files
    kept_points: int = 0  # restore points whose files were kept in their storage
    destinations: int = 0


@dataclass
class InstanceCleanup:
    """The deprovision's steps for one instance that stays registered, each a call of its own,
    each safe to repeat and a no-op for an unknown or deleted instance. Nothing here waits
    longer than ``job_wait`` for a running job (the caller is waiting for an answer), and a
    storage failure that outlasts the retries is
    :class:`~backup.errors.StorageUnavailable` with nothing lost: repeating the call resumes.

    Restore points follow the instance's ``delete_backups_on_deprovision`` exactly as in a
    deprovision: deleted with their files when it is true; when it is false, their files stay
    in the bucket or container and their records go with the destinations that address them,
    so no restore point is ever left pointing at a destination that no longer exists.
    """

    db: Database
    box: SecretBox
    clock: Clock
    opener: StoreOpener
    job_wait: float
    storage_attempts: int = 4
    storage_retry_delay: float = 1.0

    def _steps(self) -> Steps:
        return Steps(
            self.db,
            self.box,
            self.clock,
            self.opener,
            self.storage_attempts,
            self.storage_retry_delay,
            failure=StorageUnavailable,
            retry="repeat the request to retry.",
        )

    async def _instance(self, iid: str) -> Document | None:
        doc = await self.db.instances.find_one(
            {"_id": iid}, {"state": 1, "delete_backups_on_deprovision": 1}
        )
        return None if doc is None or doc.get("state") == InstanceState.DELETED else doc

    async def stop_jobs(self, iid: str) -> CleanupResult:
        """Queued jobs cancelled, running ones asked to stop and waited for up to
        ``job_wait``, then abandoned; the job records stay until :meth:`remove_storage`
        (the files of failed backups they list are deleted from the destinations first)."""
        if await self._instance(iid) is None:
            return CleanupResult()
        active = await self.db.jobs.count_documents(
            {
                "$or": [{"instance_id": iid}, {"source_instance_id": iid}],
                "status": {"$in": [JobStatus.QUEUED, JobStatus.RUNNING]},
            }
        )
        deadline = self.clock.now() + timedelta(seconds=self.job_wait)
        abandoned = await self._steps().stop_jobs(iid, deadline, self.job_wait)
        result = CleanupResult(stopped_jobs=active - abandoned, abandoned_jobs=abandoned)
        log.info("instance_jobs_stopped", instance_id=iid, **_counts(result))
        return result

    async def remove_plans(self, iid: str) -> CleanupResult:
        """The instance's plans deleted: nothing new is scheduled, their queued jobs are
        cancelled. Restore points stay (they outlive their plan)."""
        if await self._instance(iid) is None:
            return CleanupResult()
        result = CleanupResult(plans=await self._steps().remove_plans(iid))
        log.info("instance_plans_removed", instance_id=iid, **_counts(result))
        return result

    async def remove_storage(self, iid: str) -> CleanupResult:
        """Everything that addresses the instance's destinations, then the destinations: jobs
        stopped again (one may have started since), the files of failed backups deleted, the
        restore points deleted or their files kept as the instance says, the job records
        removed, and each destination deleted (:func:`backup.destinations.delete`, whose
        checks then find nothing in use)."""
        doc = await self._instance(iid)
        if doc is None:
            return CleanupResult()
        steps = self._steps()
        deadline = self.clock.now() + timedelta(seconds=self.job_wait)
        result = CleanupResult(abandoned_jobs=await steps.stop_jobs(iid, deadline, self.job_wait))
        await steps.delete_failed_uploads(iid)
        if doc.get("delete_backups_on_deprovision"):
            shred = await steps.delete_stored_backups(iid)
            result.deleted_points = len(shred.deleted)
            if shred.remaining:
                # The caller waits for an answer and repeats the call: the keys are gone
                # already, the files are tried again then (the shredded points stay).
                raise StorageUnavailable(
                    f"Stored backups could not be deleted ({shred.errors[0]}); "
                    f"{len(shred.remaining)} restore point(s) remain; repeat the request to "
                    f"retry. {shred.describe()}"
                )
        # As a deprovision does: the points not deleted (kept, pinned, or shredded with files
        # left for the sweep) become orphaned with the destinations they are stored in.
        result.kept_points = await orphans.keep(self.db, iid, self.clock.now())
        await self.db.jobs.delete_many(
            {"instance_id": iid, "status": {"$nin": [JobStatus.QUEUED, JobStatus.RUNNING]}}
        )
        for dest in await self.db.destinations.find({"instance_id": iid}, {"_id": 1}).to_list():
            try:
                await destinations.delete(self.db, iid, dest["_id"])
            except NotFound:
                continue
            result.destinations += 1
        log.info("instance_storage_removed", instance_id=iid, **_counts(result))
        return result


def _counts(result: CleanupResult) -> dict[str, int]:
    return {k: v for k, v in vars(result).items() if v}
