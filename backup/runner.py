"""The job runner: claims queued jobs, drives them on the instance's agent, records results.

Every manager replica runs one. The database is the only coordination (see the lease notes in
``backup.jobs``): a replica claims a job with a compare-and-set and holds it with a lease it
renews; a replica that dies stops renewing, and another one takes the job over and re-attaches
to the agent's job by its id (``<job id>-<item index>``), so a backup is never started twice.
At most one job per instance runs at a time (a unique partial index), and at most
``RUNNER_CONCURRENCY`` per replica.

A job always ends: every wait is bounded (agent unreachable, agent busy, the job's
deadline), an agent that forgets a job fails it, and a replica that keeps crashing on one job
fails it after ``RUNNER_MAX_ATTEMPTS`` take-overs. The agent runs its unlock scripts by itself
whatever the manager does; the manager cannot abort a script, so a cancelled or timed-out job
ends here while the agent finishes on its own (see docs/jobs.md).

A backup is SUCCEEDED only when every item is and every object is confirmed in storage; its
restore point (id = job id) is written before the job is marked SUCCEEDED, so a crash between
the two is repaired by whoever takes the job over. A backup that does not succeed deletes the
files its items uploaded, or records them on the job (``pending_deletes``) for the retention
sweep: no file is left in storage without a record leading to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import structlog
from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pymongo.errors import PyMongoError

from backup import agent_client, destinations, jobs, restore_points
from backup.agent_client import GO, AgentClient, AgentError, AgentInfo, AgentJob
from backup.clock import Clock, SystemClock
from backup.jobs import (
    BACKUP,
    CANCELLED,
    FAILED,
    FINAL,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Lease,
    LeaseLost,
)
from backup.restore_points import StoreOpener
from backup.retention import GONE, RetentionSweeper, expires_at
from backup.secrets import SecretBox, SecretKeyError
from backup.store import Document, Store
from storage import ObjectNotFound, ObjectStore, StorageError, open_store

log = structlog.get_logger(__name__)

STAGES_PER_ITEM = 10  # log entries an agent job reports at most (5 stages, stdout + stderr)
CLAIM_SPACING = 5  # a claim pass starts at least this many times its predecessor's duration later


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

    @model_validator(mode="after")
    def _coherent(self) -> RunnerSettings:
        if self.agent_poll_max_seconds < self.agent_poll_min_seconds:
            raise ValueError("RUNNER_AGENT_POLL_MAX_SECONDS must be >= the min")
        return self


def load_runner_settings() -> RunnerSettings:
    """The runner settings from the environment, or ``ValueError`` naming each bad one."""
    try:
        return RunnerSettings()
    except ValidationError as exc:
        lines = [
            f"{'.'.join(str(p) for p in err['loc']).upper() or 'RUNNER'}: {err['msg']}"
            for err in exc.errors(include_input=False)
        ]
        raise ValueError("invalid runner configuration:\n  " + "\n  ".join(lines)) from None


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


class _End(Exception):
    """Ends the job in a final state with a reason."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _ItemFailed(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _Deadline(Exception):
    pass


@dataclass
class _Held:
    lease: Lease
    task: asyncio.Task[None] | None = None
    renewed_until: datetime | None = None


def _seconds(delta: Any) -> float | None:
    return delta.total_seconds() if delta is not None else None


def _human(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)} min"
    return f"{seconds:g} s"


def object_key(info_kind: str, dest_type: str, sent_prefix: str, state: AgentJob) -> str | None:
    """The object name (in the bucket or container) an agent job uploaded. Ours reports it;
    the Go agent stores S3 objects under ``filenamePrefix + filename`` and Swift objects
    under the bare file name."""
    if state.stored_key:
        return state.stored_key
    if not state.filename:
        return None
    if info_kind == GO and dest_type == "SWIFT":
        return state.filename
    return (state.filename_prefix or sent_prefix) + state.filename


@dataclass
class _OpenStore:
    store: ObjectStore
    users: int = 0
    broken: bool = False


