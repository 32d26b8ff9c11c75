"""Job documents: backups and restores, queued here (manual triggers) or by the scheduler,
claimed and run by the job runner (``backup.runner``). Fields follow docs/data-model.md.

QUEUED -> RUNNING -> SUCCEEDED|FAILED|CANCELLED; QUEUED -> CANCELLED; MISSED is created
directly. A RUNNING job is cancelled by setting ``cancel_requested``; the runner ends it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from pymongo.errors import DuplicateKeyError

from backup.database import SCHEMA_VERSION, Database, Document
from backup.errors import Conflict, InvalidInput, NotFound
from backup.pagination import Page, now, paginate


class JobType(StrEnum):
    BACKUP = "BACKUP"
    RESTORE = "RESTORE"
    DRILL = "DRILL"  # a restore drill: a restore point proved restorable (backup/drill.py)


class Trigger(StrEnum):
    """Why a job exists: a plan's fire, a user's request, or a fire run late after downtime."""

    SCHEDULE = "SCHEDULE"
    MANUAL = "MANUAL"
    CATCH_UP = "CATCH_UP"


class JobStatus(StrEnum):
    """A job's (and an item's) state; docs/data-model.md draws the transitions."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    MISSED = "MISSED"


ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
FINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.MISSED)


class ClaimRefusal(StrEnum):
    """Why :func:`try_claim` did not claim a job."""

    BUSY = "busy"  # another job of its instance is RUNNING; the candidate still waits
    TAKEN = "taken"  # no longer as read: claimed by another replica, cancelled, or ended


class RestorePointState(StrEnum):
    """A restore point's state (``backup.restore_points``): defined beside the job enums,
    which ``restore_points`` uses, so that the two modules import one way."""

    AVAILABLE = "available"
    DELETING = "deleting"  # its files are being deleted; the record goes last


class DrillOutcome(StrEnum):
    """A restore drill's outcome, on its job and on the restore point it proved
    (``last_drill``)."""

    PASSED = "passed"
    FAILED = "failed"


class DrillKind(StrEnum):
    """Who ran a drill: our agent (download, decrypt, checksum, the DBA's verify script) or
    the manager, for an agent without the ``verify`` capability (download and checksum)."""

    AGENT = "agent"
    MANAGER = "manager"


def new_item(name: str, **fields: Any) -> Document:
    item: Document = {
        "name": name,
        "status": JobStatus.QUEUED,
        "agent_job_id": None,
        "filename": None,
        "key": None,
        "size": None,
        "stored_size": None,
        "checksum": None,
        "logs": {},
        "error": None,
        "started_at": None,
        "ended_at": None,
    }
    item.update(fields)
    return item


def new_job(
    *,
    instance_id: str,
    type: str,
    plan_id: str | None,
    destination_id: str,
    trigger: str,
    items: list[Document],
    compression: bool,
    encryption: dict[str, Any],
    scheduled_for: datetime | None = None,
    restore_point_id: str | None = None,
    status: str = JobStatus.QUEUED,
    reason: str | None = None,
) -> Document:
    """A complete job document, every field of the data model present."""
    at = now()
    final = status in FINAL
    return {
        "_id": uuid.uuid4().hex,
        "instance_id": instance_id,
        "type": type,
        "plan_id": plan_id,
        "destination_id": destination_id,
        "trigger": trigger,
        "scheduled_for": scheduled_for,
        "status": status,
        "reason": reason,
        "items": items,
        "restore_point_id": restore_point_id,
        "compression": compression,
        "encryption": encryption,
        "cancel_requested": False,
        "created_at": at,
        "started_at": None,
        "ended_at": at if final else None,
        "deadline_at": None,
        "lease_owner": None,
        "lease_expires_at": None,
        "attempts": 0,
        "version": 1,
        "schema_version": SCHEMA_VERSION,
    }


async def _refuse_if_active(store: Database, query: dict[str, Any], what: str) -> None:
    active = await store.jobs.find_one(
        {**query, "status": {"$in": list(ACTIVE)}}, {"_id": 1, "status": 1}
    )
    if active is not None:
        raise Conflict(
            f"{what} (job {active['_id']} is {active['status']}); wait for it to end or cancel it.",
            code="job_active",
        )


