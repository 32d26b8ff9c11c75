"""Restore drills: proving that a restore point can be restored, without touching the live
database (docs/jobs.md, "Restore drills").

A DRILL job is run by the job runner like any job (claimed, leased, one per instance at a
time) and driven by :class:`DrillRun`, a :class:`backup.job_run.JobRun` whose items are the
restore point's:

- With an agent that lists the ``verify`` capability (ours), each item is sent as a restore
  request with ``verify: true``: the agent downloads the object, decrypts and decompresses
  it, checks it against the restore point's checksum and hands the file to the DBA's
  optional ``verify`` script (``pg_restore --list``, a restore into a scratch database the
  script creates and drops). No restore stage runs. Kind ``agent``.
- With any other agent (the Go agent), the manager itself downloads each object from the
  destination and checks it against the recorded checksum (or, when the backup recorded
  none, its size): kind ``manager``, "download and checksum only". It cannot decrypt: the
  Go agent's scripts encrypt with their own tools.

The outcome (``passed`` or ``failed``, with the reason), the kind and the timings (download,
decrypt and verify seconds, summed over the items) go on the job (``drill``), on the restore
point it proved (``last_drill``) and on the plan (``last_drill``, with the point's id). A
failed drill emits the ``drill.failed`` webhook event.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import uuid
from datetime import datetime
from typing import Any

import structlog
from pymongo import DESCENDING
from pymongo.errors import DuplicateKeyError

from backup import restore_points, schedule, webhooks
from backup.agent_client import AgentJob
from backup.database import Database, Document
from backup.errors import STORAGE_FAILURES, InvalidInput, storage_failure
from backup.job_run import JobEnd, JobRun, JobRunContext, _ItemFailed, _Prepared
from backup.jobs import (
    ACTIVE,
    DrillKind,
    DrillOutcome,
    JobStatus,
    JobType,
    Lease,
    RestorePointState,
    Trigger,
    new_drill_job,
    new_item,
)
from storage import ChecksumMismatch, ObjectNotFound

log = structlog.get_logger(__name__)

TIMINGS = ("download_seconds", "decrypt_seconds", "verify_seconds")
MANAGER_SIDE = "manager-side: download and checksum only"
REASON_LINE_MAX = 300
"""How much of the verify script's last line of stderr a failed drill's reason keeps."""
_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def script_line(text: str) -> str:
    """One line a script printed, fit for a reason: terminal escape sequences (colours, a
    window title) and other control characters removed, at most :data:`REASON_LINE_MAX`
    characters."""
    return _CONTROL.sub("", _ESCAPE.sub("", text)).strip()[:REASON_LINE_MAX]


_DRILL_IDS = uuid.UUID("0d7c2b1e-5a0c-4f53-8f0e-2b8f3a3c9d41")
DRILL_PLAN_FIELDS = {
    "_id": 1,
    "instance_id": 1,
    "destination_id": 1,
    "timezone": 1,
    "drill": 1,
    "drill_next_run_at": 1,
}


async def newest_point(
    store: Database, plan_id: str, *, instance_id: str | None = None
) -> Document | None:
    """The plan's newest available restore point (the one a plan's drill proves), of
    ``instance_id`` (the plan's instance: a point imported into another instance keeps the
    plan's id, and must not be proved, nor read, by this plan's drill)."""
    query: dict[str, Any] = {"plan_id": plan_id, "state": RestorePointState.AVAILABLE}
    if instance_id is not None:
        query["instance_id"] = instance_id
    return await store.restore_points.find_one(
        query,
        sort=[("created_at", DESCENDING)],
    )


class DrillRun(JobRun):
    """One claim of one DRILL job (see the module's docstring)."""

    def __init__(self, context: JobRunContext, lease: Lease, job: Document) -> None:
        super().__init__(context, lease, job)
        self.drill_kind: DrillKind | None = None

    # ------------------------------------------------------------------ preparation

    async def _prepare(self) -> _Prepared:
        if not self.job.get("restore_point_id"):
            # A scheduled drill proves the plan's newest restore point as of its start.
            point = await newest_point(
                self.db, self.job.get("plan_id") or "", instance_id=self.job["instance_id"]
            )
            if point is None:
                raise JobEnd(
                    JobStatus.FAILED,
                    "The plan has no available restore point to drill; run a backup first.",
                )
            self.items = [new_item(i["name"], target=i["name"]) for i in point.get("items") or []]
            self.job.update(restore_point_id=point["_id"], destination_id=point["destination_id"])
            await self._write(
                {
                    "restore_point_id": point["_id"],
                    "destination_id": point["destination_id"],
                    "items": self.items,
                }
            )
        return await super()._prepare()

    # ------------------------------------------------------------------ items

    def _request(self, index: int, item: Document, agent_job_id: str) -> dict[str, Any]:
        request = super()._request(index, item, agent_job_id)
        request["verify"] = True  # a drill: never the restore stages
        return request

    async def _run_item(self, index: int, item: Document) -> None:
        assert self.prepared is not None and self.prepared.info is not None
        if self.prepared.info.verifies:
            self.drill_kind = DrillKind.AGENT
            await super()._run_item(index, item)
        else:
            self.drill_kind = DrillKind.MANAGER
            await self._manager_side(index, item)

    async def _record(self, index: int, item: Document, agent_job_id: str, state: AgentJob) -> None:
        item["timings"] = _timings(state.timings)
        item["verify_script"] = state.verify_script
        said = [
            line
            for line in map(script_line, (state.logs.get("verify_errorlog") or "").splitlines())
            if line
        ]
        if state.status != JobStatus.SUCCEEDED and state.error_message and said:
            # What the DBA's script said last is the reason a person needs (the whole log is
            # on the item).
            state.error_message = f"{state.error_message}: {said[-1]}"
        await super()._record(index, item, agent_job_id, state)

    async def _manager_side(self, index: int, item: Document) -> None:
        """Download the item's object from the destination and check it against the
        recorded checksum (or size): what the manager can prove without the agent."""
        prepared = self.prepared
        assert prepared is not None
        stored = self._point_item(item["name"])
        key = stored.get("key")
        if not key:
            raise _ItemFailed("the restore point does not record the stored object's name")
        item.update(
            status=JobStatus.RUNNING,
            started_at=item.get("started_at") or self.clock.now(),
            stage="download",
            error=None,
        )
        await self._write({f"items.{index}": item})
        checksum = stored.get("checksum")
        expected = checksum.removeprefix("sha256:") if checksum else None
        digest = hashlib.sha256()
        size = 0
        started = time.monotonic()
        deadline = self.job.get("deadline_at")
        budget = self.settings.storage_timeout_seconds
        if deadline is not None:
            budget = max(1.0, (deadline - self.clock.now()).total_seconds())
        try:
            async with asyncio.timeout(budget):
                settings = restore_points.object_settings(prepared.dest, self.context.box)
                async with self.context.object_stores.use(settings) as objects:
                    async for chunk in objects.download(key, expected_sha256=expected):
                        digest.update(chunk)
                        size += len(chunk)
        except ChecksumMismatch:
            raise _ItemFailed(
                f"the stored object {key} does not match the checksum recorded at its backup "
                f"({checksum}): it was changed or is corrupt; {MANAGER_SIDE}"
            ) from None
        except ObjectNotFound:
            raise _ItemFailed(
                f"the stored object {key} is missing from the destination; {MANAGER_SIDE}"
            ) from None
        except TimeoutError:
            raise _ItemFailed(
                f"downloading {key} took longer than {budget:g} s; {MANAGER_SIDE}"
            ) from None
        except STORAGE_FAILURES as exc:
            raise _ItemFailed(
                f"downloading {key} failed ({storage_failure(exc)}); {MANAGER_SIDE}"
            ) from None
        seconds = round(time.monotonic() - started, 3)
        recorded = stored.get("stored_size")
        if recorded is not None and size != recorded:
            raise _ItemFailed(
                f"the stored object {key} has {size} bytes, the restore point records "
                f"{recorded}: it was changed or is corrupt; {MANAGER_SIDE}"
            )
        if expected:
            note = f"{MANAGER_SIDE}: {size} bytes downloaded, checksum {checksum} verified"
        else:
            note = (
                f"{MANAGER_SIDE}: {size} bytes downloaded; the backup recorded no checksum "
                f"(its agent reports none), so its size was compared (sha256:"
                f"{digest.hexdigest()})"
            )
        item.update(
            status=JobStatus.SUCCEEDED,
            stage="finished",
            ended_at=self.clock.now(),
            timings={"download_seconds": seconds, "decrypt_seconds": None, "verify_seconds": None},
            verify_script=None,
            logs={"manager_drill_log": note},
        )
        await self._write({f"items.{index}": item})

    # ------------------------------------------------------------------ the outcome

    async def _finish(
        self, status: str, reason: str | None, *, fields: dict[str, Any] | None = None
    ) -> None:
        outcome = None
        if status == JobStatus.SUCCEEDED:
            outcome = DrillOutcome.PASSED
        elif status == JobStatus.FAILED:
            outcome = DrillOutcome.FAILED
        drill = self._outcome(outcome, reason) if outcome is not None else None
        if drill is not None:
            # Recorded before the job ends, so that whoever sees the job ended sees the
            # outcome on the restore point and the plan too (a holder that dies in between
            # leaves the job to the next, whose drill outcome replaces this one).
            await self._record_outcome(drill)
        await super()._finish(status, reason, fields={**(fields or {}), "drill": drill})
        if drill is not None:
            await self._notify(drill)

    def _outcome(self, outcome: DrillOutcome, reason: str | None) -> Document:
        kind = self.drill_kind
        if kind is None:  # ended before an item ran: say what would have run it
            info = self.prepared.info if self.prepared is not None else None
            kind = DrillKind.AGENT if info is not None and info.verifies else DrillKind.MANAGER
        totals: dict[str, float | None] = {}
        for name in TIMINGS:
            values: list[float] = [
                float(v)
                for i in self.items
                if (v := (i.get("timings") or {}).get(name)) is not None
            ]
            totals[name] = round(sum(values), 3) if values else None
        scripts = [i.get("verify_script") for i in self.items if i.get("verify_script") is not None]
        return {
            "job_id": self.job["_id"],
            "restore_point_id": self.job.get("restore_point_id"),
            "at": self.clock.now(),
            "outcome": outcome,
            "reason": reason,
            "kind": kind,
            "verify_script": all(scripts) if scripts else None,
            "timings": totals,
        }

    async def _record_outcome(self, drill: Document) -> None:
        """The outcome on the restore point it proved and on the plan (best effort: the job
        holds it too)."""
        try:
            if drill["restore_point_id"]:
                await restore_points.record_drill(self.db, drill["restore_point_id"], drill)
            if self.job.get("plan_id"):
                await self.db.plans.update_one(
                    {
                        "_id": self.job["plan_id"],
                        # the job's instance's plan only: an imported point can name the
                        # plan of another instance
                        "instance_id": self.job["instance_id"],
                        "$or": [
                            {"last_drill.at": {"$exists": False}},
                            {"last_drill.at": {"$lte": drill["at"]}},
                        ],
                    },
                    {"$set": {"last_drill": drill}},
                )
        except Exception:
            self.log.exception("drill_outcome_not_recorded")

    async def _notify(self, drill: Document) -> None:
        """A failed drill is a webhook event (``drill.failed``)."""
        if drill["outcome"] == DrillOutcome.FAILED:
            await webhooks.emit(
                self.db,
                self.job["instance_id"],
                webhooks.EventType.DRILL_FAILED,
                self.job["_id"],
                {
                    "job_id": self.job["_id"],
                    "plan_id": self.job.get("plan_id"),
                    "restore_point_id": drill["restore_point_id"],
                    "reason": drill["reason"],
                    "kind": str(drill["kind"]),
                },
            )
        self.log.info("drill_finished", outcome=str(drill["outcome"]), kind=str(drill["kind"]))


def _timings(raw: dict[str, float] | None) -> dict[str, float | None]:
    raw = raw or {}
    out: dict[str, float | None] = {}
    for name in TIMINGS:
        value = raw.get(name)
        out[name] = round(float(value), 3) if isinstance(value, int | float) else None
    return out


# --------------------------------------------------------------------------- scheduling


def drill_job_id(plan_id: str, fire: datetime) -> str:
    """The id of the DRILL job of one drill fire: the same on every replica, so the primary
    key admits one job per fire whichever replica inserts first."""
    return uuid.uuid5(_DRILL_IDS, f"{plan_id}@drill@{fire.isoformat()}").hex


async def fire_due_drills(store: Database, now: datetime, *, batch: int = 500) -> int:
    """Queue the DRILL job of every plan whose drill fire is due; returns how many were
    queued. Exactly once per fire across replicas, as backups are (docs/scheduling.md): the
    job is inserted first under an id derived from (plan, fire), which the primary key admits
    once, then the plan's ``drill_next_run_at`` is advanced with a compare-and-set.

    A fire whose plan still has a drill queued or running is recorded as MISSED (saying so)
    rather than queuing a second; fires missed during an outage are not owed: the late one
    runs once and the next fire is the first after now."""
    queued = 0
    for _ in range(100):  # batches; bounded so that a pass always ends
        due = await (
            store.plans.find({"drill_next_run_at": {"$lte": now}}, DRILL_PLAN_FIELDS)
            .limit(batch)
            .to_list()
        )
        if not due:
            break
        busy = {
            (d["plan_id"], d.get("instance_id"))
            for d in await store.jobs.find(
                {
                    "plan_id": {"$in": [p["_id"] for p in due]},
                    "type": JobType.DRILL,
                    "status": {"$in": list(ACTIVE)},
                },
                {"plan_id": 1, "instance_id": 1},
            ).to_list()
        }
        for plan in due:
            mine = (plan["_id"], plan.get("instance_id"))
            queued += await _fire(store, plan, now, busy=mine in busy)
        if len(due) < batch:
            break
    if queued:
        store.events.jobs_queued.fire()
    return queued


async def _fire(store: Database, plan: Document, now: datetime, *, busy: bool) -> int:
    fire: datetime = plan["drill_next_run_at"]
    drill = plan.get("drill") or {}
    try:
        nxt = schedule.next_fire_time(drill["frequency"], plan["timezone"], max(fire, now))
    except (InvalidInput, KeyError) as exc:
        log.error("plan_drill_schedule_broken", plan=plan["_id"], error=str(exc))
        nxt = None  # stopped until the plan is corrected (a PATCH recomputes it)
    job = new_drill_job(plan, None, trigger=Trigger.SCHEDULE, drill_for=fire)
    job["_id"] = drill_job_id(plan["_id"], fire)
    if busy or nxt is None:
        job.update(
            status=JobStatus.MISSED,
            ended_at=job["created_at"],
            reason=(
                "Skipped: the plan's previous drill had not ended yet."
                if busy
                else "Not run: the plan's drill schedule cannot be evaluated; correct it."
            ),
        )
    inserted = True
    try:
        await store.jobs.insert_one(job)
    except DuplicateKeyError:
        inserted = False  # another replica (or an earlier attempt) recorded this fire
    await store.plans.update_one(
        {"_id": plan["_id"], "drill_next_run_at": fire}, {"$set": {"drill_next_run_at": nxt}}
    )
    if inserted and job["status"] == JobStatus.QUEUED:
        log.info("plan_drill_fired", plan=plan["_id"], job=job["_id"], fire=fire.isoformat())
        return 1
    return 0