class StoreCache:
    """Object stores kept open across jobs, one per distinct destination settings
    (credentials included, in memory only), for the runner's checks of uploaded objects.

    Opening a store builds a storage client: on S3 that costs 10 to 140 ms of CPU (botocore
    reads its service models), spent on the event loop that the replica's scheduler shares,
    once per backup. Reused, it costs one request. Bounded: beyond ``size`` the least
    recently used store not in use is closed. A store whose use raised is closed once free
    and never handed out again, so a broken connection is not kept."""

    def __init__(self, opener: StoreOpener, size: int = 16) -> None:
        self.opener = opener
        self.size = size
        self._open: OrderedDict[str, _OpenStore] = OrderedDict()
        self.opened = 0  # stores opened since start (for tests and benchmarks)

    @staticmethod
    def key(settings: destinations.AnySettings) -> str:
        fields = settings.model_dump(mode="json")
        secret = destinations.SECRET_FIELD[settings.type]
        fields[secret] = getattr(settings, secret).get_secret_value()
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    @contextlib.asynccontextmanager
    async def use(self, settings: destinations.AnySettings) -> AsyncIterator[ObjectStore]:
        key = self.key(settings)
        entry = self._open.get(key)
        if entry is None:
            entry = self._open[key] = _OpenStore(self.opener(settings))
            self.opened += 1
        self._open.move_to_end(key)
        entry.users += 1
        try:
            yield entry.store
        except BaseException:
            entry.broken = True
            raise
        finally:
            entry.users -= 1
            if entry.broken:
                if self._open.get(key) is entry:
                    del self._open[key]  # never handed out again
                if entry.users == 0:
                    await _close_store(entry.store)
            await self._trim()

    async def _trim(self) -> None:
        for key, entry in list(self._open.items()):  # least recently used first
            if len(self._open) <= self.size:
                return
            if entry.users == 0 and self._open.get(key) is entry:
                del self._open[key]
                await _close_store(entry.store)

    async def close(self) -> None:
        entries = list(self._open.values())
        self._open.clear()
        for entry in entries:
            await _close_store(entry.store)


async def _close_store(store: ObjectStore) -> None:
    with contextlib.suppress(Exception):
        await store.aclose()