async def start_backup(store: Database, plan: Document, trigger: str = Trigger.MANUAL) -> Document:
    """Queue a backup of ``plan`` now (a plan runs one backup at a time)."""
    await _refuse_if_active(
        store,
        {"plan_id": plan["_id"], "type": JobType.BACKUP},
        "A backup of this plan is already under way",
    )
    job = new_job(
        instance_id=plan["instance_id"],
        type=JobType.BACKUP,
        plan_id=plan["_id"],
        destination_id=plan["destination_id"],
        trigger=trigger,
        items=[new_item(name) for name in plan["items"]],
        compression=plan["compression"],
        encryption={"enabled": bool((plan.get("encryption") or {}).get("enabled"))},
    )
    await store.jobs.insert_one(job)
    await store.plans.update_one({"_id": plan["_id"]}, {"$set": {"last_job_id": job["_id"]}})
    store.events.jobs_queued.fire()
    return job


async def start_restore(
    store: Database,
    point: Document,
    items: Sequence[str | tuple[str, str | None]] | None,
    *,
    target: Document | None = None,
) -> Document:
    """Queue a restore of ``point`` (all its items, or the ``items`` subset) into ``target``
    (an instance document; default: the point's own instance, the caller having checked that
    it may change it). An item is a name of the point, or (name, target item): the target
    instance's item to restore it into (default: the same name).

    The job belongs to the target instance, whose data it changes: it is listed there, runs
    on the target's agent with the target's database, and one restore at a time runs per
    target. A restore into another instance records ``source_instance_id``; the restore
    point stays with its source. A target item other than the source's own item must be one
    of the target's registered items."""
    if point.get("state") != RestorePointState.AVAILABLE:
        raise Conflict(
            "This restore point is being deleted and cannot be restored.",
            code="restore_point_deleting",
        )
    source_id = point["instance_id"]
    target_id = str(target["_id"]) if target is not None else source_id
    registered = set(target.get("items") or []) if target is not None else None
    stored = {i["name"]: i for i in point.get("items") or []}
    pairs = [
        (entry, None) if isinstance(entry, str) else entry
        for entry in (items if items is not None else list(stored))
    ]
    names = [name for name, _ in pairs]
    if not names:
        raise InvalidInput("Name at least one item to restore.", field="items")
    if len(set(names)) != len(names):
        raise InvalidInput("'items' lists an item twice.", field="items")
    missing = [n for n in names if n not in stored]
    if missing:
        raise InvalidInput(
            f"{missing[0]!r} is not in this restore point; it holds {', '.join(stored)}.",
            code="unknown_item",
            field="items",
        )
    targets = [into or name for name, into in pairs]
    if len(set(targets)) != len(targets):
        raise InvalidInput(
            "Two items would be restored into the same target item; name a different "
            "target for each.",
            field="items",
        )
    for name, dest in zip(names, targets, strict=True):
        # Restoring an item into itself on its own instance needs no registration (as
        # before targets existed: an item may have been unregistered since its backup);
        # anything else writes to a database the target's registration must name.
        if dest == name and target_id == source_id:
            continue
        if registered is None:
            own = await store.instances.find_one({"_id": target_id}, {"items": 1}) or {}
            registered = set(own.get("items") or [])
        if dest not in registered:
            known = ", ".join(sorted(registered)) or "none"
            raise InvalidInput(
                f"{dest!r} is not an item of the target instance (its items: {known}); "
                "restore only into a registered item.",
                code="unknown_item",
                field="items",
            )
    await _refuse_if_active(
        store,
        {"instance_id": target_id, "type": JobType.RESTORE},
        "A restore of this instance is already under way",
    )
    chosen = [stored[n] for n in names]
    job = new_job(
        instance_id=target_id,
        type=JobType.RESTORE,
        plan_id=point.get("plan_id"),
        destination_id=point["destination_id"],
        trigger=Trigger.MANUAL,
        items=[
            new_item(
                i["name"],
                target=dest,
                filename=i.get("filename"),
                key=i.get("key"),
                size=i.get("size"),
                stored_size=i.get("stored_size"),
                checksum=i.get("checksum"),
            )
            for i, dest in zip(chosen, targets, strict=True)
        ],
        compression=any(bool(i.get("compression")) for i in chosen),
        encryption={"enabled": any(bool(i.get("encryption")) for i in chosen)},
        restore_point_id=point["_id"],
    )
    if target_id != source_id:
        job["source_instance_id"] = source_id
    await store.jobs.insert_one(job)
    store.events.jobs_queued.fire()
    return job


