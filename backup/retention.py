"""Retention: which restore points a plan keeps, and the sweep that deletes the others.

Rules (per plan; a deleted plan's points follow the retention recorded with them):

- ``DAYS``/``HOURS``: a restore point expires ``period`` days/hours after it was created
  (``created_at``); it is deleted by the first sweep at or after that moment.
- ``FILES``: the newest ``period`` restore points are kept, older ones are deleted.
- Whatever the rule, the newest available restore point of a plan is never deleted by
  retention: a plan whose backups started failing keeps its last good backup.
- The plan's *current* retention applies to all its points (a longer period keeps old
  points longer); ``expires_at`` on each point is kept in step for display.

Deleting is files first, record last: the record is marked ``deleting`` (a compare-and-set,
so concurrent sweeps of several replicas delete each point once), the objects are deleted
through the storage package, then the record. A storage failure leaves the record in
``deleting`` and the next sweep retries it, whoever started it (a user's failed delete too).

The sweep also deletes the files that failed or cancelled backup jobs uploaded (recorded on
the job as ``pending_deletes`` when they could not be deleted at once), so that no file is
left in storage without a record that leads to it.

Last, it deletes the records of jobs that ended more than ``job_history_days`` ago (see
:func:`backup.jobs.prune_history` for what is kept whatever its age).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog

from backup import audit, jobs, object_lock, orphans, restore_points, webhooks
from backup.clock import Clock, SystemClock
from backup.database import Database, Document
from backup.errors import STORAGE_FAILURES, Conflict, storage_failure
from backup.jobs import RestorePointState
from backup.restore_points import StoreOpener
from backup.secrets import SecretBox
from storage import ObjectLocked, open_store

log = structlog.get_logger(__name__)


class RetentionStyle(StrEnum):
    """How a plan's retention counts by age or number (its ``style``)."""

    DAYS = "DAYS"
    HOURS = "HOURS"
    FILES = "FILES"


class KeepReason(StrEnum):
    """Why retention keeps a restore point (a point no reason keeps is deleted)."""

    PINNED = "pinned"
    """A user pinned it: no automatic deletion touches it."""
    LOCKED = "locked"
    """Its files are locked in storage (S3 Object Lock) until ``locked_until``, still ahead:
    deleted, if no other rule keeps it, by the first sweep after that date."""
    NEWEST = "newest"
    """The plan's newest available point: never deleted by retention."""
    AGE = "age"
    """DAYS/HOURS: younger than the period."""
    COUNT = "count"
    """FILES: among the newest ``period`` points."""
    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"
    YEARLY = "yearly"
    NO_RETENTION = "no_retention"
    """The plan has no retention: everything is kept."""
    MIN_GOOD = "min_good"
    """The rules above would leave fewer than ``min_good`` points: the newest of those they
    delete are kept until ``min_good`` remain."""


GFS_PERIODS: tuple[KeepReason, ...] = (
    KeepReason.DAILY,
    KeepReason.WEEKLY,
    KeepReason.MONTHLY,
    KeepReason.YEARLY,
)


def _period_key(reason: KeepReason, local: datetime) -> tuple[int, ...]:
    """The calendar period ``local`` (a time in the plan's zone) falls in."""
    if reason is KeepReason.DAILY:
        return (local.year, local.month, local.day)
    if reason is KeepReason.WEEKLY:
        iso = local.isocalendar()
        return (iso.year, iso.week)
    if reason is KeepReason.MONTHLY:
        return (local.year, local.month)
    return (local.year,)


def expires_at(retention: dict[str, Any] | None, created_at: datetime) -> datetime | None:
    """The earliest moment the age rule lets a point created at ``created_at`` go (None: no
    age rule). Other rules (GFS counts, ``min_good``, a pin) may keep it longer."""
    if not retention or retention.get("style") is None:
        return None
    period = int(retention["period"])
    if retention["style"] == RetentionStyle.DAYS:
        return created_at + timedelta(days=period)
    if retention["style"] == RetentionStyle.HOURS:
        return created_at + timedelta(hours=period)
    return None


def _newest_first(points: Sequence[Document]) -> list[Document]:
    return sorted(points, key=lambda p: (p["created_at"], str(p["_id"])), reverse=True)


def _zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


@dataclass(frozen=True)
class Decision:
    """What retention does with one point: kept for ``reasons``, or deleted (no reason)."""

    point: Document
    reasons: tuple[KeepReason, ...]

    @property
    def kept(self) -> bool:
        return bool(self.reasons)


