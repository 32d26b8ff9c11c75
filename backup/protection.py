"""Whether each instance is protected: a plan's recovery point objective (RPO) against its
newest good restore point, its last backup job, its destination's last check and its last
restore drill (docs/protection.md).

- :func:`effective_rpo` gives a plan's RPO: its ``rpo_seconds``, else one derived from its
  schedule (1.5 times the longest gap between fires of its cron, in its zone, over a year).
- :func:`assess` is the rule itself, a pure function of what is known about one plan at a
  moment: it answers a :class:`ProtectionState` and the reasons in words.
- :func:`evaluate` gathers those facts for one instance or the whole fleet in a fixed number
  of queries (not one per plan), and :func:`refresh` stores the result per instance (the
  ``protection`` collection, which the fleet view and the metrics read) and emits a
  ``protection.changed`` webhook event for each plan whose state changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from typing import Any

import structlog
from croniter import croniter
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from pymongo import UpdateOne

from backup import schedule, webhooks
from backup.clock import Clock, SystemClock
from backup.database import SCHEMA_VERSION, Database, Document
from backup.instances import LIVE_STATES
from backup.jobs import DrillOutcome, JobStatus, JobType
from backup.pagination import Page, paginate

log = structlog.get_logger(__name__)

RPO_FACTOR = 1.5
"""A derived RPO is this many times the longest gap between a plan's fires."""
_WINDOW = timedelta(days=366)
_LONG_WINDOW = timedelta(days=9 * 366)
"""A schedule that fires less than twice a year (29 February) is measured over nine."""
_MAX_FIRES = 1_000
"""A dense schedule's gaps are measured over its first this many fires of the window."""


class ProtectionState(StrEnum):
    """From best to worst; an instance's state is the worst of its plans'."""

    PROTECTED = "protected"
    AT_RISK = "at_risk"
    UNPROTECTED = "unprotected"


_RANK = {ProtectionState.PROTECTED: 0, ProtectionState.AT_RISK: 1, ProtectionState.UNPROTECTED: 2}


def worst(states: Iterable[ProtectionState]) -> ProtectionState:
    """The worst of ``states`` (an empty set is unprotected: nothing protects it)."""
    return max(states, key=_RANK.__getitem__, default=ProtectionState.UNPROTECTED)


# --- the objective ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rpo:
    seconds: int
    derived: bool
    """True when computed from the schedule (the plan sets no ``rpo_seconds``)."""


def effective_rpo(plan: Document, *, year: int | None = None) -> Rpo:
    """``plan``'s objective: its ``rpo_seconds``, else derived from its schedule over the
    year ``year`` (default: this one) in its zone."""
    chosen = plan.get("rpo_seconds")
    if isinstance(chosen, int) and chosen > 0:
        return Rpo(chosen, False)
    year = year or datetime.now(UTC).year
    gap = longest_gap_seconds(plan["frequency"], plan.get("timezone") or "UTC", year)
    return Rpo(round(gap * RPO_FACTOR), True)


@lru_cache(maxsize=4096)
def longest_gap_seconds(frequency: str, timezone: str, year: int) -> int:
    """The longest time between two consecutive fires of ``frequency`` in ``timezone`` over
    the 366 days from 1 January of ``year``: daylight saving changes are inside, so a daily
    03:00 plan's longest gap is 25 hours. Bounded: a dense schedule is measured over its
    first 1,000 fires (an hourly one over 41 days); one that fires less than twice a year
    (29 February) over nine years; one that fires less than twice even then counts the whole
    window. The fires follow :func:`backup.schedule.next_fire_time`'s rule for a repeated
    hour. Cached: plans share a few schedules."""
    tz = schedule.zone(timezone)
    repeats_skipped = schedule._fixed_hour(frequency)
    start = datetime(year, 1, 1, tzinfo=UTC)
    for window in (_WINDOW, _LONG_WINDOW):
        end = start + window
        fires: list[datetime] = []
        it = croniter(frequency, start.astimezone(tz))
        while len(fires) < _MAX_FIRES:
            at = it.get_next(datetime).astimezone(UTC)
            if at > end:
                break
            if not (repeats_skipped and schedule._second_pass(at, tz)):
                fires.append(at)
        if len(fires) >= 2:
            return int(max(b - a for a, b in itertools.pairwise(fires)).total_seconds())
    return int(_LONG_WINDOW.total_seconds())


