"""The job runner: claims queued jobs and drives each on the instance's agent.

Every manager replica runs one. The database is the only coordination (see the lease notes in
``backup.jobs``): a replica claims a job with a compare-and-set and holds it with a lease it
renews; a replica that dies stops renewing, and another one takes the job over and re-attaches
to the agent's job by its id (``<job id>-<item index>``), so a backup is never started twice.
At most one job per instance runs at a time (a unique partial index), and at most
``RUNNER_CONCURRENCY`` per replica.

What one job does, from its current state to a final one, is ``backup.job_run``; the storage
clients the runner keeps open across jobs are ``backup.store_cache``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import structlog
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pymongo.errors import PyMongoError

from backup import backpressure, jobs
from backup.agent_client import (
    AgentClient,
    AgentError,
    AgentFailure,
    AgentJobKind,
    agent_session,
)
from backup.clock import Clock, SystemClock
from backup.database import Database, Document
from backup.drill import DrillRun
from backup.job_run import JobEnd, JobRun, JobRunContext, RunSettings, object_key
from backup.jobs import JobStatus, JobType, Lease, LeaseLost
from backup.restore_points import StoreOpener
from backup.retention import GONE, RetentionSweeper
from backup.secrets import SecretBox, SecretKeyError
from backup.settings import load_settings
from backup.store_cache import StoreCache
from storage import open_store

log = structlog.get_logger(__name__)

CLAIM_SPACING = 5  # passes start at least this many times their queue read's duration apart


class RunnerSettings(BaseSettings):
    """The job runner and retention sweep of one replica, from environment variables."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    enabled: bool = Field(
        default=True,
        validation_alias="RUNNER_ENABLED",
        description="Run jobs on this replica (false: it only serves HTTP).",
    )
    concurrency: int = Field(
        default=4,
        ge=1,
        le=256,
        validation_alias="RUNNER_CONCURRENCY",
        description="Jobs this replica drives at once (over all instances).",
    )
    db_connections: int = Field(
        default=2,
        ge=1,
        le=100,
        validation_alias="RUNNER_DB_CONNECTIONS",
        description="Database operations the runner and the retention sweep of this replica "
        "have in flight at most (their own connection pool), however many jobs run: the "
        "database's time left is the scheduler's and the API's.",
    )
    lease_seconds: float = Field(
        default=30.0,
        ge=1.0,
        le=3600.0,
        validation_alias="RUNNER_LEASE_SECONDS",
        description="How long a claim lasts without renewal (renewed every third of it); "
        "a crashed replica's jobs are taken over after at most this long.",
    )
    poll_seconds: float = Field(
        default=5.0,
        gt=0,
        le=3600.0,
        validation_alias="RUNNER_POLL_SECONDS",
        description="How often the database is checked for claimable jobs when nothing "
        "signalled one (jobs queued on this replica are claimed at once).",
    )
    job_deadline_seconds: float = Field(
        default=6 * 3600.0,
        ge=1.0,
        validation_alias="RUNNER_JOB_DEADLINE_SECONDS",
        description="A job still running this long after it started ends FAILED.",
    )
    max_attempts: int = Field(
        default=10,
        ge=1,
        le=1000,
        validation_alias="RUNNER_MAX_ATTEMPTS",
        description="A job taken over this many times (its replicas kept dying) ends FAILED.",
    )
    agent_poll_min_seconds: float = Field(
        default=1.0, gt=0, validation_alias="RUNNER_AGENT_POLL_MIN_SECONDS"
    )
    agent_poll_max_seconds: float = Field(
        default=15.0,
        gt=0,
        validation_alias="RUNNER_AGENT_POLL_MAX_SECONDS",
        description="Agent jobs are polled with backoff from the min to the max interval.",
    )
    agent_unreachable_seconds: float = Field(
        default=300.0,
        ge=0,
        validation_alias="RUNNER_AGENT_UNREACHABLE_SECONDS",
        description="How long an agent may stay unreachable (or busy, 429) before the job "
        "ends FAILED.",
    )
    agent_timeout_seconds: float = Field(
        default=30.0, gt=0, validation_alias="RUNNER_AGENT_TIMEOUT_SECONDS"
    )
    log_max_bytes: int = Field(
        default=16 * 1024,
        ge=256,
        validation_alias="RUNNER_LOG_MAX_BYTES",
        description="Each stage log is kept to its last N bytes.",
    )
    job_log_budget_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=64 * 1024,
        le=8 * 1024 * 1024,
        validation_alias="RUNNER_JOB_LOG_BUDGET_BYTES",
        description="All stage logs of one job together (a job document must stay small).",
    )
    verify_uploads: bool = Field(
        default=True,
        validation_alias="RUNNER_VERIFY_UPLOADS",
        description="Confirm each uploaded object (exists, size) in storage before writing "
        "the restore point.",
    )
    storage_timeout_seconds: float = Field(
        default=120.0, gt=0, validation_alias="RUNNER_STORAGE_TIMEOUT_SECONDS"
    )
    retention_enabled: bool = Field(default=True, validation_alias="RETENTION_ENABLED")
    retention_sweep_seconds: float = Field(
        default=3600.0,
        gt=0,
        validation_alias="RETENTION_SWEEP_SECONDS",
        description="Period of the full retention sweep (each plan is also swept after each "
        "of its successful backups).",
    )
    job_history_days: float = Field(
        default=90.0,
        ge=0,
        validation_alias="JOB_HISTORY_DAYS",
        description="The sweep deletes the records of jobs that ended longer ago (0: keep "
        "them all); active jobs, each plan's last job and restore points are kept.",
    )
    audit_retention_days: float = Field(
        default=365.0,
        ge=0,
        validation_alias="AUDIT_RETENTION_DAYS",
        description="The sweep deletes audit-trail entries older than this (0: keep them all).",
    )

    @model_validator(mode="after")
    def _coherent(self) -> RunnerSettings:
        if self.agent_poll_max_seconds < self.agent_poll_min_seconds:
            raise ValueError("RUNNER_AGENT_POLL_MAX_SECONDS must be >= the min")
        return self