async def start_drill(
    store: Database,
    plan: Document,
    point: Document | None = None,
    *,
    trigger: str = Trigger.MANUAL,
) -> Document:
    """Queue a restore drill of ``point`` (default: the plan's newest available restore point
    when the drill starts). A plan runs one drill at a time."""
    if point is not None and point.get("state") != RestorePointState.AVAILABLE:
        raise Conflict(
            "This restore point is being deleted; a drill cannot prove it.",
            code="restore_point_deleting",
        )
    await _refuse_if_active(
        store,
        # the plan's instance's drills only: an imported point can name another's plan
        {"plan_id": plan["_id"], "instance_id": plan["instance_id"], "type": JobType.DRILL},
        "A drill of this plan is already under way",
    )
    job = new_drill_job(plan, point, trigger=trigger)
    await store.jobs.insert_one(job)
    store.events.jobs_queued.fire()
    return job


def new_drill_job(
    plan: Document, point: Document | None, *, trigger: str, drill_for: datetime | None = None
) -> Document:
    """A DRILL job of ``plan``: of ``point``, or (None) of the plan's newest available restore
    point, chosen when it starts. ``drill_for``: the scheduled drill fire it stands for."""
    job = new_job(
        instance_id=plan["instance_id"],
        type=JobType.DRILL,
        plan_id=plan["_id"],
        destination_id=(point or plan)["destination_id"],
        trigger=trigger,
        items=[new_item(i["name"], target=i["name"]) for i in (point or {}).get("items") or []],
        compression=False,
        encryption={"enabled": False},
        restore_point_id=point["_id"] if point is not None else None,
    )
    job["drill_for"] = drill_for
    job["drill"] = None
    return job


async def get(store: Database, instance_id: str, job_id: str) -> Document:
    doc = await store.jobs.find_one({"_id": job_id, "instance_id": instance_id})
    if doc is None:
        raise NotFound(f"This instance has no job {job_id!r}.", code="job_not_found")
    return doc


async def list_page(
    store: Database,
    instance_id: str,
    *,
    type: str | None = None,
    status: str | None = None,
    plan_id: str | None = None,
    limit: int,
    cursor: str | None,
) -> Page:
    query: dict[str, Any] = {"instance_id": instance_id}
    if type:
        query["type"] = type
    if status:
        query["status"] = status
    if plan_id:
        query["plan_id"] = plan_id
    return await paginate(
        store.jobs, query, limit=limit, cursor=cursor, projection={"items.logs": 0}
    )


async def last_jobs(store: Database, job_ids: list[str]) -> dict[str, Document]:
    ids = [j for j in job_ids if j]
    if not ids:
        return {}
    docs = await store.jobs.find(
        {"_id": {"$in": ids}}, {"status": 1, "ended_at": 1, "created_at": 1}
    ).to_list()
    return {d["_id"]: d for d in docs}


async def cancel(store: Database, instance_id: str, job_id: str) -> Document:
    """Cancel a queued job at once, or ask the runner to stop a running one."""
    for _ in range(3):
        job = await get(store, instance_id, job_id)
        if job["status"] == JobStatus.QUEUED:
            result = await store.jobs.update_one(
                {"_id": job_id, "status": JobStatus.QUEUED},
                {
                    "$set": {
                        "status": JobStatus.CANCELLED,
                        "cancel_requested": True,
                        "reason": "Cancelled by a user before it started.",
                        "ended_at": now(),
                    },
                    "$inc": {"version": 1},
                },
            )
        elif job["status"] == JobStatus.RUNNING:
            result = await store.jobs.update_one(
                {"_id": job_id, "status": JobStatus.RUNNING},
                {"$set": {"cancel_requested": True}, "$inc": {"version": 1}},
            )
        else:
            raise Conflict(
                f"Job {job_id} has already ended ({job['status']}); there is nothing to cancel.",
                code="job_finished",
            )
        if result.matched_count == 1:
            store.events.jobs_queued.fire()
            return await get(store, instance_id, job_id)
    raise Conflict("The job keeps changing; retry.", code="concurrent_update")