def decide(
    points: Sequence[Document],
    retention: dict[str, Any] | None,
    now: datetime,
    timezone: str | None = "UTC",
) -> list[Decision]:
    """Retention's verdict on each of a plan's available restore points, newest first.

    A point is kept if ANY rule keeps it (like restic's ``forget --keep-*``): it is pinned,
    its files are locked in storage until a date still ahead, it is the newest, it is
    younger than a DAYS/HOURS period, it is among the newest ``period`` (FILES), or it is the
    newest point of one of the newest ``daily`` days, ``weekly`` ISO weeks, ``monthly``
    months or ``yearly`` years that have points (calendar periods in ``timezone``, the
    plan's). Last, ``min_good`` keeps the newest of the points
    the rules delete until at least ``min_good`` points stay. No retention keeps everything.
    Pure: the sweep and the preview both call it, so a preview is what the sweep deletes."""
    ordered = _newest_first(points)
    if not ordered:
        return []
    reasons: list[list[KeepReason]] = [[] for _ in ordered]
    if not retention:
        return [Decision(p, (KeepReason.NO_RETENTION,)) for p in ordered]
    zone = _zone(timezone)
    style = retention.get("style")
    for n, point in enumerate(ordered):
        if point.get("pinned"):
            reasons[n].append(KeepReason.PINNED)
        if object_lock.locked(point, now) is not None:
            reasons[n].append(KeepReason.LOCKED)
        if n == 0:
            reasons[n].append(KeepReason.NEWEST)
        if style == RetentionStyle.FILES:
            if n < int(retention["period"]):
                reasons[n].append(KeepReason.COUNT)
        elif style is not None:
            expiry = expires_at(retention, point["created_at"])
            if expiry is not None and expiry > now:
                reasons[n].append(KeepReason.AGE)
    local: list[datetime] = []  # each point's time in the plan's zone, computed once
    for period in GFS_PERIODS:
        wanted = int(retention.get(period.value) or 0)
        last: tuple[int, ...] | None = None
        for n, point in enumerate(ordered):
            if wanted <= 0:
                break
            if n == len(local):
                local.append(point["created_at"].astimezone(zone))
            key = _period_key(period, local[n])
            if key != last:
                reasons[n].append(period)
                last = key
                wanted -= 1
    short = int(retention.get("min_good") or 0) - sum(1 for r in reasons if r)
    for n in range(len(ordered)):
        if short <= 0:
            break
        if not reasons[n]:
            reasons[n].append(KeepReason.MIN_GOOD)
            short -= 1
    return [Decision(p, tuple(r)) for p, r in zip(ordered, reasons, strict=True)]


def select_expired(
    points: Sequence[Document],
    retention: dict[str, Any] | None,
    now: datetime,
    timezone: str | None = "UTC",
) -> list[Document]:
    """The points of one plan that retention deletes now (those :func:`decide` keeps for no
    reason). ``points`` are the plan's available restore points, in any order."""
    return [d.point for d in decide(points, retention, now, timezone) if not d.kept]


async def plan_points(
    store: Database, plan_id: str, instance_id: str | None = None
) -> list[Document]:
    """A plan's available restore points: what retention decides about (of ``instance_id``,
    the plan's instance, when given: another instance's points can name the plan)."""
    query: dict[str, Any] = {"plan_id": plan_id, "state": RestorePointState.AVAILABLE}
    if instance_id is not None:
        query["instance_id"] = instance_id
    return await store.restore_points.find(query, {"secrets": 0}).to_list()


async def preview(
    store: Database,
    plan: Document,
    now: datetime,
    *,
    retention: dict[str, Any] | None = None,
    timezone: str | None = None,
) -> list[Decision]:
    """What the sweep would do now to ``plan``'s points under its saved retention, or under
    a proposed ``retention`` and/or ``timezone``: :func:`decide`, the sweep's own rules."""
    return decide(
        await plan_points(store, plan["_id"], plan.get("instance_id")),
        retention if retention is not None else plan.get("retention"),
        now,
        timezone or plan.get("timezone"),
    )


class ConfirmationRequired(Conflict):
    """A plan change would make the next sweep delete many of its points at once."""

    code = "confirmation_required"

    def __init__(self, description: str, *, counts: dict[str, int]) -> None:
        super().__init__(description, field="retention")
        self.counts = counts