class JobRunner:
    """Claims and drives jobs on one replica. ``start``/``stop`` run the loops; tests may
    call :meth:`run_once` (claim what can be claimed now and start driving it) and
    :meth:`idle` (wait until every driven job has ended or was given up)."""

    def __init__(
        self,
        store: Store,
        box: SecretBox,
        settings: RunnerSettings,
        *,
        replica_id: str,
        clock: Clock | None = None,
        opener: StoreOpener = open_store,
        observer: RunnerObserver | None = None,
        sweeper: RetentionSweeper | None = None,
    ) -> None:
        self.store = store
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
        )
        if self.sweeper.resolver is None:
            self.sweeper.resolver = self.resolve_abandoned
        self.stores = StoreCache(opener)
        self._held: dict[str, _Held] = {}
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, limit_per_host=4),
            )
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
                if await jobs.release(self.store, h.lease, at=at):
                    log.info("lease_released", job_id=h.lease.job_id, replica=self.replica_id)
            except PyMongoError:
                log.warning("lease_release_failed", job_id=h.lease.job_id)
        self._held.clear()
        await self.stores.close()
        if self._session is not None:
            await self._session.close()
            self._session = None
        log.info("runner_stopped", replica=self.replica_id, released=len(held))

    def wake(self) -> None:
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

    async def run_once(self) -> int:
        """Claim what this replica may take now and start driving it; returns how many."""
        free = self.settings.concurrency - len(self._held)
        if free <= 0 or self._stopping:
            return 0
        now = self.clock.now()
        candidates = await jobs.claimable(self.store, now, limit=free + len(self._held))
        claimed = 0
        tried: set[str] = set()
        for cand in candidates:
            if claimed >= free:
                break
            if cand["_id"] in self._held or cand["instance_id"] in tried:
                continue
            tried.add(cand["instance_id"])
            lease = await jobs.claim(
                self.store,
                cand,
                owner=self.replica_id,
                at=now,
                lease_seconds=self.settings.lease_seconds,
                deadline_seconds=self.settings.job_deadline_seconds,
            )
            if lease is None:
                continue
            claimed += 1
            if cand["status"] == QUEUED:
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
                takeover=cand["status"] != QUEUED,
            )
        return claimed

    async def _claim_loop(self) -> None:
        while True:
            self._wake.clear()
            started = self.clock.now()
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except PyMongoError as exc:
                log.warning("claim_failed", error=type(exc).__name__)
            except Exception:
                log.exception("claim_failed")
            # A pass reads the queue, and on the embedded database that costs time in
            # proportion to the queue's length (0.3 s at 8,000 queued jobs), while every job
            # that ends asks for a pass: back to back, passes would take the database from
            # the scheduler and from the jobs running. So the next pass waits until
            # CLAIM_SPACING times this one's duration has passed: ending jobs are claimed
            # together, and claiming takes at most about a fifth of the database's time
            # however long the queue (on MongoDB a pass takes milliseconds: no wait).
            spent = (self.clock.now() - started).total_seconds()
            spacing = min(CLAIM_SPACING * spent, self.settings.poll_seconds) - spent
            if spacing > 0:
                await self.clock.sleep(spacing)
            await self.clock.wait(self._wake, self.settings.poll_seconds)

    async def _renew_loop(self) -> None:
        interval = self.settings.lease_seconds / 3
        while True:
            await self.clock.sleep(interval)
            for job_id, held in list(self._held.items()):
                now = self.clock.now()
                try:
                    ok: bool | None = await jobs.renew(
                        self.store, held.lease, at=now, lease_seconds=self.settings.lease_seconds
                    )
                except PyMongoError:
                    ok = None
                if ok:
                    held.renewed_until = now + _delta(self.settings.lease_seconds)
                    continue
                lapsed = held.renewed_until is not None and self.clock.now() >= held.renewed_until
                if ok is False or lapsed:
                    # Someone else holds it now (or may, once our lease ran out): stop at once.
                    log.warning("lease_lost", job_id=job_id, replica=self.replica_id)
                    if held.task is not None:
                        held.task.cancel()

    # ------------------------------------------------------------------ driving

    async def _drive(self, held: _Held) -> None:
        lease = held.lease
        try:
            job = await self.store.jobs.find_one({"_id": lease.job_id})
            if job is not None and job.get("status") == RUNNING:
                await _JobRun(self, lease, job).run()
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
                    self.store,
                    lease,
                    FAILED,
                    "The manager hit an internal error while running this job; its logs "
                    "name the cause.",
                    at=self.clock.now(),
                )
        finally:
            self._held.pop(lease.job_id, None)
            self._wake.set()

    def spawn(self, coro: Any, name: str) -> None:
        """A side task (retention after a backup) that ``stop`` and ``idle`` account for."""
        task = asyncio.create_task(coro, name=name)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    def client_for(self, instance: Document, *, log_limit: int) -> AgentClient:
        """The agent of ``instance``, with its password opened in memory only."""
        agent = instance.get("agent") or {}
        if not agent.get("url"):
            raise _End(FAILED, "The instance has no agent registered.")
        try:
            opened = self.box.open_map(
                instance.get("secrets") or {}, f"instances/{instance['_id']}"
            )
        except SecretKeyError:
            raise _End(
                FAILED,
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
        instance = await self.store.instances.find_one({"_id": entry.get("instance_id")})
        if instance is None:
            return None
        try:
            client = self.client_for(instance, log_limit=256)
            info = await client.status()
            state = await client.get("backup", entry["agent_job_id"])
        except _End:
            return None
        except AgentError as exc:
            return GONE if exc.reason == "not_found" else None
        if not state.finished:
            return None
        if state.status != SUCCEEDED:
            return GONE
        return (
            object_key(info.kind, entry.get("type", "S3"), entry.get("prefix", ""), state) or GONE
        )


def _delta(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


@dataclass
class _Prepared:
    instance: Document
    dest: Document
    settings: destinations.AnySettings
    client: AgentClient
    info: AgentInfo | None = None
    plan: Document | None = None
    point: Document | None = None
    encryption_key: str | None = field(default=None, repr=False)
    db_password: str = field(default="", repr=False)
    prefix: str = ""
    cancel_seen: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class _JobRun:
    """One claim of one job, from its current state to a final one."""

    def __init__(self, runner: JobRunner, lease: Lease, job: Document) -> None:
        self.r = runner
        self.s = runner.settings
        self.clock = runner.clock
        self.store = runner.store
        self.lease = lease
        self.job = job
        self.items: list[Document] = [dict(i) for i in job.get("items") or []]
        self.kind: agent_client.Kind = "backup" if job["type"] == BACKUP else "restore"
        self.log = log.bind(job_id=job["_id"], instance_id=job["instance_id"], type=job["type"])
        self.p: _Prepared | None = None

    # ------------------------------------------------------------------ top level

    async def run(self) -> None:
        try:
            await self._run()
        except _End as end:
            await self._end(end.status, end.reason)

    async def _run(self) -> None:
        job = self.job
        if job["type"] == BACKUP and await self._point_exists():
            # A previous holder wrote the restore point and died before ending the job.
            await self._finish(
                SUCCEEDED, None, fields={"restore_point_id": job["_id"], "items": self.items}
            )
            return
        on_agent = any(i.get("status") == RUNNING for i in self.items)
        if not on_agent and await self._cancel_requested():  # before anything reaches it
            raise _End(CANCELLED, await self._cancel_reason())
        if self.lease.token > self.s.max_attempts:
            raise _End(
                FAILED,
                f"The job was taken over {self.lease.token - 1} times (the replicas running "
                "it kept stopping); it is not tried again.",
            )
        if self._past_deadline():
            raise _End(FAILED, self._deadline_reason(None))
        for item in self.items:
            if item.get("status") == FAILED:  # ended by an earlier holder that then died
                raise _End(FAILED, f"Item {item['name']!r} failed: {item.get('error')}")
        self.p = await self._prepare()
        self.p.info = await self._agent_info()
        await self._write({"agent": {"kind": self.p.info.kind, "version": self.p.info.version}})
        for index, item in enumerate(self.items):
            if item.get("status") == SUCCEEDED:
                continue
            if await self._cancel_requested():
                raise _End(CANCELLED, await self._cancel_reason())
            try:
                await self._run_item(index, item)
            except _ItemFailed as exc:
                await self._item_ended(index, FAILED, exc.message)
                raise _End(FAILED, f"Item {item['name']!r} failed: {exc.message}") from None
            except _Deadline:
                raise _End(FAILED, self._deadline_reason(index)) from None
        if self.job["type"] == BACKUP:
            await self._complete_backup()
        else:
            reason = None
            if self.p.cancel_seen:
                reason = "A cancel was requested while the last item ran; it had to complete."
            await self._finish(SUCCEEDED, reason)

    # ------------------------------------------------------------------ preparation

    async def _prepare(self) -> _Prepared:
        job, box = self.job, self.r.box
        instance = await self.store.instances.find_one({"_id": job["instance_id"]})
        if instance is None or instance.get("state") in ("deprovisioning", "deleted"):
            raise _End(FAILED, "The service instance is no longer registered.")
        dest = await self.store.destinations.find_one({"_id": job["destination_id"]})
        if dest is None:
            raise _End(FAILED, "The job's destination no longer exists.")
        try:
            settings = destinations.settings_for(dest, box)
            opened = box.open_map(instance.get("secrets") or {}, f"instances/{instance['_id']}")
        except SecretKeyError:
            raise _End(
                FAILED,
                "Stored credentials cannot be opened with the configured master keys "
                "(SECRETS_MASTER_KEYS).",
            ) from None
        budget = self.s.job_log_budget_bytes // max(1, len(self.items) * STAGES_PER_ITEM)
        client = self.r.client_for(instance, log_limit=max(1024, min(self.s.log_max_bytes, budget)))
        p = _Prepared(
            instance, dest, settings, client, db_password=opened.get("database_password", "")
        )
        if job["type"] == BACKUP:
            plan = await self.store.plans.find_one({"_id": job.get("plan_id")})
            p.plan = plan
            if (job.get("encryption") or {}).get("enabled"):
                if plan is None:
                    raise _End(
                        FAILED,
                        "The plan was deleted, and with it the encryption key this backup needs.",
                    )
                try:
                    key = box.open_map(plan.get("secrets") or {}, f"plans/{plan['_id']}").get(
                        "encryption_key"
                    )
                except SecretKeyError:
                    key = None
                if not key:
                    raise _End(FAILED, "The plan's encryption key cannot be opened.")
                p.encryption_key = key
            p.prefix = f"{settings.prefix}{instance['_id']}/{job.get('plan_id') or 'manual'}/"
        else:
            point = await self.store.restore_points.find_one({"_id": job.get("restore_point_id")})
            if point is None:
                raise _End(FAILED, "The restore point to restore from no longer exists.")
            if point.get("state") != restore_points.AVAILABLE:
                raise _End(FAILED, "The restore point to restore from is being deleted.")
            p.point = point
            try:
                p.encryption_key = restore_points.encryption_key(box, point)
            except SecretKeyError:
                raise _End(FAILED, "The restore point's encryption key cannot be opened.") from None
        return p

    async def _agent_info(self) -> AgentInfo:
        """``GET /status``, retried while the agent is unreachable (bounded)."""
        assert self.p is not None
        since = self.clock.now()
        delay = self.s.agent_poll_min_seconds
        while True:
            try:
                return await self.p.client.status()
            except AgentError as exc:
                self.r.observer.agent_error(exc.reason)
                waited = (self.clock.now() - since).total_seconds()
                if not exc.transient:
                    raise _End(FAILED, f"{_sentence(exc.message)}.") from None
                if waited >= self.s.agent_unreachable_seconds:
                    raise _End(
                        FAILED,
                        f"{_sentence(exc.message)}; still so after "
                        f"{_human(self.s.agent_unreachable_seconds)}.",
                    ) from None
                if self._past_deadline():
                    raise _End(FAILED, self._deadline_reason(None)) from None
                if await self._cancel_requested():
                    raise _End(CANCELLED, await self._cancel_reason()) from None
                self.log.info("agent_unreachable", error=exc.reason, waited=round(waited, 1))
            await self.clock.sleep(delay)
            delay = min(delay * 2, self.s.agent_poll_max_seconds)

    # ------------------------------------------------------------------ items

    def _request(self, index: int, item: Document, agent_job_id: str) -> dict[str, Any]:
        p = self.p
        assert p is not None and p.info is not None
        db = p.instance.get("database") or {}
        section = agent_client.database_section(
            host=str(db.get("host") or ""),
            username=str(db.get("username") or ""),
            password=p.db_password,
            database=item["name"],
            port=db.get("port"),
            parameters=db.get("parameters"),
        )
        checksum = None  # of the stored object: a restore has the agent verify its download
        if self.kind == "backup":
            compression, encryption = agent_client.backup_modes(
                p.info,
                bool(self.job.get("compression")),
                bool((self.job.get("encryption") or {}).get("enabled")),
            )
            dest = agent_client.destination(
                p.settings, filename_prefix=self._item_prefix(agent_job_id)
            )
        else:
            stored = self._point_item(item["name"])
            compression, encryption = stored.get("compression"), stored.get("encryption")
            checksum = stored.get("checksum")
            missing = agent_client.missing_capabilities(p.info, compression, encryption)
            if missing:
                raise _ItemFailed(
                    "the agent cannot reverse how this backup was stored (it lacks "
                    f"{', '.join(missing)}); restore it with an agent that has them"
                )
            key = stored.get("key") or ""
            head, _, filename = key.rpartition("/")
            if not filename:
                raise _ItemFailed("the restore point does not record the stored object's name")
            dest = agent_client.destination(
                p.settings, filename_prefix=f"{head}/" if head else "", filename=filename
            )
        p.extra[agent_job_id] = (compression, encryption)
        return agent_client.job_request(
            self.kind,
            agent_job_id=agent_job_id,
            info=p.info,
            compression=compression,
            encryption=encryption,
            encryption_key=p.encryption_key,
            destination=dest,
            section=section,
            checksum=checksum,
        )

    def _point_item(self, name: str) -> Document:
        assert self.p is not None and self.p.point is not None
        for stored in self.p.point.get("items") or []:
            if stored.get("name") == name:
                return stored
        raise _ItemFailed(f"the restore point has no item {name!r}")

    async def _run_item(self, index: int, item: Document) -> None:
        agent_job_id = item.get("agent_job_id") or f"{self.job['_id']}-{index}"
        request = self._request(index, item, agent_job_id)  # holds secrets: never logged
        state: AgentJob | None = None
        if item.get("status") != RUNNING:
            # Not known to have reached the agent: (re)send it. The same id answers 409 with
            # its state if an earlier holder's request did reach it.
            item.update(
                agent_job_id=agent_job_id, started_at=item.get("started_at") or self.clock.now()
            )
            await self._write(
                {
                    f"items.{index}.agent_job_id": agent_job_id,
                    f"items.{index}.started_at": item["started_at"],
                }
            )
            state = await self._start_on_agent(agent_job_id, request)
            item["status"] = RUNNING
            await self._write({f"items.{index}.status": RUNNING})
            self.log.info(
                "agent_job_started" if state is None else "agent_job_attached",
                agent_job_id=agent_job_id,
                item=index,
            )
        else:
            self.log.info("agent_job_resumed", agent_job_id=agent_job_id, item=index)
        state = await self._poll(index, agent_job_id, state)
        try:
            await self._record(index, item, agent_job_id, state)
        except _ItemFailed:
            await self._forget(agent_job_id)
            raise
        await self._forget(agent_job_id)

    async def _forget(self, agent_job_id: str) -> None:
        """Once an item's outcome is recorded, the agent may forget its job: the Go agent
        keeps every job in memory until told so. Best effort."""
        assert self.p is not None
        try:
            await self.p.client.forget(self.kind, agent_job_id)
        except AgentError as exc:
            self.log.info("agent_forget_failed", agent_job_id=agent_job_id, error=exc.reason)

    async def _start_on_agent(self, agent_job_id: str, request: dict[str, Any]) -> AgentJob | None:
        assert self.p is not None
        since = self.clock.now()
        delay = self.s.agent_poll_min_seconds
        while True:
            try:
                return await self.p.client.start(self.kind, request)
            except AgentError as exc:
                self.r.observer.agent_error(exc.reason)
                if not exc.transient:
                    raise _ItemFailed(exc.message) from None
                waited = (self.clock.now() - since).total_seconds()
                if waited >= self.s.agent_unreachable_seconds:
                    raise _ItemFailed(
                        f"{exc.message}; still so after {_human(self.s.agent_unreachable_seconds)}"
                    ) from None
                if self._past_deadline():
                    raise _Deadline() from None
                if await self._cancel_requested():
                    # The request may have reached the agent before its answer was lost; it
                    # is asked once more below so that a started job is seen, not forgotten.
                    with contextlib.suppress(AgentError):
                        existing = await self.p.client.get(self.kind, agent_job_id)
                        return existing
                    raise _End(CANCELLED, await self._cancel_reason()) from None
                self.log.info("agent_start_retry", error=exc.reason, waited=round(waited, 1))
            await self.clock.sleep(delay)
            delay = min(delay * 2, self.s.agent_poll_max_seconds)

    async def _poll(self, index: int, agent_job_id: str, state: AgentJob | None) -> AgentJob:
        assert self.p is not None
        delay = self.s.agent_poll_min_seconds
        unreachable_since: datetime | None = None
        last_stage = self.items[index].get("stage")
        while state is None or not state.finished:
            if self._past_deadline():
                raise _Deadline()
            if not self.p.cancel_seen and await self._cancel_requested():
                self.p.cancel_seen = True
                self.log.info("cancel_noted", item=index)
            await self.clock.sleep(delay)
            delay = min(delay * 1.5, self.s.agent_poll_max_seconds)
            try:
                state = await self.p.client.get(self.kind, agent_job_id)
                unreachable_since = None
            except AgentError as exc:
                self.r.observer.agent_error(exc.reason)
                if exc.reason == "not_found":
                    raise _ItemFailed(
                        f"{exc.message}; its outcome is unknown, and the agent runs its unlock "
                        "script on its own"
                    ) from None
                if not exc.transient:
                    raise _ItemFailed(exc.message) from None
                now = self.clock.now()
                unreachable_since = unreachable_since or now
                waited = (now - unreachable_since).total_seconds()
                if waited >= self.s.agent_unreachable_seconds:
                    raise _ItemFailed(
                        f"{exc.message}; no answer for {_human(self.s.agent_unreachable_seconds)}"
                    ) from None
                state = None
                continue
            if state.state and state.state != last_stage and not state.finished:
                last_stage = state.state
                self.items[index]["stage"] = state.state
                await self._write({f"items.{index}.stage": state.state})
        return state

    async def _record(self, index: int, item: Document, agent_job_id: str, state: AgentJob) -> None:
        p = self.p
        assert p is not None and p.info is not None
        now = self.clock.now()
        item.update(logs=state.logs, ended_at=now, stage=state.state)
        if state.status != SUCCEEDED:
            message = state.error_message or state.message or "the agent reported a failure"
            item.update(status=FAILED, error=_cap(message, 2000))
            await self._write({f"items.{index}": item})
            raise _ItemFailed(_cap(message, 2000))
        if self.kind == "restore":
            item.update(status=SUCCEEDED, error=None)
            await self._write({f"items.{index}": item})
            return
        compression, encryption = p.extra.get(agent_job_id) or (None, None)
        key = object_key(p.info.kind, p.settings.type, self._item_prefix(agent_job_id), state)
        stored_size = state.stored_size
        if stored_size is None and not (state.compression or state.encryption):
            stored_size = state.size  # the script's file was uploaded as it was
        item.update(
            filename=state.filename,
            key=key,
            size=state.size,
            stored_size=stored_size,
            checksum=state.checksum,
            # What was really done: ours reports it, the Go agent leaves it to the scripts.
            compression=state.compression
            or (compression if compression == agent_client.BY_SCRIPT else None),
            encryption=state.encryption
            or (encryption if encryption == agent_client.BY_SCRIPT else None),
        )
        problem = None
        if not key:
            problem = "the agent reported success but no stored file"
        elif encryption == agent_client.ENCRYPTION_NAME and state.encryption != encryption:
            problem = "the agent did not encrypt the backup although it was asked to"
        if problem:
            item.update(status=FAILED, error=problem)
            await self._write({f"items.{index}": item})
            raise _ItemFailed(problem)
        item.update(status=SUCCEEDED, error=None)
        await self._write({f"items.{index}": item})

    async def _item_ended(self, index: int, status: str, error: str) -> None:
        item = self.items[index]
        if item.get("status") in FINAL:
            return
        item.update(status=status, error=_cap(error, 2000), ended_at=self.clock.now())
        await self._write({f"items.{index}": item})

    # ------------------------------------------------------------------ success

    async def _complete_backup(self) -> None:
        p = self.p
        assert p is not None
        if self.s.verify_uploads:
            problem = await self._verify_uploads()
            if problem:
                raise _End(FAILED, problem)
        retention = (p.plan or {}).get("retention")
        now = self.clock.now()
        point_items = [
            {
                "name": i["name"],
                "key": i.get("key"),
                "filename": i.get("filename"),
                "size": i.get("size"),
                "stored_size": i.get("stored_size"),
                "checksum": i.get("checksum"),
                "compression": i.get("compression"),
                "encryption": i.get("encryption"),
            }
            for i in self.items
        ]
        encrypted = any(i.get("encryption") for i in point_items)
        point = restore_points.new_point(
            self.r.box,
            self.job,
            items=point_items,
            created_at=now,
            expires_at=expires_at(retention, now),
            retention=retention,
            encryption_key=p.encryption_key if encrypted else None,
            agent={"kind": p.info.kind, "version": p.info.version} if p.info else None,
        )
        # Fence first: a holder that lost its lease must not add a restore point.
        await self._write({"items": self.items})
        await restore_points.record(self.store, point)
        reason = None
        if p.cancel_seen:
            reason = "A cancel was requested while the last item ran; the backup had completed."
        try:
            await self._finish(SUCCEEDED, reason, fields={"restore_point_id": point["_id"]})
        except LeaseLost:
            await self._lost_after_point(point["_id"])
            raise
        self.r.observer.bytes_stored(
            sum(int(i.get("stored_size") or i.get("size") or 0) for i in point_items)
        )
        if self.s.retention_enabled and self.job.get("plan_id"):
            self.r.spawn(self._retention(self.job["plan_id"]), f"retention-{self.job['_id']}")

    async def _lost_after_point(self, point_id: str) -> None:
        """The lease was lost between writing the restore point and ending the job: keep the
        point unless the new holder ended the job as a failure (it deletes the files then)."""
        job = await self.store.jobs.find_one({"_id": self.job["_id"]}, {"status": 1})
        if job is not None and job.get("status") in (FAILED, CANCELLED):
            await self.store.restore_points.delete_one({"_id": point_id})

    async def _retention(self, plan_id: str) -> None:
        try:
            await self.r.sweeper.sweep_plan(plan_id)
        except Exception:
            self.log.exception("retention_after_backup_failed", plan_id=plan_id)

    async def _verify_uploads(self) -> str | None:
        p = self.p
        assert p is not None
        try:
            async with asyncio.timeout(self.s.storage_timeout_seconds):
                settings = restore_points.object_settings(p.dest, self.r.box)
                async with self.r.stores.use(settings) as objects:
                    for item in self.items:
                        try:
                            info = await objects.stat(item["key"])
                        except ObjectNotFound:
                            return (
                                f"The agent reported {item['name']!r} uploaded, but the storage "
                                "has no such object."
                            )
                        expected = item.get("stored_size")
                        if expected is not None and info.size != expected:
                            return (
                                f"The stored object of {item['name']!r} has {info.size} bytes, "
                                f"the agent reported {expected}."
                            )
        except (StorageError, TimeoutError, OSError, ImportError, SecretKeyError) as exc:
            return (
                "The uploads could not be confirmed in storage "
                f"({restore_points.storage_failure(exc)})."
            )
        return None

    # ------------------------------------------------------------------ ending

    async def _end(self, status: str, reason: str) -> None:
        """End the job as not successful: items that did not finish say why, and the files a
        failed backup uploaded are deleted (or left on the job for the retention sweep)."""
        if self.job["type"] == BACKUP and await self._point_exists():
            # Another holder completed it meanwhile (see _lost_after_point).
            await self._finish(SUCCEEDED, None, fields={"restore_point_id": self.job["_id"]})
            return
        now = self.clock.now()
        pending: list[Document] = []
        for index, item in enumerate(self.items):
            st = item.get("status")
            if st == RUNNING:
                note = (
                    "still running on the agent when the job ended; the agent finishes it "
                    "on its own and runs its unlock script"
                )
                item.update(
                    status=FAILED if status == FAILED else CANCELLED, error=note, ended_at=now
                )
                if self.job["type"] == BACKUP and self.p is not None:
                    agent_id = item.get("agent_job_id") or f"{self.job['_id']}-{index}"
                    pending.append(
                        {
                            "destination_id": self.job["destination_id"],
                            "instance_id": self.job["instance_id"],
                            "agent_job_id": agent_id,
                            "type": self.p.settings.type,
                            "prefix": self._item_prefix(agent_id),
                            "since": now,
                        }
                    )
            elif st not in FINAL:
                item.update(
                    status=CANCELLED, error="not run: the job ended before it", ended_at=now
                )
            elif st == SUCCEEDED and self.job["type"] == BACKUP and item.get("key"):
                pending.append({"destination_id": self.job["destination_id"], "key": item["key"]})
        left = pending
        if pending:
            result, left = await self.r.sweeper.delete_objects(self.job["_id"], pending)
            if result.orphans_deleted:
                self.log.info("failed_backup_files_deleted", objects=result.orphans_deleted)
        fields: dict[str, Any] = {"items": self.items}
        if left:
            fields["pending_deletes"] = left
        await self._finish(status, reason, fields=fields)

    async def _finish(
        self, status: str, reason: str | None, *, fields: dict[str, Any] | None = None
    ) -> None:
        now = self.clock.now()
        await jobs.finish(self.store, self.lease, status, reason, at=now, fields=fields)
        started = self.job.get("started_at")
        self.r.observer.job_finished(
            self.job["type"], status, _seconds(now - started) if started else None
        )
        self.log.info("job_finished", status=status, reason=_cap(reason or "", 300) or None)

    # ------------------------------------------------------------------ helpers

    async def _write(self, fields: dict[str, Any]) -> None:
        await jobs.update_held(self.store, self.lease, fields)

    async def _point_exists(self) -> bool:
        return (
            await self.store.restore_points.find_one({"_id": self.job["_id"]}, {"_id": 1})
            is not None
        )

    async def _cancel_requested(self) -> bool:
        return await jobs.cancel_requested(self.store, self.job["_id"])

    async def _cancel_reason(self) -> str:
        done = [i["name"] for i in self.items if i.get("status") == SUCCEEDED]
        instance = await self.store.instances.find_one(
            {"_id": self.job["instance_id"]}, {"state": 1}
        )
        if instance is None or instance.get("state") in ("deprovisioning", "deleted"):
            text = "Cancelled: the service instance is being deleted"
        else:
            text = "Cancelled by a user"
        if done and self.job["type"] == BACKUP:
            text += f"; the files already uploaded ({', '.join(done)}) are deleted"
        elif done:
            text += f" after restoring {', '.join(done)}"
        return text + "."

    def _item_prefix(self, agent_job_id: str) -> str:
        """Where an item's file goes: ``<destination prefix><instance>/<plan>/<agent job id>/``.
        Agents name files by the minute: a folder per agent job keeps two backups of one
        plan in one minute (a manual one after a scheduled one) from overwriting each other."""
        assert self.p is not None
        return f"{self.p.prefix}{agent_job_id}/"

    def _past_deadline(self) -> bool:
        deadline = self.job.get("deadline_at")
        return deadline is not None and self.clock.now() >= deadline

    def _deadline_reason(self, index: int | None) -> str:
        text = f"The job did not end within its deadline ({_human(self.s.job_deadline_seconds)})"
        if index is not None:
            text += (
                f"; item {self.items[index]['name']!r} was still running on the agent, which "
                "finishes it on its own and runs its unlock script"
            )
        return text + "."


def _cap(text: str, limit: int = 500) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _sentence(text: str) -> str:
    text = _cap(text)
    return text[:1].upper() + text[1:]
