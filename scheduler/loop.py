"""The scheduler loop: turns due plans into jobs, exactly one job per fire, on any number of
replicas sharing one database.

How a fire becomes a job (docs/scheduling.md has the whole story):

1. Due plans are read with one indexed query (``paused``, ``next_run_at <= now``), a batch at
   a time.
2. For each, the job of its fire ``T = next_run_at`` is inserted *first*. Its ``_id`` is
   derived from (plan, T) and the unique index ``one_job_per_fire`` on (plan_id,
   scheduled_for) refuses a second job for the same fire: whichever replica inserts first
   wins, the others get a duplicate-key error and know the fire is already recorded.
3. Then ``next_run_at`` is advanced with a compare-and-set (``{_id, next_run_at: T}``), so a
   replica with a stale view changes nothing.

Crash points: a replica dying after 2 and before 3 leaves the plan due with its job written;
whoever handles it next gets the duplicate and only advances. Advancing before inserting could
lose a fire; this order cannot. A plan deleted while its fire was being recorded gets its
fresh job cancelled.

A fire handled more than ``SCHEDULER_MISFIRE_THRESHOLD_SECONDS`` late was missed (no scheduler
ran at its time). Of a plan's missed fires only the latest may run, once, as a CATCH_UP job,
when it is at most ``SCHEDULER_MISFIRE_GRACE_SECONDS`` late; the others are recorded in one
MISSED job per outage (``missed``: first, last, count) so that a week-long outage of a
frequent plan is one document, not thousands. What a MISSED job covers is read back from the
database, never assumed, so two replicas recovering at once neither double-count nor leave a
fire unaccounted for.

The loop sleeps until the earliest fire it knows of (plans due within ``SCHEDULER_POLL_SECONDS``)
or until this replica changes a plan (``Database.events.plans_changed``), and at most
``SCHEDULER_POLL_SECONDS``, which bounds how late it notices plans changed elsewhere.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import structlog
from pymongo import UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError

from backup import backpressure, drill, jobs, schedule
from backup.clock import Clock, SystemClock
from backup.database import Database, Document
from backup.errors import InvalidInput
from scheduler.leadership import Leadership
from scheduler.settings import SchedulerSettings

log = structlog.get_logger(__name__)

DUPLICATE_KEY = 11000
MISSED_COUNT_LIMIT = 10_000  # missed fires counted one by one at most; beyond: "more than"
_JOB_IDS = uuid.UUID("5b0f4a8e-8c1e-4d52-9a51-6f2f0c4b7e11")

PLAN_FIELDS = {
    "_id": 1,
    "instance_id": 1,
    "destination_id": 1,
    "frequency": 1,
    "timezone": 1,
    "items": 1,
    "compression": 1,
    "encryption": 1,
    "next_run_at": 1,
    "last_job_id": 1,
}


def fire_job_id(plan_id: str, fire: datetime) -> str:
    """The id of the job of one fire: the same on every replica, so that each can name it
    (``last_job_id``) without asking which replica won the insert."""
    return uuid.uuid5(_JOB_IDS, f"{plan_id}@{fire.isoformat()}").hex


@dataclass
class SchedulerStats:
    """What this replica's scheduler did since it started (for logs, metrics, benchmarks)."""

    passes: int = 0
    queued: int = 0  # SCHEDULE and CATCH_UP jobs this replica inserted
    catch_ups: int = 0
    missed_jobs: int = 0  # MISSED jobs this replica inserted
    missed_fires: int = 0  # fires those MISSED jobs cover
    already_recorded: int = 0  # fires another replica (or an earlier attempt) had recorded
    cancelled: int = 0  # jobs of plans deleted while their fire was recorded
    skipped: int = 0  # fires recorded as MISSED because the plan's previous job had not started
    errors: int = 0
    drills: int = 0  # DRILL jobs this replica queued (backup/drill.py)


@dataclass
class _Written:
    """One batch of on-time fires whose jobs are written and whose plans are still to be
    advanced: the plans with their next fires, the job documents (same order), and the
    queued jobs this replica inserted."""

    plans: list[tuple[Document, datetime]]
    docs: list[Document]
    queued_new: list[Document]

    @property
    def queued(self) -> int:
        return len(self.queued_new)