async def check_change(
    store: Database,
    plan: Document,
    retention: dict[str, Any],
    timezone: str,
    now: datetime,
    *,
    fraction: float,
    min_points: int,
) -> None:
    """Refuse (:class:`ConfirmationRequired`) a change of ``plan``'s retention or time zone
    that would delete, at the next sweep, at least ``min_points`` and more than ``fraction``
    of its available points that its saved retention keeps."""
    if retention == plan.get("retention") and timezone == plan.get("timezone"):
        return
    points = await plan_points(store, plan["_id"], plan.get("instance_id"))
    before = {
        d.point["_id"]
        for d in decide(points, plan.get("retention"), now, plan.get("timezone"))
        if not d.kept
    }
    newly = [p for p in select_expired(points, retention, now, timezone) if p["_id"] not in before]
    if len(newly) < min_points or len(newly) <= fraction * len(points):
        return
    raise ConfirmationRequired(
        f"This change would delete {len(newly)} of the plan's {len(points)} restore points "
        "at the next retention sweep. Check them with GET .../retention_preview, then send "
        "the change again with ?confirm=true to apply it.",
        counts={"would_delete": len(newly), "total": len(points)},
    )


@dataclass
class SweepResult:
    deleted: int = 0
    deleted_bytes: int = 0
    failed: int = 0
    skipped: int = 0
    orphans_deleted: int = 0
    jobs_pruned: int = 0
    audit_pruned: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, other: SweepResult) -> None:
        self.deleted += other.deleted
        self.deleted_bytes += other.deleted_bytes
        self.failed += other.failed
        self.skipped += other.skipped
        self.orphans_deleted += other.orphans_deleted
        self.jobs_pruned += other.jobs_pruned
        self.audit_pruned += other.audit_pruned
        self.errors.extend(other.errors)


Observer = Callable[[SweepResult], None]
GONE = "gone"
# Asked about an abandoned agent job: its object key once it uploaded, GONE when it produced
# nothing (failed, or unknown to the agent), None while it still runs or cannot be asked.
Resolver = Callable[[Document], Awaitable[str | None]]