# --- the rule --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Facts:
    """What is known about one plan at ``now``; every field may be unknown (None)."""

    now: datetime
    rpo_seconds: int
    paused: bool = False
    last_good_at: datetime | None = None
    """When the newest available restore point of the plan was taken."""
    next_run_at: datetime | None = None
    """The plan's next scheduled backup."""
    typical_duration_seconds: float | None = None
    """How long a backup of this plan takes: its last successful one's duration."""
    last_job_status: str | None = None
    """The final status of the plan's latest ended backup job."""
    last_job_reason: str | None = None
    destination_check_ok: bool | None = None
    """The outcome of the plan's destination's last check (None: never checked)."""
    destination_check_reason: str | None = None
    drills_configured: bool = False
    last_drill_outcome: str | None = None
    last_drill_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Assessment:
    state: ProtectionState
    reasons: tuple[str, ...]
    """Why, worst first; the first one is the state's reason."""
    lapses_at: datetime | None = None
    """When the newest good backup stops meeting the objective (None: there is none)."""

    @property
    def reason(self) -> str:
        return self.reasons[0]


def duration_words(seconds: float) -> str:
    """A span a person reads at a glance: "26 hours", "3 days", "45 minutes"."""
    seconds = max(0.0, seconds)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        # days from two days on, hours from two hours on: "26 hours" reads better than "1 day"
        if seconds >= 2 * size or (unit == "minute" and seconds >= size):
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    n = int(seconds)
    return f"{n} second{'s' if n != 1 else ''}"