def load_runner_settings() -> RunnerSettings:
    """The runner settings from the environment (``backup.settings.ConfigError`` if bad)."""
    return load_settings(RunnerSettings, part="runner")


def new_replica_id() -> str:
    """Unique per process start: a restarted replica never mistakes old leases for its own."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class RunnerObserver:
    """What the runner reports for metrics; this default does nothing."""

    def job_started(self, job_type: str, trigger: str, lag_seconds: float | None) -> None:
        """A job was claimed from QUEUED; ``lag_seconds``: from its fire time (scheduled)."""

    def job_finished(self, job_type: str, status: str, seconds: float | None) -> None:
        """A job ended; ``seconds``: from start to end (None if it never started)."""

    def agent_error(self, reason: str) -> None:
        """An exchange with an agent failed (``AgentError.reason``)."""

    def bytes_stored(self, nbytes: int) -> None:
        """A backup's objects were confirmed (stored sizes)."""

    def takeover(self) -> None:
        """A RUNNING job whose holder stopped renewing was taken over."""


@dataclass
class _Held:
    lease: Lease
    task: asyncio.Task[None] | None = None
    renewed_until: datetime | None = None


class JobRunner:
    """Claims and drives jobs on one replica. ``start``/``stop`` run the loops; tests may
    call :meth:`run_once` (claim what can be claimed now and start driving it) and
    :meth:`idle` (wait until every driven job has ended or was given up)."""

    def __init__(
        self,
        store: Database,
        box: SecretBox,
        settings: RunnerSettings,
        *,
        replica_id: str,
        clock: Clock | None = None,
        opener: StoreOpener = open_store,
        observer: RunnerObserver | None = None,
        sweeper: RetentionSweeper | None = None,
    ) -> None:
        self.db = store
        self.box = box
        self.settings = settings
        self.replica_id = replica_id
        self.clock = clock or SystemClock()
        self.opener = opener
        self.observer = observer or RunnerObserver()
        self.sweeper = sweeper or RetentionSweeper(
            store,
            box,
            interval=settings.retention_sweep_seconds,
            storage_timeout=settings.storage_timeout_seconds,
            clock=self.clock,
            opener=opener,
            job_history_days=settings.job_history_days,
            audit_retention_days=settings.audit_retention_days,
        )
        if self.sweeper.resolver is None:
            self.sweeper.resolver = self.resolve_abandoned
        self.object_stores = StoreCache(opener)
        self._run_context = JobRunContext(
            db=store,
            box=box,
            clock=self.clock,
            settings=RunSettings(
                max_attempts=settings.max_attempts,
                job_deadline_seconds=settings.job_deadline_seconds,
                agent_poll_min_seconds=settings.agent_poll_min_seconds,
                agent_poll_max_seconds=settings.agent_poll_max_seconds,
                agent_unreachable_seconds=settings.agent_unreachable_seconds,
                log_max_bytes=settings.log_max_bytes,
                job_log_budget_bytes=settings.job_log_budget_bytes,
                verify_uploads=settings.verify_uploads,
                storage_timeout_seconds=settings.storage_timeout_seconds,
                retention_enabled=settings.retention_enabled,
            ),
            agent_for=self.client_for,
            object_stores=self.object_stores,
            sweeper=self.sweeper,
            recorder=self.observer,
            spawn=self.spawn,
        )
        self._held: dict[str, _Held] = {}
        self._wake = asyncio.Event()
        self.queue = jobs.QueueView(refresh_seconds=max(30.0, 6 * settings.poll_seconds))
        self.window = backpressure.ClaimWindow(settings.concurrency)
        self._new_jobs = True  # jobs may have been queued since the last pass read the queue
        self._queue_read_at = self.clock.now()
        self._yielding_since: datetime | None = None  # claims wait for the scheduler since
        self._trickled_at: datetime | None = None  # the last job started while waiting
        self._loops: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = agent_session(limit=64, limit_per_host=4)
        return self._session

    @property
    def active(self) -> int:
        """Jobs this replica drives now."""
        return len(self._held)

    async def start(self) -> None:
        self._stopping = False
        if not self._loops:
            self._loops = [
                asyncio.create_task(self._claim_loop(), name="runner-claim"),
                asyncio.create_task(self._renew_loop(), name="runner-renew"),
            ]
        log.info(
            "runner_started",
            replica=self.replica_id,
            concurrency=self.settings.concurrency,
            lease_seconds=self.settings.lease_seconds,
        )

    async def stop(self) -> None:
        """Stop claiming, stop driving, and release every held lease so that another
        replica (or this one restarted) resumes those jobs at once; the jobs stay RUNNING
        on their agents meanwhile and are re-attached, not restarted."""
        self._stopping = True
        loops, self._loops = self._loops, []
        for task in loops:
            task.cancel()
        held = list(self._held.values())
        for h in held:
            if h.task is not None:
                h.task.cancel()
        pending = [t for t in [*loops, *(h.task for h in held if h.task)] if t is not None]
        pending += list(self._side_tasks)
        for task in self._side_tasks:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        at = self.clock.now()
        for h in held:
            try:
                if await jobs.release(self.db, h.lease, at=at):
                    log.info("lease_released", job_id=h.lease.job_id, replica=self.replica_id)
            except PyMongoError:
                log.warning("lease_release_failed", job_id=h.lease.job_id)
        self._held.clear()
        await self.object_stores.close()
        if self._session is not None:
            await self._session.close()
            self._session = None
        log.info("runner_stopped", replica=self.replica_id, released=len(held))

    def wake(self) -> None:
        """Jobs were queued (on this replica): claim at once."""
        self._new_jobs = True
        self._wake.set()

    async def idle(self) -> None:
        """Wait until no job is being driven by this replica (tests)."""
        while self._held:
            tasks = [h.task for h in self._held.values() if h.task is not None]
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            else:
                await asyncio.sleep(0)
        while self._side_tasks:
            await asyncio.gather(*list(self._side_tasks), return_exceptions=True)

    # ------------------------------------------------------------------ claiming

    async def run_once(self, *, looking: bool = True, most: int | None = None) -> int:
        """Claim what this replica may take now and start driving it; returns how many.
        ``looking=False`` (the claim loop's passes between polls, when this replica queued
        nothing): claim from the queue as last read, without looking for new jobs.
        ``most``: claim at most that many, whatever the claim window (while a scheduler is
        behind: ``backup.backpressure``)."""
        if most is None:
            free = self.window.jobs - len(self._held)
        else:
            free = min(self.settings.concurrency - len(self._held), most)
        if most is None and free <= 0:
            self.window.filled()
        if free <= 0 or self._stopping:
            return 0
        now = self.clock.now()
        # Other replicas' new jobs are looked for every poll; this one's as it queues them.
        polled = (now - self._queue_read_at).total_seconds() >= self.settings.poll_seconds
        new_jobs, self._new_jobs = looking or self._new_jobs or polled, False
        if new_jobs:
            self._queue_read_at = now
        candidates = await self.queue.candidates(
            self.db, now, limit=free + len(self._held), new_jobs=new_jobs
        )
        claimed = 0
        tried: set[str] = set()
        for cand in candidates:
            if claimed >= free:
                if most is None:
                    self.window.filled()
                break
            if cand["_id"] in self._held or cand["instance_id"] in tried:
                continue
            tried.add(cand["instance_id"])
            lease = await jobs.try_claim(
                self.db,
                cand,
                owner=self.replica_id,
                at=now,
                lease_seconds=self.settings.lease_seconds,
                deadline_seconds=self.settings.job_deadline_seconds,
            )
            if lease != jobs.ClaimRefusal.BUSY:
                self.queue.forget(cand["_id"])
            if not isinstance(lease, Lease):
                continue
            claimed += 1
            if cand["status"] == JobStatus.QUEUED:
                lag = None
                if cand.get("scheduled_for") is not None:
                    lag = max(0.0, (now - cand["scheduled_for"]).total_seconds())
                self.observer.job_started(cand.get("type", ""), cand.get("trigger", ""), lag)
            else:
                self.observer.takeover()
            held = _Held(lease, renewed_until=now + _delta(self.settings.lease_seconds))
            self._held[lease.job_id] = held
            held.task = asyncio.create_task(self._drive(held), name=f"job-{lease.job_id}")
            log.info(
                "job_claimed",
                job_id=lease.job_id,
                instance_id=cand["instance_id"],
                replica=self.replica_id,
                attempt=lease.token,
                takeover=cand["status"] != JobStatus.QUEUED,
            )
        return claimed

    async def _yield_to_scheduler(self) -> int | None:
        """How many jobs this pass may claim: None (any number: no scheduler is behind),
        0 (a scheduler asked runners to wait, ``backup.backpressure``: this waited as asked),
        or 1 (one job every ``MAX_YIELD_SECONDS`` while the notice lasts: a backlog of
        fires must not stop every backup, and a burst of claims would deepen it)."""
        now = self.clock.now()
        last_start = self._trickled_at or self._yielding_since
        if last_start is not None and (
            (now - last_start).total_seconds() >= backpressure.MAX_YIELD_SECONDS
        ):
            self._trickled_at = now
            return 1
        try:
            until = await backpressure.yield_until(self.db, now)
        except PyMongoError:
            until = None
        if until is None:
            if self._yielding_since is not None:
                log.info(
                    "runner_resumed",
                    replica=self.replica_id,
                    yielded_seconds=round((now - self._yielding_since).total_seconds(), 2),
                )
            self._yielding_since = self._trickled_at = None
            return None
        if self._yielding_since is None:
            self._yielding_since = now
            self.window.halve(now)
            log.info(
                "runner_yielding_to_scheduler", replica=self.replica_id, window=self.window.jobs
            )
        await self.clock.sleep(min((until - now).total_seconds(), backpressure.HOLD_SECONDS))
        return 0

    async def _claim_loop(self) -> None:
        while True:
            self._wake.clear()
            started = self.clock.now()
            try:
                most = await self._yield_to_scheduler()
                if most == 0:
                    continue
                if most is None:
                    self.window.open(self.clock.now())
                await self.run_once(looking=False, most=most)
            except asyncio.CancelledError:
                raise
            except PyMongoError as exc:
                log.warning("claim_failed", error=type(exc).__name__)
            except Exception:
                log.exception("claim_failed")
            # Every job that ends asks for a pass, and a pass reads (the RUNNING jobs, and
            # the queue when a full read is due: on the embedded database that one costs
            # time in proportion to the queue's length). Back to back, reads would take the
            # database from the scheduler and from the jobs running, so the next pass waits
            # until CLAIM_SPACING times this pass's reads has passed since it began: ending
            # jobs are claimed together, and reading takes at most about a fifth of the
            # database's time. The claims are not counted: they are the work.
            spent = (self.clock.now() - started).total_seconds()
            spacing = min(CLAIM_SPACING * self.queue.read_seconds, self.settings.poll_seconds)
            spacing -= spent
            if spacing > 0:
                await self.clock.sleep(spacing)
            await self.clock.wait(self._wake, self.settings.poll_seconds)

    async def _renew_loop(self) -> None:
        interval = self.settings.lease_seconds / 3
        while True:
            await self.clock.sleep(interval)
            await self.renew_once()

    async def renew_once(self) -> None:
        """Renew the lease of every job held; stop driving those whose lease was lost."""
        for job_id, held in list(self._held.items()):
            now = self.clock.now()
            try:
                ok: bool | None = await jobs.renew(
                    self.db, held.lease, at=now, lease_seconds=self.settings.lease_seconds
                )
            except PyMongoError:
                ok = None
            if ok:
                held.renewed_until = now + _delta(self.settings.lease_seconds)
                continue
            if ok is False and await self._ended_by_us(held):
                continue  # its task is finishing (forgetting the agent job, retention)
            lapsed = held.renewed_until is not None and self.clock.now() >= held.renewed_until
            if ok is False or lapsed:
                # Someone else holds it now (or may, once our lease ran out): stop at once.
                log.warning("lease_lost", job_id=job_id, replica=self.replica_id)
                if held.task is not None:
                    held.task.cancel()

    async def _ended_by_us(self, held: _Held) -> bool:
        """Whether a renewal failed only because the job just ended under this lease (the
        renewal raced the job's last write): cancelling its task then would cut short what
        follows the end, and it would be reported as a lost lease."""
        try:
            return await jobs.ended_under(self.db, held.lease)
        except PyMongoError:
            return False

    # ------------------------------------------------------------------ driving

    async def _drive(self, held: _Held) -> None:
        lease = held.lease
        try:
            job = await self.db.jobs.find_one({"_id": lease.job_id})
            if job is not None and job.get("status") == JobStatus.RUNNING:
                run = DrillRun if job.get("type") == JobType.DRILL else JobRun
                await run(self._run_context, lease, job).run()
        except LeaseLost:
            log.warning("lease_lost", job_id=lease.job_id, replica=self.replica_id)
        except asyncio.CancelledError:
            pass  # stopping, or the lease was lost: the job stays for whoever holds it next
        except PyMongoError as exc:
            # The database is away: the job's state cannot be written. Stop driving it; the
            # lease runs out and a replica resumes it (re-attaching) once the database is back.
            log.warning(
                "job_paused_database_unavailable", job_id=lease.job_id, error=type(exc).__name__
            )
        except Exception:
            log.exception("job_driver_failed", job_id=lease.job_id)
            with contextlib.suppress(Exception):
                await jobs.finish(
                    self.db,
                    lease,
                    JobStatus.FAILED,
                    "The manager hit an internal error while running this job; its logs "
                    "name the cause.",
                    at=self.clock.now(),
                )
        finally:
            self._held.pop(lease.job_id, None)
            self._wake.set()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """A side task (retention after a backup) that ``stop`` and ``idle`` account for."""
        task = asyncio.create_task(coro, name=name)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    def client_for(self, instance: Document, *, log_limit: int) -> AgentClient:
        """The agent of ``instance``, with its password opened in memory only."""
        agent = instance.get("agent") or {}
        if not agent.get("url"):
            raise JobEnd(JobStatus.FAILED, "The instance has no agent registered.")
        try:
            opened = self.box.open_map(
                instance.get("secrets") or {}, f"instances/{instance['_id']}"
            )
        except SecretKeyError:
            raise JobEnd(
                JobStatus.FAILED,
                "The instance's agent credentials cannot be opened with the configured master "
                "keys (SECRETS_MASTER_KEYS).",
            ) from None
        return AgentClient(
            agent["url"],
            agent.get("username") or "",
            SecretStr(opened.get("agent_password", "")),
            session=self.session,
            timeout=self.settings.agent_timeout_seconds,
            log_limit=log_limit,
        )

    async def resolve_abandoned(self, entry: Document) -> str | None:
        """For the retention sweep: the object an agent job abandoned at its deadline
        uploaded in the end (its key), GONE if it uploaded nothing, None if not known yet."""
        instance = await self.db.instances.find_one({"_id": entry.get("instance_id")})
        if instance is None:
            return None
        try:
            client = self.client_for(instance, log_limit=256)
            info = await client.status()
            state = await client.get(AgentJobKind.BACKUP, entry["agent_job_id"])
        except JobEnd:
            return None
        except AgentError as exc:
            return GONE if exc.reason == AgentFailure.NOT_FOUND else None
        if not state.finished:
            return None
        # Its outcome is known now: the agent may forget the job (the Go agent keeps every job
        # in memory until told so). Best effort: a failure only leaves it there.
        with contextlib.suppress(AgentError):
            await client.forget(AgentJobKind.BACKUP, entry["agent_job_id"])
        if state.status != JobStatus.SUCCEEDED:
            return GONE
        return (
            object_key(info.kind, entry.get("type", "S3"), entry.get("prefix", ""), state) or GONE
        )


def _delta(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)