# --------------------------------------------------------------------------- running jobs
#
# The job runner's side. Every replica may claim any job; the database decides who wins:
#
# - Claiming is a compare-and-set ``update_one`` (QUEUED -> RUNNING, or a RUNNING job whose
#   lease expired -> a new owner). ``attempts`` goes up by one at every claim and is the
#   fencing token: every later write of the holder names (owner, attempts), so a replica that
#   lost its lease (paused, partitioned, presumed dead) can no longer change the job.
# - At most one job per instance is RUNNING: the unique partial index
#   ``one_running_job_per_instance`` refuses the second claim (DuplicateKeyError), so two
#   replicas claiming two jobs of one instance at the same moment cannot both win. A RUNNING
#   job with an expired lease still holds its instance until it is taken over and ended.
# - The holder renews its lease; a replica that dies stops renewing and another takes over.


@dataclass(frozen=True, slots=True)
class Lease:
    """A claim on a RUNNING job: its holder and the fencing token of that claim."""

    job_id: str
    owner: str
    token: int

    def filter(self) -> dict[str, Any]:
        return {
            "_id": self.job_id,
            "status": JobStatus.RUNNING,
            "lease_owner": self.owner,
            "attempts": self.token,
        }


class LeaseLost(Exception):
    """The job was taken over (or ended) by someone else: stop driving it."""


def _expired(at: datetime) -> dict[str, Any]:
    # Also matches a missing or null expiry (a RUNNING job nobody holds). One condition,
    # not an $or: several times cheaper on the embedded server.
    return {"lease_expires_at": {"$not": {"$gt": at}}}


_CANDIDATE_FIELDS = {
    "_id": 1,
    "instance_id": 1,
    "status": 1,
    "attempts": 1,
    "created_at": 1,
    "type": 1,
    "trigger": 1,
    "scheduled_for": 1,
    "lease_expires_at": 1,
}


_NEVER = datetime(1970, 1, 1, tzinfo=UTC)  # a lease without expiry: expired


def _queue_order(doc: Document) -> tuple[datetime, str]:
    return doc["created_at"], doc["_id"]