def _at(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _because(text: str | None) -> str:
    return f": {text.rstrip('.')}." if text else "."


def assess(facts: Facts) -> Assessment:
    """The plan's state and why (docs/protection.md):

    - ``unprotected``: the plan is paused, or it has no good restore point within its RPO;
    - ``at_risk``: the last backup failed, the destination's last check failed, the last
      drill failed (or drills are configured and none has passed yet), or the RPO will lapse
      before the next backup can finish (its next fire plus its typical duration);
    - ``protected``: otherwise.
    """
    objective = duration_words(facts.rpo_seconds)
    unprotected: list[str] = []
    at_risk: list[str] = []
    lapsing: list[str] = []  # after the faults found: what they will lead to
    lapses_at = None
    if facts.paused:
        unprotected.append("The plan is paused: no backup runs until it is resumed.")
    if facts.last_good_at is None:
        unprotected.append(f"No good backup yet; the objective is {objective}.")
    else:
        age = (facts.now - facts.last_good_at).total_seconds()
        lapses_at = facts.last_good_at + timedelta(seconds=facts.rpo_seconds)
        if age > facts.rpo_seconds:
            unprotected.append(
                f"No good backup for {duration_words(age)}; the objective is {objective}."
            )
        elif facts.next_run_at is not None and not facts.paused:
            done_at = facts.next_run_at + timedelta(
                seconds=max(0.0, facts.typical_duration_seconds or 0.0)
            )
            if done_at > lapses_at:
                lapsing.append(
                    f"The objective of {objective} lapses at {_at(lapses_at)}, before the next "
                    f"backup (due {_at(facts.next_run_at)}) can finish."
                )
    if facts.last_job_status == JobStatus.FAILED:
        at_risk.append("The last backup failed" + _because(facts.last_job_reason))
    elif facts.last_job_status == JobStatus.MISSED:
        at_risk.append("The last scheduled backup was missed" + _because(facts.last_job_reason))
    if facts.destination_check_ok is False:
        at_risk.append(
            "The destination's last check failed" + _because(facts.destination_check_reason)
        )
    if facts.last_drill_outcome == DrillOutcome.FAILED:
        at_risk.append("The last restore drill failed" + _because(facts.last_drill_reason))
    elif facts.drills_configured and facts.last_drill_outcome is None:
        at_risk.append("Restore drills are configured but none has run yet.")
    at_risk += lapsing
    if unprotected:
        return Assessment(ProtectionState.UNPROTECTED, (*unprotected, *at_risk), lapses_at)
    if at_risk:
        return Assessment(ProtectionState.AT_RISK, tuple(at_risk), lapses_at)
    assert facts.last_good_at is not None
    age = (facts.now - facts.last_good_at).total_seconds()
    proven = " and the last restore drill passed" if facts.drills_configured else ""
    return Assessment(
        ProtectionState.PROTECTED,
        (f"The newest good backup is {duration_words(age)} old (objective {objective}){proven}.",),
        lapses_at,
    )


# --- gathering the facts ---------------------------------------------------------------------


@dataclass
class PlanProtection:
    plan_id: str
    name: str
    state: ProtectionState
    reasons: list[str]
    rpo_seconds: int
    rpo_derived: bool
    paused: bool
    last_good_at: datetime | None
    lapses_at: datetime | None
    next_run_at: datetime | None

    @property
    def reason(self) -> str:
        return self.reasons[0]

    def as_document(self) -> Document:
        return {
            "plan_id": self.plan_id,
            "name": self.name,
            "state": str(self.state),
            "reasons": self.reasons,
            "rpo_seconds": self.rpo_seconds,
            "rpo_derived": self.rpo_derived,
            "paused": self.paused,
            "last_good_at": self.last_good_at,
            "lapses_at": self.lapses_at,
            "next_run_at": self.next_run_at,
        }


NO_PLAN = "The instance has no backup plan."


@dataclass
class InstanceProtection:
    instance_id: str
    created_at: datetime
    evaluated_at: datetime
    plans: list[PlanProtection] = field(default_factory=list)

    @property
    def state(self) -> ProtectionState:
        return worst(p.state for p in self.plans)

    @property
    def reason(self) -> str:
        """The worst plan's reason, named; or that there is no plan."""
        if not self.plans:
            return NO_PLAN
        bad = max(self.plans, key=lambda p: _RANK[p.state])
        return bad.reason if len(self.plans) == 1 else f"Plan {bad.name!r}: {bad.reason}"


_PLAN_FIELDS = {
    "instance_id": 1,
    "name": 1,
    "frequency": 1,
    "timezone": 1,
    "paused": 1,
    "rpo_seconds": 1,
    "next_run_at": 1,
    "last_job_id": 1,
    "destination_id": 1,
    "drill": 1,
    "last_drill": 1,
    "created_at": 1,
}


def _aware(moment: Any) -> datetime | None:
    if not isinstance(moment, datetime):
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


async def evaluate(
    db: Database, now: datetime, *, instance_ids: Sequence[str] | None = None
) -> list[InstanceProtection]:
    """Every live instance's protection (or those of ``instance_ids``) at ``now``, in a fixed
    number of queries whatever the number of plans: the instances, their plans, each plan's
    newest available restore point (one aggregation), the jobs those name (the plans' latest
    and the points' own, for the typical duration) and the destinations' last checks."""
    scope: dict[str, Any] = {} if instance_ids is None else {"_id": _one_of(instance_ids)}
    instances = await db.instances.find(
        {**scope, "state": {"$in": [str(s) for s in LIVE_STATES]}}, {"created_at": 1}
    ).to_list()
    if not instances:
        return []
    ids = [str(i["_id"]) for i in instances]
    by_instance: dict[str, list[Document]] = {i: [] for i in ids}
    plan_scope = {} if instance_ids is None else {"instance_id": _one_of(ids)}
    async for plan in db.plans.find(plan_scope, _PLAN_FIELDS):
        if plan.get("instance_id") in by_instance:
            by_instance[plan["instance_id"]].append(plan)
    plans = [p for group in by_instance.values() for p in group]
    newest = await _newest_points(plans, db, every=instance_ids is None)
    job_ids = {p["last_job_id"] for p in plans if p.get("last_job_id")}
    job_ids |= {n["job_id"] for n in newest.values() if n.get("job_id")}
    jobs = await _jobs(db, job_ids)
    checks = await _destination_checks(db, {p.get("destination_id") for p in plans})
    out = []
    for instance in instances:
        iid = str(instance["_id"])
        created = _aware(instance.get("created_at")) or now
        result = InstanceProtection(iid, created, now)
        for plan in sorted(by_instance[iid], key=lambda p: str(p.get("name"))):
            result.plans.append(_plan_protection(plan, newest, jobs, checks, now))
        out.append(result)
    return out


def _one_of(ids: Sequence[str]) -> Any:
    """A filter on ids: equality for one (the embedded database's planner uses an index for
    it, not for ``$in``)."""
    return ids[0] if len(ids) == 1 else {"$in": list(ids)}


async def _newest_points(
    plans: list[Document], db: Database, *, every: bool
) -> dict[str, Document]:
    """Per plan: its instance's newest available restore point's time and job (a point
    imported into another instance keeps the plan's id, and protects only that instance): one
    aggregation for the fleet (``every``), one indexed lookup per plan for a few plans."""
    owner = {str(p["_id"]): p.get("instance_id") for p in plans}
    if not every and len(plans) <= _IN_BATCH:
        found = await asyncio.gather(
            *(
                db.restore_points.find_one(
                    {"plan_id": plan_id, "instance_id": iid, "state": "available"},
                    {"created_at": 1, "job_id": 1},
                    sort=[("created_at", -1)],
                )
                for plan_id, iid in owner.items()
            )
        )
        return {
            plan_id: {"_id": plan_id, "at": point["created_at"], "job_id": point.get("job_id")}
            for plan_id, point in zip(owner, found, strict=True)
            if point is not None
        }
    match: dict[str, Any] = {"state": "available"}
    if not every:
        match["plan_id"] = {"$in": list(owner)}
    pipeline: list[dict[str, Any]] = [
        {"$match": match},
        {"$sort": {"plan_id": 1, "instance_id": 1, "created_at": -1}},
        {
            "$group": {
                "_id": {"plan": "$plan_id", "instance": "$instance_id"},
                "at": {"$first": "$created_at"},
                "job_id": {"$first": "$job_id"},
            }
        },
    ]
    cursor = await db.restore_points.aggregate(pipeline)
    newest: dict[str, Document] = {}
    async for d in cursor:
        plan_id, iid = str(d["_id"]["plan"]), d["_id"]["instance"]
        if plan_id in owner and owner[plan_id] == iid:
            newest[plan_id] = {**d, "_id": plan_id}
    return newest


_IN_BATCH = 50
"""Ids per ``$in`` query: the embedded database's cost grows faster than the list's length."""


async def _jobs(db: Database, ids: set[str]) -> dict[str, Document]:
    fields = {"status": 1, "type": 1, "reason": 1, "error": 1, "started_at": 1, "ended_at": 1}
    wanted = sorted(ids)
    out: dict[str, Document] = {}
    for start in range(0, len(wanted), _IN_BATCH):
        batch = wanted[start : start + _IN_BATCH]
        out |= {str(d["_id"]): d async for d in db.jobs.find({"_id": {"$in": batch}}, fields)}
    return out


async def _destination_checks(db: Database, ids: set[Any]) -> dict[str, Document]:
    wanted = sorted(i for i in ids if isinstance(i, str))
    if not wanted:
        return {}
    found = db.destinations.find(
        {"_id": {"$in": wanted}, "last_check": {"$type": "object"}}, {"last_check": 1}
    )
    return {str(d["_id"]): d["last_check"] async for d in found}


def _plan_protection(
    plan: Document,
    newest: dict[str, Document],
    jobs: dict[str, Document],
    checks: dict[str, Document],
    now: datetime,
) -> PlanProtection:
    rpo = effective_rpo(plan, year=now.year)
    point = newest.get(str(plan["_id"]))
    last_good_at = _aware(point["at"]) if point else None
    typical = None
    if point and point.get("job_id") in jobs:
        made_by = jobs[point["job_id"]]
        started, ended = _aware(made_by.get("started_at")), _aware(made_by.get("ended_at"))
        if started and ended:
            typical = (ended - started).total_seconds()
    last = jobs.get(plan.get("last_job_id") or "")
    last_status = last_reason = None
    if last is not None and last.get("type", JobType.BACKUP) == JobType.BACKUP:
        last_status = last.get("status")
        last_reason = last.get("reason") or last.get("error")
    check = checks.get(plan.get("destination_id") or "")
    drill = plan.get("drill") or None
    last_drill = plan.get("last_drill") or None
    paused = bool(plan.get("paused"))
    next_run_at = _aware(plan.get("next_run_at"))
    verdict = assess(
        Facts(
            now=now,
            rpo_seconds=rpo.seconds,
            paused=paused,
            last_good_at=last_good_at,
            next_run_at=next_run_at,
            typical_duration_seconds=typical,
            last_job_status=last_status,
            last_job_reason=str(last_reason) if last_reason else None,
            destination_check_ok=check.get("ok") if check else None,
            destination_check_reason=check.get("reason") if check else None,
            drills_configured=bool(drill and drill.get("enabled", True)),
            last_drill_outcome=last_drill.get("outcome") if last_drill else None,
            last_drill_reason=last_drill.get("reason") if last_drill else None,
        )
    )
    return PlanProtection(
        plan_id=str(plan["_id"]),
        name=str(plan.get("name") or plan["_id"]),
        state=verdict.state,
        reasons=list(verdict.reasons),
        rpo_seconds=rpo.seconds,
        rpo_derived=rpo.derived,
        paused=paused,
        last_good_at=last_good_at,
        lapses_at=verdict.lapses_at,
        next_run_at=next_run_at,
    )


async def record_destination_check(
    db: Database, instance_id: str, destination_id: str, *, ok: bool | None, reason: str | None
) -> None:
    """Keep the outcome of a check of a stored destination (``last_check``: ok, reason, at),
    which the rule reads; ``ok`` None forgets it (the settings changed unchecked, so an
    earlier outcome says nothing about them)."""
    where = {"_id": destination_id, "instance_id": instance_id}
    if ok is None:
        await db.destinations.update_one(where, {"$unset": {"last_check": ""}})
        return
    check = {"ok": ok, "reason": None if ok else reason, "at": datetime.now(UTC)}
    await db.destinations.update_one(where, {"$set": {"last_check": check}})


# --- the stored state and its changes --------------------------------------------------------


def _document(result: InstanceProtection) -> Document:
    return {
        "instance_id": result.instance_id,
        "created_at": result.created_at,
        "state": str(result.state),
        "reason": result.reason,
        "plans": [p.as_document() for p in result.plans],
        "evaluated_at": result.evaluated_at,
        "schema_version": SCHEMA_VERSION,
    }


@dataclass(frozen=True, slots=True)
class Change:
    instance_id: str
    plan_id: str | None
    """None: the instance itself (its last plan was deleted)."""
    previous: ProtectionState | None
    state: ProtectionState
    reason: str


def _signature(doc: Document) -> Any:
    """What a stored state says, but for the time it was computed and the figures of its
    reasons ("for 26 hours" becomes "for # hours"): an entry whose signature is unchanged is
    not rewritten until it is ``max_age`` old."""
    words = re.compile(r"\d+")

    def plain(plan: Document) -> Document:
        return {**plan, "reasons": [words.sub("#", r) for r in plan.get("reasons") or []]}

    return (
        doc.get("state"),
        words.sub("#", str(doc.get("reason"))),
        [plain(p) for p in doc.get("plans") or []],
    )


async def refresh(
    db: Database,
    now: datetime,
    *,
    instance_ids: Sequence[str] | None = None,
    max_age: timedelta = timedelta(minutes=15),
) -> list[Change]:
    """Evaluate (every live instance, or ``instance_ids``), store each instance's protection
    (``protection`` collection: the fleet view and the metrics read it; an entry that says
    the same as before, but for its figures, is rewritten only once ``max_age`` old, so an
    evaluation of a quiet fleet writes little), drop the entries of
    instances no longer live, and emit a ``protection.changed`` event for each plan whose
    state changed since the last refresh (a plan seen for the first time is no change: a
    new plan, or the first refresh, emits nothing). When replicas refresh at once, each
    change is stored and emitted by one of them. Returns the changes this call emitted."""
    results = await evaluate(db, now, instance_ids=instance_ids)
    scope: dict[str, Any] = {} if instance_ids is None else {"_id": _one_of(instance_ids)}
    stored = {str(d["_id"]): d async for d in db.protection.find(scope)}
    changes: list[Change] = []
    writes = []
    contested: list[tuple[Document, Document, list[Change]]] = []
    for result in results:
        before = stored.pop(result.instance_id, None)
        found = _changes(before, result)
        doc = _document(result)
        if found and before is not None:
            contested.append((before, doc, found))
        elif (
            before is None
            or _signature(before) != _signature(doc)
            or not isinstance(before.get("evaluated_at"), datetime)
            or before["evaluated_at"] <= now - max_age
        ):
            writes.append(UpdateOne({"_id": result.instance_id}, {"$set": doc}, upsert=True))
    if writes:
        await db.protection.bulk_write(writes, ordered=False)
    for before, doc, found in contested:
        # Replicas evaluate on their own: a change is stored, and emitted, by the one that
        # replaces the state it read (compare and set), so each change is one event.
        won = await db.protection.update_one(
            {"_id": before["_id"], "evaluated_at": before.get("evaluated_at")}, {"$set": doc}
        )
        if won.modified_count == 1:
            changes += found
    if instance_ids is None:
        await _write_summary(db, results, now)
    if stored:  # deleted, deprovisioned: nothing left to protect or to list
        await db.protection.delete_many({"_id": {"$in": list(stored)}})
    if changes:
        listening = set(
            await db.webhooks.distinct(
                "instance_id",
                {"enabled": True, "events": str(webhooks.EventType.PROTECTION_CHANGED)},
            )
        )
        for change in changes:
            await on_state_change(db, change, notify=change.instance_id in listening)
    return changes


SUMMARY_ID = "fleet"
SUMMARY_PLANS_ID = "fleet-plans"
SUMMARY_MAX_PLANS = 100_000
"""Beyond this many plans the summary keeps the counts only (a document holds 16 MiB)."""


async def _write_summary(db: Database, results: list[InstanceProtection], now: datetime) -> None:
    """What the metrics show (``protection_summary``): instances per state and when the
    fleet was evaluated (``_id`` "fleet"), and a row per plan (instance, plan, state, newest
    good point, objective; ``_id`` "fleet-plans"), so that a scrape reads one or two
    documents, not the fleet."""
    by_state: dict[str, int] = {}
    rows: list[list[Any]] = []
    for result in results:
        by_state[str(result.state)] = by_state.get(str(result.state), 0) + 1
        rows += [
            [result.instance_id, p.plan_id, str(p.state), p.last_good_at, p.rpo_seconds]
            for p in result.plans
        ]
    kept = rows if len(rows) <= SUMMARY_MAX_PLANS else []
    # the rows first: a reader that finds the counts of an evaluation finds its rows too
    await db.protection_summary.replace_one(
        {"_id": SUMMARY_PLANS_ID},
        {"plans": kept, "plans_omitted": len(rows) - len(kept), "evaluated_at": now},
        upsert=True,
    )
    await db.protection_summary.replace_one(
        {"_id": SUMMARY_ID},
        {"evaluated_at": now, "by_state": by_state, "schema_version": SCHEMA_VERSION},
        upsert=True,
    )


async def summary(db: Database, *, plans: bool = True) -> Document | None:
    """The last fleet evaluation's summary (counts per state, when) and, if ``plans``, its
    per-plan rows (``plans``), or None; without the rows it is one small document."""
    found = await db.protection_summary.find_one({"_id": SUMMARY_ID})
    if found is not None and plans:
        rows = await db.protection_summary.find_one({"_id": SUMMARY_PLANS_ID}, {"plans": 1})
        found["plans"] = (rows or {}).get("plans") or []
    return found


def _state(value: Any) -> ProtectionState | None:
    return ProtectionState(value) if value in tuple(ProtectionState) else None


def _changes(before: Document | None, result: InstanceProtection) -> list[Change]:
    if before is None:
        return []
    previous = {str(p.get("plan_id")): _state(p.get("state")) for p in before.get("plans") or []}
    out = [
        Change(result.instance_id, p.plan_id, previous[p.plan_id], p.state, p.reason)
        for p in result.plans
        if previous.get(p.plan_id) not in (None, p.state)
    ]
    if not result.plans and before.get("plans"):  # its last plan went
        out.append(
            Change(
                result.instance_id,
                None,
                _state(before.get("state")),
                ProtectionState.UNPROTECTED,
                NO_PLAN,
            )
        )
    return out


async def on_state_change(db: Database, change: Change, *, notify: bool = True) -> None:
    """A plan's (or a plan-less instance's) state changed: logged, and a
    ``protection.changed`` event for the instance's webhooks (``notify``: it has one that
    wants it). A failure to record the event is logged: the state is stored anyway."""
    log.info(
        "protection_changed",
        instance_id=change.instance_id,
        plan_id=change.plan_id,
        previous=change.previous,
        state=change.state,
    )
    if not notify:
        return
    try:
        await webhooks.emit(
            db,
            change.instance_id,
            webhooks.EventType.PROTECTION_CHANGED,
            change.plan_id or change.instance_id,
            {
                "instance_id": change.instance_id,
                "plan_id": change.plan_id,
                "previous_state": change.previous,
                "state": change.state,
                "reason": change.reason,
            },
        )
    except Exception:
        log.exception("protection_event_not_recorded", instance_id=change.instance_id)


async def fleet_page(
    db: Database, state: ProtectionState | None, *, limit: int, cursor: str | None
) -> Page:
    """One page of the stored protection of every live instance (newest instance first),
    only those in ``state`` if given."""
    query: dict[str, Any] = {} if state is None else {"state": str(state)}
    return await paginate(db.protection, query, limit=limit, cursor=cursor)


# --- the background evaluator ----------------------------------------------------------------


class ProtectionSettings(BaseSettings):
    """The background evaluator's settings, from environment variables."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    enabled: bool = Field(
        default=True,
        validation_alias="PROTECTION_ENABLED",
        description="Re-evaluate every instance's protection on this replica.",
    )
    interval_seconds: float = Field(
        default=60.0,
        gt=0,
        le=86400,
        validation_alias="PROTECTION_INTERVAL_SECONDS",
        description="Seconds between evaluations of the fleet (sooner after a job ends or a "
        "plan changes).",
    )
    min_gap_seconds: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        validation_alias="PROTECTION_MIN_GAP_SECONDS",
        description="At least this long between two evaluations, however many jobs end.",
    )


class ProtectionEvaluator:
    """One replica's loop: :func:`refresh` of the whole fleet every ``interval_seconds``, and
    sooner when :meth:`wake` is called (a job ended, a plan changed), at most once every
    ``min_gap_seconds``. A failed evaluation is logged and tried again at the next turn."""

    def __init__(
        self, db: Database, settings: ProtectionSettings, *, clock: Clock | None = None
    ) -> None:
        self.db, self.settings = db, settings
        self.clock = clock or SystemClock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.evaluations = 0

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="protection-evaluator")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        while True:
            try:
                await refresh(self.db, self.clock.now())
                self.evaluations += 1
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("protection_evaluation_failed")
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError  # a cancel the driver swallowed: honour it
            await self.clock.sleep(self.settings.min_gap_seconds)
            await self.clock.wait(self._wake, self.settings.interval_seconds)
            self._wake.clear()