class SchedulerObserver(Protocol):
    """What the scheduler reports for metrics (``broker.metrics.Metrics`` is one)."""

    def fired(self, trigger: str, lag_seconds: float) -> None:
        """This replica queued a job (SCHEDULE or CATCH_UP) ``lag_seconds`` after its fire."""

    def missed(self, fires: int) -> None:
        """This replica recorded ``fires`` missed fires (in one MISSED job)."""


class _Unobserved:
    """The observer of a scheduler given none: reports nothing."""

    def fired(self, trigger: str, lag_seconds: float) -> None:
        pass

    def missed(self, fires: int) -> None:
        pass


def _local(at: datetime, timezone: str) -> str:
    try:
        return at.astimezone(schedule.zone(timezone)).strftime(f"%Y-%m-%d %H:%M {timezone}")
    except InvalidInput:
        return at.strftime("%Y-%m-%d %H:%M UTC")


def _utc(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S UTC")


class Scheduler:
    """One replica's scheduler. ``start`` spawns the loop; ``run_once`` is one pass (tests and
    benchmarks drive it directly)."""

    def __init__(
        self,
        store: Database,
        settings: SchedulerSettings,
        *,
        replica_id: str,
        clock: Clock | None = None,
        observer: SchedulerObserver | None = None,
    ) -> None:
        self.db = store
        self.settings = settings
        self.replica_id = replica_id
        self.clock: Clock = clock or SystemClock()
        self.observer: SchedulerObserver = observer or _Unobserved()
        self.stats = SchedulerStats()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._next_cache: dict[tuple[str, str, datetime], datetime] = {}
        self.next_wake_at: datetime | None = None
        self._upcoming: list[datetime] = []  # fire times known in the window, sorted
        self._horizon: datetime | None = None  # the end of that window
        self._busy = False  # the last pass found due plans
        self._stale = True  # the known fire times must be read again
        self._healthy_since: datetime | None = None  # since when the loop's passes succeed
        self._handled_until: datetime | None = None  # the last pass read all plans due by then
        self._behind_until: datetime | None = None  # runners were told to wait until then
        self.leadership: Leadership | None = None
        if settings.lease_seconds > 0:
            self.leadership = Leadership(
                store,
                name="scheduler",
                owner=replica_id,
                seconds=settings.lease_seconds,
                clock=self.clock,
                on_gain=self._became_leader,
            )
        """When the loop will look again unless woken (None while it works)."""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._task is not None and not self._task.done():
            return
        self.db.events.plans_changed.connect(self.wake)
        self._wake.set()  # first pass at once: fires due while no replica ran
        if self.leadership is not None:
            await self.leadership.start()
        self._task = asyncio.create_task(self._loop(), name=f"scheduler:{self.replica_id}")
        log.info(
            "scheduler_started",
            replica=self.replica_id,
            leading=self.leadership.held if self.leadership is not None else None,
        )

    async def stop(self) -> None:
        self.db.events.plans_changed.disconnect(self.wake)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.leadership is not None:
            await self.leadership.stop()  # after the loop: no pass runs without the lease
        if task is not None:
            log.info("scheduler_stopped", replica=self.replica_id)

    def wake(self) -> None:
        """Look at the plans again at once (a plan was created, changed or deleted)."""
        self._stale = True
        self._wake.set()

    def _became_leader(self) -> None:
        """This replica just became the leader: what it knew of the plans may be stale, and
        its passes count as healthy only from its first one as leader."""
        self._healthy_since = None
        self._horizon = None
        self.wake()

    @property
    def leading(self) -> bool:
        """Whether this replica's loop schedules (it holds the lease, or there is none)."""
        return self.leadership is None or self.leadership.held

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _loop(self) -> None:
        while True:
            self._wake.clear()  # a change during the pass triggers another pass at once
            if not self.leading:
                # Standing by: becoming the leader wakes the loop (Leadership.on_gain).
                await self.clock.wait(self._wake, None)
                continue
            started = self.clock.now()
            try:
                await self.run_once()
                if self._healthy_since is None:
                    self._healthy_since = started
                interval = self.settings.pass_interval_seconds
                if self._busy and interval > 0 and not self._wake.is_set():
                    # Busy: more fires are surely coming. Look again one interval after this
                    # pass started, not at each fire's instant: the fires of that interval are
                    # written together, and replicas drift apart instead of all racing for
                    # the same fires at the same instant.
                    spent = (self.clock.now() - started).total_seconds()
                    timeout = max(0.0, interval * random.uniform(0.8, 1.2) - spent)
                else:
                    timeout = await self._until_next_fire()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.stats.errors += 1
                log.exception("scheduler_pass_failed", replica=self.replica_id)
                timeout = self.settings.error_backoff_seconds
                self._horizon = None
                self._healthy_since = None  # fires due meanwhile may have been missed
            self.next_wake_at = self.clock.now() + timedelta(seconds=timeout)
            try:
                await self.clock.wait(self._wake, timeout)
            finally:
                self.next_wake_at = None

    async def _until_next_fire(self) -> float:
        """Seconds until the earliest known fire, at most until the end of the window.

        The fire times of the window ``(now, now + SCHEDULER_POLL_SECONDS]`` are read with
        one indexed range query when the window has run out or a plan changed on this replica,
        and kept in memory in between (with the fires this replica schedules added), so that a
        busy minute costs one read of the plans due soon, not one per pass. A plan changed on
        another replica is seen at the next read, within the window."""
        now = self.clock.now()
        # Fires after the last pass's read count, even if they are already past now: time
        # moves on between that read and this one.
        handled = min(self._handled_until or now, now)
        if self._stale or self._horizon is None or now >= self._horizon:
            self._stale = False  # (a change during the read marks it stale again)
            horizon = now + timedelta(seconds=self.settings.poll_seconds)
            times = [
                doc["next_run_at"]
                async for doc in self.db.plans.find(
                    {"paused": False, "next_run_at": {"$gt": handled, "$lte": horizon}},
                    {"_id": 0, "next_run_at": 1},
                )
            ]
            self._upcoming = sorted(set(times))
            self._horizon = horizon
        del self._upcoming[: bisect.bisect_right(self._upcoming, handled)]
        if not self._upcoming:
            return max(0.0, (self._horizon - now).total_seconds())
        # a hair late rather than early: the event loop's timer and the wall clock may differ
        return max(0.0, (self._upcoming[0] - now).total_seconds() + 0.002)

    def _note(self, fire: datetime) -> None:
        """Remember a fire this replica just scheduled if it falls in the known window."""
        if self._horizon is not None and fire <= self._horizon:
            position = bisect.bisect_left(self._upcoming, fire)
            if position == len(self._upcoming) or self._upcoming[position] != fire:
                self._upcoming.insert(position, fire)

    # ------------------------------------------------------------------ one pass

    async def run_once(self) -> int:
        """Fire every plan due now; returns how many jobs were queued (SCHEDULE and
        CATCH_UP; MISSED records are not queued).

        The due plans are read with one query, a batch at a time from its cursor (a query per
        batch would make a server that fetches every match before limiting, like the embedded
        one, read the whole due set again for each batch). The jobs of every batch are
        written first, as the batches arrive, and the plans advanced afterwards: a job is
        what the runner waits for, so a herd of fires has all its jobs queued before any of
        the bookkeeping. Each plan still gets its job before its compare-and-set (a crash in
        between leaves it due with its job written, as before)."""
        self.stats.passes += 1
        self._busy = False
        queued = 0
        recorded_before = self.stats.already_recorded
        batch = self.settings.batch_size
        now = self.clock.now()
        self._handled_until = now  # every plan due by then is read by this pass
        cursor = self.db.plans.find(
            {"paused": False, "next_run_at": {"$lte": now}}, PLAN_FIELDS, batch_size=batch
        )
        written: list[_Written] = []
        due: list[Document] = []
        async with cursor:  # closed on the server even if a batch fails
            async for plan in cursor:
                due.append(plan)
                if len(due) < batch:
                    continue
                queued += await self._fire_batch(due, now, written)
                due = []
        if due:
            queued += await self._fire_batch(due, now, written)
        for step in written:
            await self._advance_batch(step)
        self.stats.drills += await drill.fire_due_drills(self.db, self.clock.now())
        if len(self._next_cache) > 10_000:
            self._next_cache.clear()
        if queued:
            log.info(
                "scheduler_fired",
                replica=self.replica_id,
                queued=queued,
                already_recorded=self.stats.already_recorded - recorded_before,
            )
        return queued

    async def _behind(self, now: datetime) -> None:
        """Fires wait: ask every replica's runner to start no job for a moment
        (``backup.backpressure``), renewing the notice while it still has over half to run."""
        hold = timedelta(seconds=backpressure.HOLD_SECONDS / 2)
        if self._behind_until is not None and self._behind_until - now > hold:
            return
        try:
            self._behind_until = await backpressure.announce_behind(
                self.db, at=now, replica=self.replica_id
            )
        except PyMongoError as exc:  # the fires matter more than the notice
            log.warning("scheduler_behind_notice_failed", error=type(exc).__name__)

    def _on_time(self, fire: datetime, now: datetime) -> bool:
        """Whether a fire is handled as on time. A fire is a misfire only when no scheduler
        could have handled it: more than the threshold late *and* before this replica's loop
        was running (and reaching the database). A fire that is late because this replica is
        busy (a burst of fires, a slow database) is not missed: it runs as scheduled."""
        if now - fire <= timedelta(seconds=self.settings.misfire_threshold_seconds):
            return True
        return self._healthy_since is not None and fire >= self._healthy_since

    async def _fire_batch(
        self, due: list[Document], now: datetime, written: list[_Written] | None = None
    ) -> int:
        """Record the fires of one batch of due plans: the on-time ones' jobs are inserted
        now and their plans left in ``written`` to be advanced at the end of the pass (None:
        advanced at once); late ones (misfires) are handled plan by plan, insert then
        advance."""
        self._busy = True
        oldest = min(p["next_run_at"] for p in due)
        if (now - oldest).total_seconds() > backpressure.BEHIND_SECONDS:
            await self._behind(now)
        on_time = [p for p in due if self._on_time(p["next_run_at"], now)]
        late = [p for p in due if not self._on_time(p["next_run_at"], now)]
        queued = 0
        if on_time:
            step = await self._insert_fires(on_time)
            if step is not None:
                queued += step.queued
                if written is None:
                    await self._advance_batch(step)
                else:
                    written.append(step)
        for plan in late:
            queued += await self._misfire(plan, now)
        if queued:
            self.db.events.jobs_queued.fire()  # the runner may start on the first batches
        return queued

    def _next(self, plan: Document, after: datetime) -> datetime:
        """The plan's next fire after ``after`` (plans sharing a schedule share the answer)."""
        key = (plan["frequency"], plan["timezone"], after)
        nxt = self._next_cache.get(key)
        if nxt is None:
            nxt = schedule.next_fire_time(plan["frequency"], plan["timezone"], after)
            self._next_cache[key] = nxt
        return nxt

    def _job(
        self,
        plan: Document,
        fire: datetime,
        trigger: str,
        *,
        status: str = jobs.JobStatus.QUEUED,
        reason: str | None = None,
        missed: Document | None = None,
    ) -> Document:
        job = jobs.new_job(
            instance_id=plan["instance_id"],
            type=jobs.JobType.BACKUP,
            plan_id=plan["_id"],
            destination_id=plan["destination_id"],
            trigger=trigger,
            items=[jobs.new_item(name) for name in plan.get("items") or []],
            compression=bool(plan.get("compression", True)),
            encryption={"enabled": bool((plan.get("encryption") or {}).get("enabled"))},
            scheduled_for=fire,
            status=status,
            reason=reason,
        )
        job["_id"] = fire_job_id(plan["_id"], fire)
        at = self.clock.now()
        job["created_at"] = at
        if job["ended_at"] is not None:
            job["ended_at"] = at
        if missed is not None:
            job["missed"] = missed
        return job

    async def _insert_many(self, docs: list[Document]) -> set[str]:
        """Insert jobs; returns the ids of those that were new (the others' fires were
        already recorded)."""
        try:
            await self.db.jobs.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors") or []
            other = [e for e in errors if e.get("code") != DUPLICATE_KEY]
            if other:
                raise
            refused = {docs[e["index"]]["_id"] for e in errors}
            return {d["_id"] for d in docs} - refused
        return {d["_id"] for d in docs}

    async def _waiting(self, plans: list[Document]) -> dict[str, Document]:
        """The plans (by id) whose last job is still QUEUED: it has not even started."""
        last = [p["last_job_id"] for p in plans if p.get("last_job_id")]
        if not last:
            return {}
        docs = await self.db.jobs.find(
            {"_id": {"$in": last}, "status": jobs.JobStatus.QUEUED},
            {"plan_id": 1, "scheduled_for": 1},
        ).to_list()
        return {d["plan_id"]: d for d in docs}

    def _skip(self, plan: Document, fire: datetime, waiting: Document) -> Document:
        """A fire while the plan's previous backup still waits to start is recorded as MISSED,
        saying so, instead of queuing a second backup behind it: the queue of a plan whose
        backups take longer than its interval (or whose agent is down) stays bounded, and the
        waiting job backs up data as recent as the skipped one would have."""
        since = waiting.get("scheduled_for")
        reason = (
            f"Skipped: the previous backup of this plan (job {waiting['_id']}"
            + (f", scheduled for {_local(since, plan['timezone'])}" if since else "")
            + ") had not started yet; it will back up the same data."
        )
        return self._missed_fire(plan, fire, reason)

    def _missed_fire(self, plan: Document, fire: datetime, reason: str) -> Document:
        """The MISSED job of one fire of ``plan``, saying why it did not run."""
        return self._job(
            plan,
            fire,
            jobs.Trigger.SCHEDULE,
            status=jobs.JobStatus.MISSED,
            reason=reason,
            missed={"first": fire, "last": fire, "count": 1, "exact": True},
        )

    async def _insert_fires(self, plans: list[Document]) -> _Written | None:
        """Insert the jobs of on-time fires (one write for the batch; the unique index
        refuses a fire already recorded). Returns what ``_advance_batch`` needs to advance
        their plans, or None when no plan's schedule could be evaluated."""
        good: list[tuple[Document, datetime]] = []
        for plan in plans:
            try:
                good.append((plan, self._next(plan, plan["next_run_at"])))
            except InvalidInput as exc:
                await self._stop_broken(plan, exc)
        if not good:
            return None
        waiting = await self._waiting([p for p, _ in good])
        docs = [
            self._skip(p, p["next_run_at"], waiting[p["_id"]])
            if p["_id"] in waiting
            else self._job(p, p["next_run_at"], jobs.Trigger.SCHEDULE)
            for p, _ in good
        ]
        new = await self._insert_many(docs)
        written = self.clock.now()
        self.stats.already_recorded += len(docs) - len(new)
        queued_new = [d for d in docs if d["_id"] in new and d["status"] == jobs.JobStatus.QUEUED]
        for d in docs:
            if d["_id"] not in new:
                continue
            if d["status"] == jobs.JobStatus.MISSED:
                self.stats.skipped += 1
                self.observer.missed(1)
                continue
            # lag: until the job was written (acknowledged), not built
            self.observer.fired(
                jobs.Trigger.SCHEDULE, (written - d["scheduled_for"]).total_seconds()
            )
        self.stats.queued += len(queued_new)
        return _Written(good, docs, queued_new)

    async def _advance_batch(self, step: _Written) -> None:
        """Advance the plans whose jobs ``step`` wrote: one unordered bulk of
        compare-and-sets (``{_id, next_run_at: T}``), so a plan changed meanwhile (paused,
        edited, deleted, advanced by another replica) is left alone. A skipped fire leaves
        ``last_job_id`` on the job that still waits, so the next fire sees it too."""
        result = await self.db.plans.bulk_write(
            [
                UpdateOne(
                    {"_id": p["_id"], "next_run_at": p["next_run_at"]},
                    {
                        "$set": {"next_run_at": nxt}
                        if d["status"] == jobs.JobStatus.MISSED
                        else {"next_run_at": nxt, "last_job_id": d["_id"]}
                    },
                )
                for (p, nxt), d in zip(step.plans, step.docs, strict=True)
            ],
            ordered=False,
        )
        for nxt in {nxt for _, nxt in step.plans}:
            self._note(nxt)
        if step.queued_new and result.matched_count < len(step.plans):
            await self._cancel_orphans(step.queued_new)

    async def _cancel_orphans(self, new_jobs: list[Document]) -> None:
        """Cancel the fresh jobs of plans deleted meanwhile (the plan's own deletion cancels
        the jobs it can see; these may have been written just after)."""
        plan_ids = [j["plan_id"] for j in new_jobs]
        alive = {
            d["_id"]
            for d in await self.db.plans.find({"_id": {"$in": plan_ids}}, {"_id": 1}).to_list()
        }
        orphans = [j["_id"] for j in new_jobs if j["plan_id"] not in alive]
        if not orphans:
            return
        result = await self.db.jobs.update_many(
            {"_id": {"$in": orphans}, "status": jobs.JobStatus.QUEUED},
            {
                "$set": {
                    "status": jobs.JobStatus.CANCELLED,
                    "reason": "The plan was deleted.",
                    "ended_at": self.clock.now(),
                },
                "$inc": {"version": 1},
            },
        )
        self.stats.cancelled += result.modified_count

    async def _stop_broken(self, plan: Document, exc: InvalidInput) -> None:
        """A stored plan whose schedule cannot be evaluated (an edited document, a time zone
        gone from the system's database): record its fire as MISSED, saying why, and stop it
        until it is corrected (``next_run_at`` null; a PATCH recomputes it)."""
        fire = plan["next_run_at"]
        reason = (
            f"Not run: the plan's schedule ({plan.get('frequency')!r} in "
            f"{plan.get('timezone')!r}) cannot be evaluated: {exc.description} The plan is "
            "stopped until its frequency or time zone is corrected."
        )
        doc = self._missed_fire(plan, fire, reason)
        new = await self._insert_many([doc])
        await self.db.plans.update_one(
            {"_id": plan["_id"], "next_run_at": fire},
            {"$set": {"next_run_at": None, "last_job_id": doc["_id"]}},
        )
        if new:
            self.stats.missed_jobs += 1
            self.stats.missed_fires += 1
        log.error("plan_schedule_broken", plan=plan["_id"], error=exc.description)

    # ------------------------------------------------------------------ misfires

    async def _record(self, plan: Document, doc: Document) -> tuple[bool, datetime]:
        """Insert the job of fire ``doc.scheduled_for``, or find the one already there.
        Returns whether it is ours, and the last fire the recorded job accounts for (a
        MISSED job may cover a range)."""
        try:
            await self.db.jobs.insert_one(doc)
            return True, (doc.get("missed") or {}).get("last") or doc["scheduled_for"]
        except DuplicateKeyError:
            existing = await self.db.jobs.find_one(
                {"plan_id": plan["_id"], "scheduled_for": doc["scheduled_for"]}, {"missed": 1}
            )
            self.stats.already_recorded += 1
            last = ((existing or {}).get("missed") or {}).get("last")
            return False, last or doc["scheduled_for"]

    async def _advance(self, plan: Document, fire: datetime, nxt: datetime, job_id: str) -> bool:
        result = await self.db.plans.update_one(
            {"_id": plan["_id"], "next_run_at": fire},
            {"$set": {"next_run_at": nxt, "last_job_id": job_id}},
        )
        if result.matched_count == 1:
            self._note(nxt)
            return True
        return False

    def _plan_misfire(self, plan: Document, now: datetime) -> Document:
        """The job that accounts for the plan's fire ``next_run_at`` (and, for a MISSED
        record, the fires after it that share its fate). CPU only: run in a thread, since a
        long outage of a frequent plan means walking many fires."""
        fire: datetime = plan["next_run_at"]
        freq, tz = plan["frequency"], plan["timezone"]
        threshold = timedelta(seconds=self.settings.misfire_threshold_seconds)
        grace = timedelta(seconds=self.settings.misfire_grace_seconds)
        latest = schedule.last_fire_at_or_before(freq, tz, now, not_before=fire) or fire
        if now - latest <= threshold:
            runs: str | None = jobs.Trigger.SCHEDULE  # the latest fire is not even late
        elif now - latest <= grace:
            runs = jobs.Trigger.CATCH_UP
        else:
            runs = None
        if runs is not None and latest == fire:
            return self._job(plan, fire, runs)
        if runs is not None:  # the fires before the latest are missed; the latest runs next
            before = latest - timedelta(microseconds=1)
            return self._missed(plan, fire, before, now, (latest, runs))
        return self._missed(plan, fire, latest, now, None)

    async def _misfire(self, plan: Document, now: datetime) -> int:
        """A plan whose fire ``next_run_at`` is more than the threshold late: record its
        missed fires and catch up the latest one by the policy, step by step, each step an
        insert-then-compare-and-set like an ordinary fire."""
        queued = 0
        for _ in range(4):  # in practice at most two steps: the missed range, the latest fire
            fire: datetime = plan["next_run_at"]
            if fire > now:
                break
            try:
                doc = await asyncio.to_thread(self._plan_misfire, plan, now)
                ours, covered = await self._record(plan, doc)
                nxt = self._next(plan, covered)
            except InvalidInput as exc:
                await self._stop_broken(plan, exc)
                break
            advanced = await self._advance(plan, fire, nxt, doc["_id"])
            if ours:
                queued += self._account(doc)
                if doc["status"] == jobs.JobStatus.QUEUED and not advanced:
                    await self._cancel_orphans([doc])
            if not advanced:
                break  # changed elsewhere meanwhile (edited, paused, deleted, another replica)
            plan = {**plan, "next_run_at": nxt}
        return queued

    def _account(self, doc: Document) -> int:
        if doc["status"] == jobs.JobStatus.MISSED:
            self.stats.missed_jobs += 1
            self.stats.missed_fires += doc["missed"]["count"]
            self.observer.missed(doc["missed"]["count"])
            log.warning(
                "plan_fires_missed", plan=doc["plan_id"], job=doc["_id"], reason=doc["reason"]
            )
            return 0
        self.stats.queued += 1
        if doc["trigger"] == jobs.Trigger.CATCH_UP:
            self.stats.catch_ups += 1
        lag = (self.clock.now() - doc["scheduled_for"]).total_seconds()
        self.observer.fired(doc["trigger"], lag)
        log.info(
            "plan_fire_caught_up" if doc["trigger"] == jobs.Trigger.CATCH_UP else "plan_fired",
            plan=doc["plan_id"],
            job=doc["_id"],
            scheduled_for=doc["scheduled_for"].isoformat(),
            lag_seconds=round(lag, 3),
        )
        return 1

    def _missed(
        self,
        plan: Document,
        first: datetime,
        until: datetime,
        now: datetime,
        latest: tuple[datetime, str] | None,
    ) -> Document:
        """One MISSED job for the fires ``first <= t <= until``; ``latest``: the fire after
        them that still runs and its trigger (None: none does)."""
        freq, tz = plan["frequency"], plan["timezone"]
        fires, more = schedule.fires_between(freq, tz, first, until, limit=MISSED_COUNT_LIMIT)
        if more:
            last = schedule.last_fire_at_or_before(freq, tz, until, not_before=first)
            assert last is not None
        else:
            last = fires[-1]
        count = len(fires)
        counted = f"more than {count:,}" if more else f"{count:,}"
        runs = "run" if count == 1 and not more else "runs"
        span = (
            f"scheduled for {_local(first, tz)} ({_utc(first)})"
            if last == first
            else f"scheduled from {_local(first, tz)} to {_local(last, tz)} "
            f"({_utc(first)} to {_utc(last)})"
        )
        if latest is not None:
            policy = (
                f"By the misfire policy only the plan's most recent run, "
                f"{_local(latest[0], tz)}, runs (a {latest[1]} job)."
            )
        else:
            grace = int(self.settings.misfire_grace_seconds)
            late = int((now - last).total_seconds())
            policy = (
                f"The most recent was {late:,} s late, more than the catch-up grace period "
                f"(SCHEDULER_MISFIRE_GRACE_SECONDS = {grace:,} s), so none was run."
            )
        reason = (
            f"Missed {counted} {runs} {span}: no scheduler was running at the time "
            f"(noticed at {_utc(now)}). {policy}"
        )
        return self._job(
            plan,
            first,
            jobs.Trigger.SCHEDULE,
            status=jobs.JobStatus.MISSED,
            reason=reason,
            missed={"first": first, "last": last, "count": count, "exact": not more},
        )