class QueueView:
    """One replica's view of the queue, kept between claim passes: which jobs to try to
    claim next, in the order they should run.

    Every pass reads the RUNNING jobs (few: at most the replicas' concurrency): those whose
    holder stopped renewing come first, and the instances of the others are busy. The QUEUED
    jobs are not read at every pass: the embedded database reads every match of a query
    before it applies a limit, so that read grows with the queue (docs/jobs.md), and back to
    back it would take the database from the scheduler. The
    view reads the whole queue once every ``refresh_seconds`` (less often if that read
    would then take more than ``full_read_share`` of the time), and in between, when
    asked, only the jobs queued since the newest it has seen, less ``overlap_seconds``
    (jobs written meanwhile with an older clock: another replica's, or a batch whose write
    took that long), an index range.

    An entry goes stale when another replica claims its job or the job is cancelled: the
    claim's compare-and-set then fails and :meth:`forget` drops it. A job that no partial
    read caught is found by the next full read: late, never lost.
    """

    def __init__(
        self,
        *,
        refresh_seconds: float = 30.0,
        overlap_seconds: float = 5.0,
        full_read_share: float = 0.01,
    ) -> None:
        self.refresh_seconds = refresh_seconds
        self.overlap_seconds = overlap_seconds
        self.full_read_share = full_read_share
        self.read_seconds = 0.0  # the last pass's reads, for the runner's claim spacing
        self._queued: dict[str, Document] = {}
        self._order: list[Document] | None = []  # None: to sort again
        self._newest: datetime | None = None
        self._full_at: datetime | None = None
        self._full_seconds = 0.0

    def forget(self, job_id: str) -> None:
        """The job is no longer QUEUED (claimed, here or by another replica, or cancelled).
        Its place in the sorted order stays until the order is next rebuilt (new jobs, a
        full read): sorting the whole queue again at every claim would cost more."""
        self._queued.pop(job_id, None)

    def full_read_due(self, at: datetime) -> bool:
        if self._full_at is None:
            return True
        period = max(self.refresh_seconds, self._full_seconds / self.full_read_share)
        return (at - self._full_at).total_seconds() >= period

    async def candidates(
        self, store: Database, at: datetime, *, limit: int, new_jobs: bool = True
    ) -> list[Document]:
        """Up to ``limit`` jobs to try: RUNNING jobs whose lease expired (oldest expiry
        first: they hold their instance), then QUEUED jobs, oldest first, one per instance
        and none of an instance with a RUNNING job (the index would refuse it anyway).
        ``new_jobs``: jobs may have been queued since the last pass (else the queue is
        read only when a full read is due)."""
        started = time.monotonic()
        running = await store.jobs.find({"status": JobStatus.RUNNING}, _CANDIDATE_FIELDS).to_list()
        busy = {d["instance_id"] for d in running}
        # A RUNNING job nobody holds (no expiry) or whose holder stopped renewing.
        orphans = sorted(
            (d for d in running if (d.get("lease_expires_at") or _NEVER) <= at),
            key=lambda d: d.get("lease_expires_at") or _NEVER,
        )[:limit]
        if self.full_read_due(at):
            full_started = time.monotonic()
            docs = await store.jobs.find({"status": JobStatus.QUEUED}, _CANDIDATE_FIELDS).to_list()
            self._full_seconds = time.monotonic() - full_started
            self._full_at = at
            self._queued = {d["_id"]: d for d in docs}
            self._order = None
            self._newest = max((d["created_at"] for d in docs), default=self._newest)
        elif new_jobs:
            query: dict[str, Any] = {"status": JobStatus.QUEUED}
            if self._newest is not None:
                since = self._newest - timedelta(seconds=self.overlap_seconds)
                query["created_at"] = {"$gte": since}
            for d in await store.jobs.find(query, _CANDIDATE_FIELDS).to_list():
                if d["_id"] not in self._queued:
                    self._queued[d["_id"]] = d
                    self._order = None
                if self._newest is None or d["created_at"] > self._newest:
                    self._newest = d["created_at"]
        self.read_seconds = time.monotonic() - started
        if self._order is None:
            self._order = sorted(self._queued.values(), key=_queue_order)
        queued: list[Document] = []
        seen: set[str] = set()
        for doc in self._order:
            if doc["_id"] not in self._queued:
                continue  # forgotten
            if doc["instance_id"] in busy or doc["instance_id"] in seen:
                continue
            seen.add(doc["instance_id"])  # an instance's oldest job goes first
            queued.append(doc)
            if len(queued) >= limit:
                break
        return orphans + queued


async def claimable(store: Database, at: datetime, *, limit: int) -> list[Document]:
    """Candidates to claim now, from a full read of the queue (see :class:`QueueView`,
    which the runner keeps between passes)."""
    return await QueueView().candidates(store, at, limit=limit)


async def try_claim(
    store: Database,
    candidate: Document,
    *,
    owner: str,
    at: datetime,
    lease_seconds: float,
    deadline_seconds: float,
) -> Lease | ClaimRefusal:
    """Claim ``candidate`` (from :func:`claimable`) for ``owner``: its :class:`Lease`, or
    why not (:class:`ClaimRefusal`)."""
    token = int(candidate.get("attempts") or 0) + 1
    expires = at + timedelta(seconds=lease_seconds)
    if candidate["status"] == JobStatus.QUEUED:
        query: dict[str, Any] = {"_id": candidate["_id"], "status": JobStatus.QUEUED}
        update: dict[str, Any] = {
            "$set": {
                "status": JobStatus.RUNNING,
                "started_at": at,
                "deadline_at": at + timedelta(seconds=deadline_seconds),
                "lease_owner": owner,
                "lease_expires_at": expires,
                "attempts": token,
            },
            "$inc": {"version": 1},
        }
    else:
        query = {
            "_id": candidate["_id"],
            "status": JobStatus.RUNNING,
            "attempts": token - 1,
            **_expired(at),
        }
        update = {
            "$set": {"lease_owner": owner, "lease_expires_at": expires, "attempts": token},
            "$inc": {"version": 1},
        }
    try:
        result = await store.jobs.update_one(query, update)
    except DuplicateKeyError:
        return ClaimRefusal.BUSY
    if result.modified_count != 1:
        return ClaimRefusal.TAKEN
    return Lease(candidate["_id"], owner, token)