class RetentionSweeper:
    """Applies retention to one plan (after each successful backup) or to all (periodically)."""

    def __init__(
        self,
        store: Database,
        box: SecretBox,
        *,
        interval: float = 3600.0,
        storage_timeout: float = 300.0,
        clock: Clock | None = None,
        opener: StoreOpener = open_store,
        observer: Observer | None = None,
        resolver: Resolver | None = None,
        abandon_after: float = 7 * 86400.0,
        job_history_days: float = 90.0,
        audit_retention_days: float = 365.0,
    ) -> None:
        self.db = store
        self.box = box
        self.interval = interval
        self.storage_timeout = storage_timeout
        self.clock = clock or SystemClock()
        self.opener = opener
        self.observer = observer
        self.resolver = resolver
        self.abandon_after = timedelta(seconds=abandon_after)
        self.job_history = timedelta(days=job_history_days) if job_history_days > 0 else None
        self.audit_retention = (
            timedelta(days=audit_retention_days) if audit_retention_days > 0 else None
        )
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ loop

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="retention-sweeper")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def wake(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("retention_sweep_failed")
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A cancel that arrived during the sweep can be swallowed by the database
                # driver; honour it here, or stop() would wait a whole interval for the loop.
                raise asyncio.CancelledError
            await self.clock.wait(self._wake, self.interval)
            self._wake.clear()

    # ------------------------------------------------------------------ sweeps

    async def run_once(self) -> SweepResult:
        """One sweep of every plan with restore points, retried deletions included."""
        async with self._lock:
            # Deletions that failed before first (each point is tried once per sweep).
            result = await self._retry_deleting()
            plan_ids = await self.db.restore_points.distinct(
                "plan_id", {"state": RestorePointState.AVAILABLE}
            )
            for plan_id in plan_ids:
                result.add(await self._sweep_plan(plan_id))
            result.add(await self._delete_pending())
            # Orphaned destinations (backup/orphans.py) that no restore point uses any more.
            await orphans.prune_destinations(self.db)
            if self.job_history is not None:
                result.jobs_pruned = await jobs.prune_history(
                    self.db, ended_before=self.clock.now() - self.job_history
                )
            if self.audit_retention is not None:
                result.audit_pruned = await audit.prune(
                    self.db, before=self.clock.now() - self.audit_retention
                )
        self._report(result)
        return result

    async def sweep_plan(self, plan_id: str | None) -> SweepResult:
        """Retention for one plan, e.g. right after it produced a restore point."""
        async with self._lock:
            result = await self._sweep_plan(plan_id)
        self._report(result)
        return result

    def _report(self, result: SweepResult) -> None:
        pruned = result.jobs_pruned or result.audit_pruned
        if result.deleted or result.failed or result.orphans_deleted or pruned:
            log.info(
                "retention_swept",
                deleted=result.deleted,
                deleted_bytes=result.deleted_bytes,
                failed=result.failed,
                skipped=result.skipped,
                orphans_deleted=result.orphans_deleted,
                jobs_pruned=result.jobs_pruned,
                audit_pruned=result.audit_pruned,
            )
        if self.observer is not None:
            self.observer(result)

    async def _sweep_plan(self, plan_id: str | None) -> SweepResult:
        result = SweepResult()
        if plan_id is None:
            return result
        points = await plan_points(self.db, plan_id)
        if not points:
            return result
        plan = await self.db.plans.find_one(
            {"_id": plan_id}, {"retention": 1, "timezone": 1, "instance_id": 1}
        )
        # Points of another instance that name this plan (an import that mapped the plan's
        # instance to another keeps the plan's id) are not the plan's: each instance's follow
        # their recorded retention, as a deleted plan's do, and never count for the plan.
        others: dict[Any, list[Document]] = {}
        if plan is not None and plan.get("instance_id") is not None:
            for point in points:
                if point.get("instance_id") != plan.get("instance_id"):
                    others.setdefault(point.get("instance_id"), []).append(point)
            points = [p for p in points if p.get("instance_id") == plan.get("instance_id")]
        for group in others.values():
            result.add(await self._sweep_points(group, None))
        if points:
            result.add(await self._sweep_points(points, plan))
        return result

    async def _sweep_points(self, points: list[Document], plan: Document | None) -> SweepResult:
        result = SweepResult()
        retention = plan.get("retention") if plan else _newest_first(points)[0].get("retention")
        if not retention:
            return result
        # A deleted plan's calendar periods are counted in UTC: its zone went with it.
        timezone = plan.get("timezone") if plan else None
        now = self.clock.now()
        await self._align_expiry(points, retention)
        decisions = decide(points, retention, now, timezone)
        # kept only because its files are still locked in storage: deleted after that date
        result.skipped += sum(1 for d in decisions if d.reasons == (KeepReason.LOCKED,))
        for point in (d.point for d in decisions if not d.kept):  # select_expired
            result.add(await self._delete_point(point, claim=True))
        return result

    async def _align_expiry(self, points: list[Document], retention: dict[str, Any]) -> None:
        for point in points:
            expiry = expires_at(retention, point["created_at"])
            if point.get("expires_at") != expiry:
                await self.db.restore_points.update_one(
                    {"_id": point["_id"], "state": RestorePointState.AVAILABLE},
                    {"$set": {"expires_at": expiry}},
                )

    async def _retry_deleting(self) -> SweepResult:
        result = SweepResult()
        async for point in self.db.restore_points.find(
            {"state": RestorePointState.DELETING}, {"secrets": 0}
        ):
            result.add(await self._delete_point(point, claim=False))
        return result

    async def _delete_point(self, point: Document, *, claim: bool) -> SweepResult:
        result = SweepResult()
        point_id = point["_id"]
        until = object_lock.locked(point, self.clock.now())
        if until is not None:  # its files cannot be deleted yet: kept, deleted after that date
            if not claim:
                await object_lock.keep_locked(self.db, point_id, until)
            result.skipped += 1
            return result
        if claim:
            marked = await self.db.restore_points.update_one(
                # not a point pinned since it was selected
                {"_id": point_id, "state": RestorePointState.AVAILABLE, "pinned": {"$ne": True}},
                {"$set": {"state": RestorePointState.DELETING}},
            )
            if marked.modified_count != 1:
                return result  # another sweep or a user took it
        if await restore_points.active_restore(self.db, point_id) is not None:
            # A restore reads these files: keep them, try again at the next sweep.
            if claim:
                await self.db.restore_points.update_one(
                    {"_id": point_id, "state": RestorePointState.DELETING},
                    {"$set": {"state": RestorePointState.AVAILABLE}},
                )
            result.skipped += 1
            return result
        dest = await self.db.destinations.find_one({"_id": point["destination_id"]})
        if dest is None:
            result.failed += 1
            result.errors.append(f"{point_id}: its destination no longer exists")
            log.warning("retention_destination_missing", restore_point_id=point_id)
            return result
        try:
            await restore_points.purge(
                self.db,
                self.box,
                point,
                dest,
                opener=self.opener,
                timeout=self.storage_timeout,
            )
        except ObjectLocked as exc:  # locked longer than recorded: kept, retried after that
            await object_lock.keep_locked(self.db, point_id, exc.until)
            result.skipped += 1
            log.info("retention_delete_locked", restore_point_id=point_id, until=exc.until)
            return result
        except STORAGE_FAILURES as exc:
            reason = storage_failure(exc)
            result.failed += 1
            result.errors.append(f"{point_id}: {reason}")
            log.warning("retention_delete_failed", restore_point_id=point_id, reason=reason)
            return result
        result.deleted += 1
        result.deleted_bytes += sum(
            int(i.get("stored_size") or i.get("size") or 0) for i in point.get("items") or []
        )
        log.info("restore_point_deleted", restore_point_id=point_id, plan_id=point.get("plan_id"))
        if claim:  # selected as expired (not a retry of a delete begun earlier)
            event = webhooks.EventType.RESTORE_POINT_EXPIRED
            await webhooks.restore_point_gone(self.db, point, event)
        return result

    # ------------------------------------------------------------------ failed jobs' files

    async def _delete_pending(self) -> SweepResult:
        """Files uploaded by backup jobs that then failed (or were cancelled) and could not
        be deleted at that moment."""
        result = SweepResult()
        async for job in self.db.jobs.find(
            {
                "pending_deletes.destination_id": {"$exists": True},
                "status": {"$ne": jobs.JobStatus.RUNNING},
            },
            {"pending_deletes": 1},
        ):
            result.add(await self.delete_job_files(job["_id"], job.get("pending_deletes") or []))
        return result

    async def delete_job_files(self, job_id: str, pending: list[Document]) -> SweepResult:
        """Delete what a failed job left (see :meth:`delete_objects`) and record on the job
        what is still left for the next sweep."""
        result, left = await self.delete_objects(job_id, pending)
        if left:
            await self.db.jobs.update_one({"_id": job_id}, {"$set": {"pending_deletes": left}})
        else:
            await self.db.jobs.update_one({"_id": job_id}, {"$unset": {"pending_deletes": ""}})
        return result

    async def delete_objects(
        self, job_id: str, pending: list[Document]
    ) -> tuple[SweepResult, list[Document]]:
        """Delete the objects a failed backup job uploaded. Each entry is
        ``{destination_id, key}``, or ``{destination_id, instance_id, agent_job_id, since}``
        for an agent job abandoned at its deadline whose file name is not known yet (asked of
        the agent through ``resolver``). Returns what is left to try again later."""
        result = SweepResult()
        left: list[Document] = []
        by_dest: dict[str, list[str]] = {}
        now = self.clock.now()
        for entry in pending:
            if entry.get("key"):
                by_dest.setdefault(entry["destination_id"], []).append(entry["key"])
                continue
            if not entry.get("agent_job_id") or self.resolver is None:
                continue
            try:
                outcome = await self.resolver(entry)
            except Exception as exc:  # an agent problem must not stop the sweep
                outcome = None
                log.warning("abandoned_job_check_failed", job_id=job_id, error=type(exc).__name__)
            if isinstance(outcome, str) and outcome != GONE:
                by_dest.setdefault(entry["destination_id"], []).append(outcome)
            elif outcome == GONE:
                continue
            elif now - entry.get("since", now) > self.abandon_after:
                log.warning(
                    "abandoned_job_given_up", job_id=job_id, agent_job_id=entry["agent_job_id"]
                )
            else:
                left.append(entry)
        for dest_id, keys in by_dest.items():
            # An object a restore point names is no orphan, whoever uploaded it.
            kept = await restore_points.referenced(self.db, dest_id, keys)
            keys = [k for k in keys if k not in kept]
            if not keys:
                continue
            dest = await self.db.destinations.find_one({"_id": dest_id})
            if dest is None:
                # Nothing can reach those files any more; say so once and let go.
                log.warning("orphan_destination_missing", job_id=job_id, objects=len(keys))
                continue
            try:
                async with asyncio.timeout(self.storage_timeout):
                    async with self.opener(restore_points.object_settings(dest, self.box)) as st:
                        for key in list(keys):
                            await st.delete(key)
                            keys.remove(key)
                            result.orphans_deleted += 1
            except STORAGE_FAILURES as exc:
                reason = storage_failure(exc)
                result.failed += 1
                result.errors.append(f"job {job_id}: {reason}")
                log.warning("orphan_delete_failed", job_id=job_id, reason=reason)
            left.extend({"destination_id": dest_id, "key": k} for k in keys)
        return result, left
