"""One job driven by a replica's runner (``backup.runner``): from its current state to a final
one on the instance's agent, its results recorded.

A job always ends: every wait is bounded (agent unreachable, agent busy, the job's
deadline), an agent that forgets a job fails it, and a replica that keeps crashing on one job
fails it after ``RUNNER_MAX_ATTEMPTS`` take-overs. The manager cannot abort a script. A
cancel asks an agent that lists ``cancel`` (ours) to stop the running item at its next stage
boundary and follows it to its end (unlock included); with the Go agent the item runs to its
end. A timed-out job ends here while the agent finishes on its own; what then happens to
the unlock script depends on the agent kind, and every reason says which (:func:`after_agent`,
docs/jobs.md).

While an item runs, its ``stage``, ``last_heard_at`` and stage logs are written as the agent
reports them, so what finished before a failure stays on the job; an agent that stops
answering is logged once when it starts (``agent_unreachable``) and once when it answers
again or the job gives up, and shows on the job as ``agent_unreachable_since``.

A backup is SUCCEEDED only when every item is and every object is confirmed in storage; its
restore point (id = job id) is written before the job is marked SUCCEEDED, so a crash between
the two is repaired by whoever takes the job over. A backup that does not succeed deletes the
files its items uploaded, or records them on the job (``pending_deletes``) for the retention
sweep: no file is left in storage without a record leading to it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

import structlog
from pydantic import ValidationError

from backup import agent_client, destinations, jobs, manifest, object_lock, restore_points, webhooks
from backup.agent_client import (
    AgentClient,
    AgentError,
    AgentFailure,
    AgentInfo,
    AgentJob,
    AgentJobKind,
    AgentKind,
)
from backup.clock import Clock
from backup.database import Database, Document
from backup.errors import STORAGE_FAILURES, invalid_field, storage_failure
from backup.jobs import FINAL, JobStatus, JobType, Lease, LeaseLost, RestorePointState
from backup.operations import InstanceState
from backup.retention import RetentionSweeper, expires_at
from backup.secrets import SecretBox, SecretKeyError
from backup.store_cache import StoreCache
from storage import ObjectNotFound

log = structlog.get_logger(__name__)

# An instance in these states is being (or has been) deleted: its jobs stop.
_GOING = (InstanceState.DEPROVISIONING, InstanceState.DELETED)
STAGES_PER_ITEM = 10  # log entries an agent job reports at most (5 stages, stdout + stderr)
UNLOCK_SCRIPT = {
    AgentJobKind.BACKUP: "post-backup-unlock",
    AgentJobKind.RESTORE: "post-restore-unlock",
}


# What became of an agent job the manager stopped following (see :func:`after_agent`).
AgentEvent = Literal["abandoned", "forgotten", "silent"]


def after_agent(kind: str | None, job: AgentJobKind, event: AgentEvent) -> str:
    """What happens on the agent to a job the manager stopped following, true of the agent's
    kind (ours keeps its jobs across a restart and always unlocks after a successful lock; the
    Go agent keeps nothing across a restart and skips the unlock after a failed stage), and
    what the operator must check. ``kind``: the agent's (:class:`AgentKind`, None if
    unknown); ``event``: ``abandoned`` (still running when the job ended), ``forgotten``
    (the agent answered 404) or ``silent`` (no answer)."""
    unlock = UNLOCK_SCRIPT.get(job, "unlock")
    check = "check that the database is not still locked"
    if event == "forgotten":
        if kind == AgentKind.GO:
            return (
                "the Go agent keeps no job across a restart: if it restarted while this job "
                f"ran, the job stopped there and its unlock script ({unlock}) did not run; " + check
            )
        if kind == AgentKind.OURS:
            return (
                "our agent keeps its jobs across a restart, so it lost its job records (a new "
                "state directory, or another agent at this address); whether its unlock "
                f"script ({unlock}) ran is unknown; " + check
            )
        return f"whether the agent ran its unlock script ({unlock}) is unknown; " + check
    if event == "silent":
        if kind == AgentKind.OURS:
            return (
                "if our agent stopped, it runs the unlock script "
                f"({unlock}) of a job it had locked when it starts again; until then the "
                "database may be locked"
            )
        if kind == AgentKind.GO:
            return (
                "if the Go agent stopped or restarted, the job stopped there and its unlock "
                f"script ({unlock}) did not run; " + check
            )
        return f"whether the agent ran its unlock script ({unlock}) is unknown; " + check
    if kind == AgentKind.OURS:
        return (
            "our agent finishes it on its own and runs its unlock script "
            f"({unlock}) after a successful lock, also if it restarts meanwhile"
        )
    if kind == AgentKind.GO:
        return (
            "the Go agent finishes it on its own, but skips its unlock script "
            f"({unlock}) when a stage fails and forgets the job if it restarts; " + check
        )
    return f"whether the agent runs its unlock script ({unlock}) is unknown; " + check


class JobEnd(Exception):
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


def _seconds(delta: timedelta | None) -> float | None:
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
    if info_kind == AgentKind.GO and dest_type == "SWIFT":
        return state.filename
    return (state.filename_prefix or sent_prefix) + state.filename


@dataclass
class _Prepared:
    instance: Document
    dest: Document
    dest_settings: destinations.AnySettings
    client: AgentClient
    info: AgentInfo | None = None
    plan: Document | None = None
    point: Document | None = None
    encryption_key: str | None = field(default=None, repr=False)
    db_password: str = field(default="", repr=False)
    prefix: str = ""
    cancel_seen: bool = False
    cancel_sent: bool = False  # the agent was asked to stop the running item
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSettings:
    """The runner settings a job run reads (``backup.runner.RunnerSettings`` names them)."""

    max_attempts: int
    job_deadline_seconds: float
    agent_poll_min_seconds: float
    agent_poll_max_seconds: float
    agent_unreachable_seconds: float
    log_max_bytes: int
    job_log_budget_bytes: int
    verify_uploads: bool
    storage_timeout_seconds: float
    retention_enabled: bool


class RunRecorder(Protocol):
    """What a job run reports for metrics (``backup.runner.RunnerObserver`` is one)."""

    def job_finished(self, job_type: str, status: str, seconds: float | None) -> None: ...

    def agent_error(self, reason: str) -> None: ...

    def bytes_stored(self, nbytes: int) -> None: ...


class AgentOpener(Protocol):
    """The agent of an instance, its password opened in memory only; raises :class:`JobEnd`
    when the instance has no agent or its credentials cannot be opened."""

    def __call__(self, instance: Document, *, log_limit: int) -> AgentClient: ...


@dataclass(frozen=True)
class JobRunContext:
    """What a job run uses of the replica running it, built once by the runner."""

    db: Database
    box: SecretBox
    clock: Clock
    settings: RunSettings
    agent_for: AgentOpener
    object_stores: StoreCache  # storage clients kept open across jobs (upload checks)
    sweeper: RetentionSweeper  # retention after a backup; deleting a failed one's files
    recorder: RunRecorder
    # Starts a side task (retention after a backup) that the runner stops and waits for.
    spawn: Callable[[Coroutine[Any, Any, None], str], None]


class JobRun:
    """One claim of one job, from its current state to a final one."""

    def __init__(self, context: JobRunContext, lease: Lease, job: Document) -> None:
        self.context = context
        self.settings = context.settings
        self.clock = context.clock
        self.db = context.db
        self.lease = lease
        self.job = job
        self.items: list[Document] = [dict(i) for i in job.get("items") or []]
        self.kind = AgentJobKind.BACKUP if job["type"] == JobType.BACKUP else AgentJobKind.RESTORE
        self.log = log.bind(job_id=job["_id"], instance_id=job["instance_id"], type=job["type"])
        self.prepared: _Prepared | None = None
        self._unwritten: dict[str, Any] = {}  # goes with the next write (one write, not two)
        # Since when the agent has not answered (kept on the job: a new holder goes on).
        self._silent_since: datetime | None = job.get("agent_unreachable_since")
        self._heard_written: dict[int, datetime] = {}  # last ``last_heard_at`` written per item

    # ------------------------------------------------------------------ top level

    async def run(self) -> None:
        try:
            await self._run()
        except JobEnd as end:
            await self._end(end.status, end.reason)

    async def _run(self) -> None:
        job = self.job
        if job["type"] == JobType.BACKUP and await self._point_exists():
            # A previous holder wrote the restore point and died before ending the job.
            await self._finish(
                JobStatus.SUCCEEDED,
                None,
                fields={"restore_point_id": job["_id"], "items": self.items},
            )
            return
        on_agent = any(i.get("status") == JobStatus.RUNNING for i in self.items)
        if not on_agent and await self._cancel_requested():  # before anything reaches it
            raise JobEnd(JobStatus.CANCELLED, await self._cancel_reason())
        if self.lease.token > self.settings.max_attempts:
            raise JobEnd(
                JobStatus.FAILED,
                f"The job was taken over {self.lease.token - 1} times (the replicas running "
                "it kept stopping); it is not tried again.",
            )
        if self._past_deadline():
            raise JobEnd(JobStatus.FAILED, self._deadline_reason(None))
        for item in self.items:
            if item.get("status") == JobStatus.FAILED:  # ended by an earlier holder that then died
                raise JobEnd(JobStatus.FAILED, f"Item {item['name']!r} failed: {item.get('error')}")
        self.prepared = await self._prepare()
        self.prepared.info = await self._agent_info()
        self._unwritten["agent"] = {
            "kind": self.prepared.info.kind,
            "version": self.prepared.info.version,
        }
        for index, item in enumerate(self.items):
            if item.get("status") == JobStatus.SUCCEEDED:
                continue
            if await self._cancel_requested():
                raise JobEnd(JobStatus.CANCELLED, await self._cancel_reason())
            try:
                await self._run_item(index, item)
            except _ItemFailed as exc:
                await self._item_ended(index, JobStatus.FAILED, exc.message)
                raise JobEnd(
                    JobStatus.FAILED, f"Item {item['name']!r} failed: {exc.message}"
                ) from None
            except _Deadline:
                stopping = await self._stop_overdue(index, item)
                raise JobEnd(JobStatus.FAILED, self._deadline_reason(index, stopping)) from None
        if self.prepared.cancel_seen and await self._instance_going():
            # A deprovision asked: nothing more for an instance being deleted, not even the
            # restore point of a backup whose last item completed (its files are deleted).
            raise JobEnd(JobStatus.CANCELLED, await self._cancel_reason())
        if self.job["type"] == JobType.BACKUP:
            await self._complete_backup()
        else:
            reason = None
            if self.prepared.cancel_seen:
                reason = "A cancel was requested while the last item ran; it had to complete."
            await self._finish(JobStatus.SUCCEEDED, reason)

    # ------------------------------------------------------------------ preparation

    async def _prepare(self) -> _Prepared:
        job, box = self.job, self.context.box
        instance = await self.db.instances.find_one({"_id": job["instance_id"]})
        if instance is None or instance.get("state") in _GOING:
            raise JobEnd(JobStatus.FAILED, "The service instance is no longer registered.")
        dest = await self.db.destinations.find_one({"_id": job["destination_id"]})
        if dest is None:
            raise JobEnd(JobStatus.FAILED, "The job's destination no longer exists.")
        try:
            dest_settings = destinations.settings_for(dest, box)
            opened = box.open_map(instance.get("secrets") or {}, f"instances/{instance['_id']}")
        except SecretKeyError:
            raise JobEnd(
                JobStatus.FAILED,
                "Stored credentials cannot be opened with the configured master keys "
                "(SECRETS_MASTER_KEYS).",
            ) from None
        except ValidationError as exc:  # stored before today's checks of endpoint and region
            raise JobEnd(
                JobStatus.FAILED,
                f"The destination's settings are no longer accepted "
                f"({invalid_field(exc)}); correct the destination.",
            ) from None
        budget = self.settings.job_log_budget_bytes // max(1, len(self.items) * STAGES_PER_ITEM)
        client = self.context.agent_for(
            instance, log_limit=max(1024, min(self.settings.log_max_bytes, budget))
        )
        prepared = _Prepared(
            instance, dest, dest_settings, client, db_password=opened.get("database_password", "")
        )
        if job["type"] == JobType.BACKUP:
            plan = await self.db.plans.find_one({"_id": job.get("plan_id")})
            prepared.plan = plan
            if (job.get("encryption") or {}).get("enabled"):
                if plan is None:
                    raise JobEnd(
                        JobStatus.FAILED,
                        "The plan was deleted, and with it the encryption key this backup needs.",
                    )
                try:
                    key = box.open_map(plan.get("secrets") or {}, f"plans/{plan['_id']}").get(
                        "encryption_key"
                    )
                except SecretKeyError:
                    key = None
                if not key:
                    raise JobEnd(JobStatus.FAILED, "The plan's encryption key cannot be opened.")
                prepared.encryption_key = key
            prepared.prefix = (
                f"{dest_settings.prefix}{instance['_id']}/{job.get('plan_id') or 'manual'}/"
            )
        else:
            point = await self.db.restore_points.find_one({"_id": job.get("restore_point_id")})
            if point is None:
                raise JobEnd(
                    JobStatus.FAILED, "The restore point to restore from no longer exists."
                )
            if point.get("state") != RestorePointState.AVAILABLE:
                raise JobEnd(
                    JobStatus.FAILED, "The restore point to restore from is being deleted."
                )
            prepared.point = point
            try:
                prepared.encryption_key = restore_points.encryption_key(box, point)
            except SecretKeyError:
                raise JobEnd(
                    JobStatus.FAILED, "The restore point's encryption key cannot be opened."
                ) from None
        return prepared

    async def _agent_info(self) -> AgentInfo:
        """``GET /status``, retried while the agent is unreachable (bounded)."""
        assert self.prepared is not None
        since = self.clock.now()
        delay = self.settings.agent_poll_min_seconds
        while True:
            try:
                info = await self.prepared.client.status()
                await self._heard()
                return info
            except AgentError as exc:
                self.context.recorder.agent_error(exc.reason)
                waited = (self.clock.now() - since).total_seconds()
                if not exc.transient:
                    raise JobEnd(JobStatus.FAILED, f"{_sentence(exc.message)}.") from None
                await self._silent(exc)
                if waited >= self.settings.agent_unreachable_seconds:
                    kind = (self.job.get("agent") or {}).get("kind")
                    raise JobEnd(
                        JobStatus.FAILED,
                        f"{_sentence(exc.message)}; still so after "
                        f"{_human(self.settings.agent_unreachable_seconds)}"
                        + self._running_note(kind, "silent")
                        + ".",
                    ) from None
                if self._past_deadline():
                    raise JobEnd(JobStatus.FAILED, self._deadline_reason(None)) from None
                if await self._cancel_requested():
                    raise JobEnd(JobStatus.CANCELLED, await self._cancel_reason()) from None
            await self.clock.sleep(delay)
            delay = min(delay * 2, self.settings.agent_poll_max_seconds)

    # ------------------------------------------------------------------ items

    def _request(self, index: int, item: Document, agent_job_id: str) -> dict[str, Any]:
        prepared = self.prepared
        assert prepared is not None and prepared.info is not None
        # The job's instance is the one whose database changes: for a restore, the target
        # (possibly another instance than the restore point's), into the item's ``target``.
        db = prepared.instance.get("database") or {}
        section = agent_client.database_section(
            host=str(db.get("host") or ""),
            username=str(db.get("username") or ""),
            password=prepared.db_password,
            database=str(item.get("target") or item["name"]),
            port=db.get("port"),
            parameters=db.get("parameters"),
        )
        checksum = None  # of the stored object: a restore has the agent verify its download
        if self.kind == AgentJobKind.BACKUP:
            compression, encryption = agent_client.backup_modes(
                prepared.info,
                bool(self.job.get("compression")),
                bool((self.job.get("encryption") or {}).get("enabled")),
            )
            dest = agent_client.destination(
                prepared.dest_settings,
                filename_prefix=self._item_prefix(agent_job_id),
                lock_until=self._lock_until(),
            )
        else:
            stored = self._point_item(item["name"])
            compression, encryption = stored.get("compression"), stored.get("encryption")
            checksum = stored.get("checksum")
            missing = agent_client.missing_capabilities(prepared.info, compression, encryption)
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
                prepared.dest_settings,
                filename_prefix=f"{head}/" if head else "",
                filename=filename,
            )
        prepared.extra[agent_job_id] = (compression, encryption)
        return agent_client.job_request(
            self.kind,
            agent_job_id=agent_job_id,
            info=prepared.info,
            compression=compression,
            encryption=encryption,
            encryption_key=prepared.encryption_key,
            destination=dest,
            section=section,
            checksum=checksum,
        )

    def _lock_until(self) -> datetime | None:
        """Until when this backup's objects are locked, if its destination requires object
        lock: the expiry of a point created when the job started, plus the margin (the
        same date for every item, also after a takeover); see backup/object_lock.py."""
        assert self.prepared is not None
        since = self.job.get("started_at") or self.job["created_at"]
        retention = (self.prepared.plan or {}).get("retention")
        base = expires_at(retention, since) or since
        return object_lock.lock_until(self.prepared.dest_settings, base)

    def _point_item(self, name: str) -> Document:
        assert self.prepared is not None and self.prepared.point is not None
        stored_items: list[Document] = self.prepared.point.get("items") or []
        for stored in stored_items:
            if stored.get("name") == name:
                return stored
        raise _ItemFailed(f"the restore point has no item {name!r}")

    async def _run_item(self, index: int, item: Document) -> None:
        agent_job_id = item.get("agent_job_id") or f"{self.job['_id']}-{index}"
        try:
            request = self._request(index, item, agent_job_id)  # holds secrets: never logged
        except AgentError as exc:  # a request this agent cannot be sent
            raise _ItemFailed(exc.message) from None
        state: AgentJob | None = None
        if item.get("status") != JobStatus.RUNNING:
            # Not known to have reached the agent: (re)send it. The same id answers 409 with
            # its state if an earlier holder's request did reach it, so the item is written
            # once it is on the agent: a holder that dies before that write leaves a job
            # that the next one re-sends under the same (derived) id and attaches to.
            item.update(
                agent_job_id=agent_job_id, started_at=item.get("started_at") or self.clock.now()
            )
            try:
                state = await self._start_on_agent(agent_job_id, request)
            except _ItemFailed:
                # A refused request (400) may still be kept by the agent (the Go agent keeps
                # the failed job): the manager is done with it either way.
                await self._forget(agent_job_id)
                raise
            item["status"] = JobStatus.RUNNING
            now = self.clock.now()
            item["last_heard_at"] = now
            self._heard_written[index] = now
            await self._write(
                {
                    f"items.{index}.agent_job_id": agent_job_id,
                    f"items.{index}.started_at": item["started_at"],
                    f"items.{index}.status": JobStatus.RUNNING,
                    f"items.{index}.last_heard_at": now,
                }
            )
            self.log.info(
                "agent_job_started" if state is None else "agent_job_attached",
                agent_job_id=agent_job_id,
                item=index,
            )
        else:
            self.log.info("agent_job_resumed", agent_job_id=agent_job_id, item=index)
        state = await self._poll(index, agent_job_id, state)
        if state.cancelled and self.prepared is not None and self.prepared.cancel_seen:
            await self._cancelled_on_agent(index, item, agent_job_id, state)
            await self._forget(agent_job_id)
            raise JobEnd(JobStatus.CANCELLED, await self._cancel_reason())
        try:
            await self._record(index, item, agent_job_id, state)
        except _ItemFailed:
            await self._forget(agent_job_id)
            raise
        await self._forget(agent_job_id)

    async def _forget(self, agent_job_id: str) -> None:
        """Once an item's outcome is recorded, the agent may forget its job: the Go agent
        keeps every job in memory until told so. Best effort."""
        assert self.prepared is not None
        try:
            await self.prepared.client.forget(self.kind, agent_job_id)
        except AgentError as exc:
            self.log.info("agent_forget_failed", agent_job_id=agent_job_id, error=exc.reason)

    async def _start_on_agent(self, agent_job_id: str, request: dict[str, Any]) -> AgentJob | None:
        assert self.prepared is not None
        since = self.clock.now()
        delay = self.settings.agent_poll_min_seconds
        while True:
            try:
                started = await self.prepared.client.start(self.kind, request)
                await self._heard()
                return started
            except AgentError as exc:
                self.context.recorder.agent_error(exc.reason)
                if not exc.transient:
                    raise _ItemFailed(exc.message) from None
                await self._silent(exc)
                waited = (self.clock.now() - since).total_seconds()
                if waited >= self.settings.agent_unreachable_seconds:
                    raise _ItemFailed(
                        f"{exc.message}; still so after "
                        f"{_human(self.settings.agent_unreachable_seconds)}"
                    ) from None
                if self._past_deadline():
                    raise _Deadline() from None
                if await self._cancel_requested():
                    # The request may have reached the agent before its answer was lost; it
                    # is asked once more below so that a started job is seen, not forgotten.
                    with contextlib.suppress(AgentError):
                        existing = await self.prepared.client.get(self.kind, agent_job_id)
                        return existing
                    raise JobEnd(JobStatus.CANCELLED, await self._cancel_reason()) from None
                self.log.info("agent_start_retry", error=exc.reason, waited=round(waited, 1))
            await self.clock.sleep(delay)
            delay = min(delay * 2, self.settings.agent_poll_max_seconds)

    async def _poll(self, index: int, agent_job_id: str, state: AgentJob | None) -> AgentJob:
        assert self.prepared is not None
        delay = self.settings.agent_poll_min_seconds
        unreachable_since: datetime | None = None
        info = self.prepared.info
        kind = info.kind if info is not None else None
        while state is None or not state.finished:
            if self._past_deadline():
                raise _Deadline()
            if not self.prepared.cancel_seen and await self._cancel_requested():
                self.prepared.cancel_seen = True
                self.log.info("cancel_noted", item=index)
            if (
                self.prepared.cancel_seen
                and not self.prepared.cancel_sent
                and info is not None
                and info.cancels
            ):
                if await self._cancel_on_agent(index, agent_job_id):
                    delay = self.settings.agent_poll_min_seconds  # its end comes soon: see it soon
            await self.clock.sleep(delay)
            delay = min(delay * 1.5, self.settings.agent_poll_max_seconds)
            try:
                state = await self.prepared.client.get(self.kind, agent_job_id)
                unreachable_since = None
                await self._heard()
            except AgentError as exc:
                self.context.recorder.agent_error(exc.reason)
                if exc.reason == AgentFailure.NOT_FOUND:
                    raise _ItemFailed(
                        f"{exc.message}; {after_agent(kind, self.kind, 'forgotten')}"
                    ) from None
                if not exc.transient:
                    raise _ItemFailed(exc.message) from None
                await self._silent(exc)
                now = self.clock.now()
                unreachable_since = unreachable_since or now
                waited = (now - unreachable_since).total_seconds()
                if waited >= self.settings.agent_unreachable_seconds:
                    raise _ItemFailed(
                        f"{exc.message}; no answer for "
                        f"{_human(self.settings.agent_unreachable_seconds)}; "
                        + after_agent(kind, self.kind, "silent")
                    ) from None
                state = None
                continue
            if not state.finished:
                await self._progress(index, state)
        return state

    async def _send_cancel(self, index: int, agent_job_id: str) -> bool | None:
        """Ask our agent to stop the item at its next stage boundary: True if it accepted,
        False if it refused or forgot the job, None on a transient failure."""
        assert self.prepared is not None
        try:
            await self.prepared.client.cancel(self.kind, agent_job_id)
        except AgentError as exc:
            self.context.recorder.agent_error(exc.reason)
            if exc.transient:
                return None
            self.log.info("agent_cancel_refused", agent_job_id=agent_job_id, error=exc.reason)
            return False
        self.log.info("agent_cancel_sent", agent_job_id=agent_job_id, item=index)
        return True

    async def _cancel_on_agent(self, index: int, agent_job_id: str) -> bool:
        """Ask our agent to stop the running item; whether it was asked. A transient failure
        is tried again at the next poll; the item's end (the cancelled state, its outcome if
        the cancel came too late, or the 404 of a refusal) is seen by polling."""
        assert self.prepared is not None
        if await self._send_cancel(index, agent_job_id) is None:
            return False
        self.prepared.cancel_sent = True
        return True

    async def _stop_overdue(self, index: int, item: Document) -> bool:
        """Ask our agent to stop an item still running at the job's deadline, so that an
        overdue backup does not go on unwatched; whether it has been asked (once, best
        effort: the job ends now either way)."""
        prepared = self.prepared
        if prepared is None or prepared.info is None or not prepared.info.cancels:
            return False
        if prepared.cancel_sent:
            return True
        agent_job_id = item.get("agent_job_id") or f"{self.job['_id']}-{index}"
        return bool(await self._send_cancel(index, agent_job_id))

    async def _cancelled_on_agent(
        self, index: int, item: Document, agent_job_id: str, state: AgentJob
    ) -> None:
        """The agent stopped the item as asked: the stage running then finished, no later
        data stage ran, cleanup and unlock did. A stored object the agent could not delete
        is kept on the item, so that ending the job deletes it."""
        prepared = self.prepared
        assert prepared is not None and prepared.info is not None
        detail = state.error_message or "cancelled"
        item.update(
            logs=state.logs or item.get("logs") or {},
            ended_at=self.clock.now(),
            status=JobStatus.CANCELLED,
            error=_cap(
                f"stopped by the agent at its next stage boundary after the cancel ({detail}); "
                "its cleanup and unlock scripts ran after a successful lock",
                2000,
            ),
        )
        if self.kind == AgentJobKind.BACKUP and state.stored_key:
            item["key"] = object_key(
                prepared.info.kind,
                prepared.dest_settings.type,
                self._item_prefix(agent_job_id),
                state,
            )
        await self._write({f"items.{index}": item})

    async def _progress(self, index: int, state: AgentJob) -> None:
        """Record what a running agent job reports: its stage and its stage logs as they
        arrive (what finished before a failure stays visible after it), and when the agent
        was last heard from (written when something changed, else at most every
        ``RUNNER_AGENT_POLL_MAX_SECONDS``: a write per poll would cost more than it tells)."""
        item = self.items[index]
        now = self.clock.now()
        fields: dict[str, Any] = {}
        if state.state and state.state != item.get("stage"):
            item["stage"] = state.state
            fields[f"items.{index}.stage"] = state.state
        if state.logs and state.logs != (item.get("logs") or {}):
            item["logs"] = dict(state.logs)
            fields[f"items.{index}.logs"] = item["logs"]
        last = self._heard_written.get(index)
        stale = last is None or (now - last).total_seconds() >= self.settings.agent_poll_max_seconds
        item["last_heard_at"] = now
        if fields or stale:
            fields[f"items.{index}.last_heard_at"] = now
            self._heard_written[index] = now
            await self._write(fields)

    async def _silent(self, exc: AgentError) -> None:
        """The agent did not answer (or answered 5xx): logged and put on the job once, when
        it starts (a busy agent answers: that is no silence)."""
        if exc.reason == AgentFailure.BUSY or self._silent_since is not None:
            return
        self._silent_since = self.clock.now()
        self.log.warning(
            "agent_unreachable",
            agent=self.prepared.client.where if self.prepared else None,
            error=exc.reason,
            since=self._silent_since.isoformat(),
        )
        await self._write({"agent_unreachable_since": self._silent_since})

    async def _heard(self) -> None:
        """The agent answered: if it had been silent, say once that it is back."""
        if self._silent_since is None:
            return
        silent = (self.clock.now() - self._silent_since).total_seconds()
        self._silent_since = None
        self.log.info(
            "agent_reachable_again",
            agent=self.prepared.client.where if self.prepared else None,
            unreachable_seconds=round(silent, 1),
        )
        await self._write({"agent_unreachable_since": None})

    async def _record(self, index: int, item: Document, agent_job_id: str, state: AgentJob) -> None:
        prepared = self.prepared
        assert prepared is not None and prepared.info is not None
        now = self.clock.now()
        item.update(logs=state.logs or item.get("logs") or {}, ended_at=now, stage=state.state)
        if state.status != JobStatus.SUCCEEDED:
            message = state.error_message or state.message or "the agent reported a failure"
            item.update(status=JobStatus.FAILED, error=_cap(message, 2000))
            await self._write({f"items.{index}": item})
            raise _ItemFailed(_cap(message, 2000))
        compression, encryption = prepared.extra.get(agent_job_id) or (None, None)
        if self.kind == AgentJobKind.RESTORE:
            # What the restore undid: the restore point's record of how it was stored.
            item.update(
                status=JobStatus.SUCCEEDED,
                error=None,
                compression=compression or state.compression,
                encryption=encryption or state.encryption,
            )
            await self._write({f"items.{index}": item})
            return
        key = object_key(
            prepared.info.kind, prepared.dest_settings.type, self._item_prefix(agent_job_id), state
        )
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
            item.update(status=JobStatus.FAILED, error=problem)
            await self._write({f"items.{index}": item})
            raise _ItemFailed(problem)
        item.update(status=JobStatus.SUCCEEDED, error=None)
        await self._write({f"items.{index}": item})

    async def _item_ended(self, index: int, status: str, error: str) -> None:
        item = self.items[index]
        if item.get("status") in FINAL:
            return
        item.update(status=status, error=_cap(error, 2000), ended_at=self.clock.now())
        await self._write({f"items.{index}": item})

    # ------------------------------------------------------------------ success

    async def _complete_backup(self) -> None:
        prepared = self.prepared
        assert prepared is not None
        if self.settings.verify_uploads:
            problem = await self._verify_uploads()
            if problem:
                raise JobEnd(JobStatus.FAILED, problem)
        retention = (prepared.plan or {}).get("retention")
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
            self.context.box,
            self.job,
            items=point_items,
            created_at=now,
            expires_at=expires_at(retention, now),
            retention=retention,
            encryption_key=prepared.encryption_key if encrypted else None,
            agent={"kind": prepared.info.kind, "version": prepared.info.version}
            if prepared.info
            else None,
        )
        if (locked_until := self._lock_until()) is not None:
            point["locked_until"] = locked_until  # what the agent was told to lock it until
        # Fence first: a holder that lost its lease must not add a restore point. (Every
        # item is already recorded, so a read of the lease does it, not a write.)
        if not await jobs.holds(self.db, self.lease):
            raise LeaseLost(self.lease.job_id)
        # Last in storage, once every file is confirmed: a manifest means a complete point.
        problem = await manifest.write(
            self.context.object_stores,
            restore_points.object_settings(prepared.dest, self.context.box),
            self.context.box,
            point,
            folder=prepared.prefix,
            plan_name=(prepared.plan or {}).get("name"),
            encryption_key=prepared.encryption_key if encrypted else None,
            timeout=self.settings.storage_timeout_seconds,
        )
        if problem:
            raise JobEnd(JobStatus.FAILED, problem)
        await restore_points.record(self.db, point)
        reason = None
        if prepared.cancel_seen:
            reason = "A cancel was requested while the last item ran; the backup had completed."
        try:
            await self._finish(
                JobStatus.SUCCEEDED, reason, fields={"restore_point_id": point["_id"]}
            )
        except LeaseLost:
            await self._lost_after_point(point["_id"])
            raise
        self.context.recorder.bytes_stored(
            sum(int(i.get("stored_size") or i.get("size") or 0) for i in point_items)
        )
        if self.settings.retention_enabled and self.job.get("plan_id"):
            self.context.spawn(self._retention(self.job["plan_id"]), f"retention-{self.job['_id']}")

    async def _lost_after_point(self, point_id: str) -> None:
        """The lease was lost between writing the restore point and ending the job: keep the
        point unless the new holder ended the job as a failure (it deletes the files then)."""
        job = await self.db.jobs.find_one({"_id": self.job["_id"]}, {"status": 1})
        if job is not None and job.get("status") in (JobStatus.FAILED, JobStatus.CANCELLED):
            await self.db.restore_points.delete_one({"_id": point_id})

    async def _retention(self, plan_id: str) -> None:
        try:
            await self.context.sweeper.sweep_plan(plan_id)
        except Exception:
            self.log.exception("retention_after_backup_failed", plan_id=plan_id)

    async def _verify_uploads(self) -> str | None:
        prepared = self.prepared
        assert prepared is not None
        try:
            async with asyncio.timeout(self.settings.storage_timeout_seconds):
                settings = restore_points.object_settings(prepared.dest, self.context.box)
                async with self.context.object_stores.use(settings) as objects:
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
        except STORAGE_FAILURES as exc:
            return f"The uploads could not be confirmed in storage ({storage_failure(exc)})."
        return None

    # ------------------------------------------------------------------ ending

    async def _end(self, status: str, reason: str) -> None:
        """End the job as not successful: items that did not finish say why, and the files a
        failed backup uploaded are deleted (or left on the job for the retention sweep)."""
        if self.job["type"] == JobType.BACKUP and await self._point_exists():
            # Another holder completed it meanwhile (see _lost_after_point).
            await self._finish(
                JobStatus.SUCCEEDED, None, fields={"restore_point_id": self.job["_id"]}
            )
            return
        now = self.clock.now()
        pending: list[Document] = []
        kind = self._agent_kind()
        for index, item in enumerate(self.items):
            item_status = item.get("status")
            if item_status == JobStatus.RUNNING:
                note = "still running on the agent when the job ended; " + after_agent(
                    kind, self.kind, "abandoned"
                )
                item.update(
                    status=JobStatus.FAILED if status == JobStatus.FAILED else JobStatus.CANCELLED,
                    error=note,
                    ended_at=now,
                )
                if self.job["type"] == JobType.BACKUP and self.prepared is not None:
                    agent_id = item.get("agent_job_id") or f"{self.job['_id']}-{index}"
                    pending.append(
                        {
                            "destination_id": self.job["destination_id"],
                            "instance_id": self.job["instance_id"],
                            "agent_job_id": agent_id,
                            "type": self.prepared.dest_settings.type,
                            "prefix": self._item_prefix(agent_id),
                            "since": now,
                        }
                    )
            elif item_status not in FINAL:
                item.update(
                    status=JobStatus.CANCELLED,
                    error="not run: the job ended before it",
                    ended_at=now,
                )
            elif (
                item_status in (JobStatus.SUCCEEDED, JobStatus.CANCELLED)
                and self.job["type"] == JobType.BACKUP
                and item.get("key")
            ):
                pending.append({"destination_id": self.job["destination_id"], "key": item["key"]})
        left = pending
        if pending:
            result, left = await self.context.sweeper.delete_objects(self.job["_id"], pending)
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
        fields = {**self._unwritten, **(fields or {})}
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
            fields[webhooks.NOTIFY_PENDING] = True  # with the final state: see job_ended
        await jobs.finish(self.db, self.lease, status, reason, at=now, fields=fields)
        # This replica's own account first (no wait between the write and it), then the
        # notifications, which query the database.
        if self._silent_since is not None:
            self.log.warning(
                "agent_unreachable_gave_up",
                agent=self.prepared.client.where if self.prepared else None,
                unreachable_seconds=round((now - self._silent_since).total_seconds(), 1),
                status=status,
            )
        self._unwritten = {}
        started = self.job.get("started_at")
        self.context.recorder.job_finished(
            self.job["type"], status, _seconds(now - started) if started else None
        )
        self.log.info("job_finished", status=status, reason=_cap(reason or "", 300) or None)
        await webhooks.job_ended(self.db, {**self.job, **fields}, status, reason)
        self.db.events.jobs_ended.fire()

    # ------------------------------------------------------------------ helpers

    async def _write(self, fields: dict[str, Any]) -> None:
        await jobs.update_held(self.db, self.lease, {**self._unwritten, **fields})
        self._unwritten = {}

    async def _point_exists(self) -> bool:
        return (
            await self.db.restore_points.find_one({"_id": self.job["_id"]}, {"_id": 1}) is not None
        )

    async def _cancel_requested(self) -> bool:
        return await jobs.cancel_requested(self.db, self.job["_id"])

    async def _instance_going(self, instance_id: str | None = None) -> bool:
        """Whether the job's instance (or ``instance_id``) is being (or has been) deleted."""
        instance = await self.db.instances.find_one(
            {"_id": instance_id or self.job["instance_id"]}, {"state": 1}
        )
        return instance is None or instance.get("state") in _GOING

    def _agent_kind(self) -> str | None:
        if self.prepared is not None and self.prepared.info is not None:
            return self.prepared.info.kind
        return (self.job.get("agent") or {}).get("kind")

    def _running_note(self, kind: str | None, event: AgentEvent) -> str:
        """For a job ending while an item is RUNNING on the agent: what the agent does."""
        running = [i for i in self.items if i.get("status") == JobStatus.RUNNING]
        return f"; {after_agent(kind, self.kind, event)}" if running else ""

    async def _cancel_reason(self) -> str:
        done = [i["name"] for i in self.items if i.get("status") == JobStatus.SUCCEEDED]
        source = self.job.get("source_instance_id")
        if await self._instance_going():
            text = "Cancelled: the service instance is being deleted"
        elif source and await self._instance_going(source):
            # A restore from another instance's point, stopped by that one's deprovision.
            text = "Cancelled: the instance of its restore point is being deleted"
        else:
            text = "Cancelled by a user"
        if done and self.job["type"] == JobType.BACKUP:
            text += f"; the files already uploaded ({', '.join(done)}) are deleted"
        elif done:
            text += f" after restoring {', '.join(done)}"
        return text + "."

    def _item_prefix(self, agent_job_id: str) -> str:
        """Where an item's file goes: ``<destination prefix><instance>/<plan>/<agent job id>/``.
        Agents name files by the minute: a folder per agent job keeps two backups of one
        plan in one minute (a manual one after a scheduled one) from overwriting each other."""
        assert self.prepared is not None
        return f"{self.prepared.prefix}{agent_job_id}/"

    def _past_deadline(self) -> bool:
        deadline = self.job.get("deadline_at")
        return deadline is not None and self.clock.now() >= deadline

    def _deadline_reason(self, index: int | None, stopping: bool = False) -> str:
        deadline = _human(self.settings.job_deadline_seconds)
        text = f"The job did not end within its deadline ({deadline})"
        if index is not None and stopping:
            text += (
                f"; item {self.items[index]['name']!r} was still running on the agent, which was "
                "asked to stop it at its next stage boundary: the stage running then finishes, "
                f"no later data stage runs, and its unlock script "
                f"({UNLOCK_SCRIPT.get(self.kind, 'unlock')}) runs after a successful lock"
            )
        elif index is not None:
            text += (
                f"; item {self.items[index]['name']!r} was still running on the agent: "
                + after_agent(self._agent_kind(), self.kind, "abandoned")
            )
        return text + "."


def _cap(text: str, limit: int = 500) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _sentence(text: str) -> str:
    text = _cap(text)
    return text[:1].upper() + text[1:]