async def claim(store: Database, candidate: Document, **options: Any) -> Lease | None:
    """:func:`try_claim` (same options), None when it was refused."""
    result = await try_claim(store, candidate, **options)
    return result if isinstance(result, Lease) else None


async def renew(store: Database, lease: Lease, *, at: datetime, lease_seconds: float) -> bool:
    """Extend the lease; False when it was lost (taken over or the job ended)."""
    result = await store.jobs.update_one(
        lease.filter(), {"$set": {"lease_expires_at": at + timedelta(seconds=lease_seconds)}}
    )
    return result.matched_count == 1


async def ended_under(store: Database, lease: Lease) -> bool:
    """Whether the job ended while ``lease`` held it (only its holder can end a running job:
    :func:`finish` is fenced on the lease's token, which a takeover increments)."""
    doc = await store.jobs.find_one(
        {"_id": lease.job_id, "attempts": lease.token, "status": {"$in": list(FINAL)}}, {"_id": 1}
    )
    return doc is not None


async def holds(store: Database, lease: Lease) -> bool:
    """Whether ``lease`` still holds its job (a read: it fences nothing by itself)."""
    return await store.jobs.find_one(lease.filter(), {"_id": 1}) is not None


async def release(store: Database, lease: Lease, *, at: datetime) -> bool:
    """Give the job up without ending it: its lease expires now, so any replica (this one
    after a restart too) resumes it at once."""
    result = await store.jobs.update_one(lease.filter(), {"$set": {"lease_expires_at": at}})
    return result.matched_count == 1


async def update_held(
    store: Database,
    lease: Lease,
    fields: dict[str, Any],
    *,
    unset: list[str] | None = None,
) -> None:
    """Write ``fields`` to a job this lease holds, or raise :class:`LeaseLost`."""
    update: dict[str, Any] = {"$set": fields, "$inc": {"version": 1}}
    if unset:
        update["$unset"] = {k: "" for k in unset}
    result = await store.jobs.update_one(lease.filter(), update)
    if result.matched_count != 1:
        raise LeaseLost(lease.job_id)


async def finish(
    store: Database,
    lease: Lease,
    status: str,
    reason: str | None,
    *,
    at: datetime,
    fields: dict[str, Any] | None = None,
) -> None:
    """End a held job in a final state (with the lease cleared), or raise LeaseLost."""
    if status not in FINAL:
        raise ValueError(f"{status} is not a final state")
    await update_held(
        store,
        lease,
        {
            **(fields or {}),
            "status": status,
            "reason": reason,
            "ended_at": at,
            "lease_owner": None,
            "lease_expires_at": None,
        },
    )


async def cancel_requested(store: Database, job_id: str) -> bool:
    doc = await store.jobs.find_one({"_id": job_id}, {"cancel_requested": 1})
    return bool(doc and doc.get("cancel_requested"))


async def prune_history(store: Database, *, ended_before: datetime, batch: int = 1000) -> int:
    """Delete the records of jobs that ended before ``ended_before``; answers how many.

    Without this the history grows with every fire, forever (an hourly plan writes 8,760
    jobs a year), and so does the cost of listing an instance's jobs. Kept whatever their
    age: active jobs, each plan's last job (its plan shows it), and failed jobs whose
    uploaded files still wait to be deleted (``pending_deletes``: the record is what leads
    the retention sweep to them). Restore points do not depend on their job's record."""
    last = {
        d["last_job_id"]
        for d in await store.plans.find(
            {"last_job_id": {"$type": "string"}}, {"last_job_id": 1}
        ).to_list()
    }
    query: dict[str, Any] = {
        "_id": {"$nin": sorted(last)},
        "status": {"$in": list(FINAL)},
        # created_at bounds the scan on the (status, created_at) index (a job is created
        # before it ends); an index of its own for ended_at would cost every job write.
        "created_at": {"$lt": ended_before},
        "ended_at": {"$lt": ended_before},
        "pending_deletes.destination_id": {"$exists": False},
    }
    deleted = 0
    while True:
        ids = [d["_id"] for d in await store.jobs.find(query, {"_id": 1}).limit(batch).to_list()]
        if not ids:
            return deleted
        # The query again, so that a job changed since it was read is left alone.
        result = await store.jobs.delete_many({**query, "_id": {"$in": ids}})
        deleted += result.deleted_count
        if len(ids) < batch:
            return deleted
