"""Backup plans: what to back up, when (cron in an IANA zone), where, and how long to keep it.

The encryption key is a secret: supplied by the user or generated here, sealed under
``secrets.encryption_key``, never returned (``encryption.key_set`` instead). Once set it is
never replaced or dropped, because earlier restore points need it to be restored.
"""

from __future__ import annotations

import secrets as random
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pymongo.errors import DuplicateKeyError

from backup import schedule
from backup.database import SCHEMA_VERSION, Database, Document
from backup.errors import Conflict, InvalidInput, NotFound
from backup.merge_patch import merge_patch
from backup.pagination import Page, now, paginate
from backup.secrets import SecretBox

Name = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")]
ItemName = Annotated[str, Field(min_length=1, max_length=256)]


def _unset(value: object) -> bool:
    return value is None


def _count(what: str) -> Any:
    return Field(
        default=None,
        ge=1,
        le=10_000,
        exclude_if=_unset,
        description=f"Keep the newest restore point of each of the newest N {what} that have "
        "one (calendar periods in the plan's time zone).",
    )


class Retention(BaseModel):
    """Which restore points a plan keeps: a point is kept if ANY rule keeps it (see
    docs/retention.md). Unset rules are left out of answers."""

    model_config = ConfigDict(extra="forbid", strict=True)

    style: Literal["DAYS", "HOURS", "FILES"] | None = Field(
        default=None,
        exclude_if=_unset,
        description="Keep restore points for `period` days or hours, or keep the last `period`.",
    )
    period: int | None = Field(default=None, ge=1, le=100_000, exclude_if=_unset)
    daily: int | None = _count("days")
    weekly: int | None = _count("ISO weeks")
    monthly: int | None = _count("months")
    yearly: int | None = _count("years")
    min_good: int | None = Field(
        default=None,
        ge=0,
        le=10_000,
        exclude_if=_unset,
        description="Retention never leaves fewer restore points than this, whatever their age.",
    )

    @model_validator(mode="after")
    def _a_rule(self) -> Retention:
        if (self.style is None) != (self.period is None):
            raise ValueError("style and period go together: send both, or neither")
        if self.style is None and not (self.daily or self.weekly or self.monthly or self.yearly):
            raise ValueError(
                "a retention needs a rule: style and period, or at least one of daily, "
                "weekly, monthly, yearly"
            )
        return self


class EncryptionIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    enabled: bool = False
    key: SecretStr | None = Field(
        default=None,
        min_length=16,
        max_length=1024,
        description="Optional key material; generated when encryption is enabled without one. "
        "Never returned. Cannot be replaced once set.",
    )


class DrillSpec(BaseModel):
    """A plan's restore drills (docs/jobs.md, "Restore drills"): when the newest restore
    point is downloaded, decrypted, checked and handed to the DBA's verify script."""

    model_config = ConfigDict(extra="forbid", strict=True)

    frequency: str = Field(
        min_length=1,
        max_length=200,
        description="Five-field cron in the plan's time zone, e.g. '0 5 * * 0'.",
    )
    enabled: bool = Field(default=True, description="false keeps the schedule but runs none.")


class PlanSpec(BaseModel):
    """A whole plan as the user describes it (creation, and the merged result of a PATCH)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name
    destination_id: str = Field(min_length=1, max_length=64)
    frequency: str = Field(
        min_length=1, max_length=200, description="Five-field cron, e.g. '0 3 * * *'."
    )
    timezone: str = Field(default="UTC", min_length=1, max_length=64, description="IANA zone.")
    items: list[ItemName] | None = Field(
        default=None,
        max_length=1000,
        description="Backup items among the instance's; omitted: all of them.",
    )
    retention: Retention
    compression: bool = True
    encryption: EncryptionIn = Field(default_factory=EncryptionIn)
    paused: bool = False
    rpo_seconds: int | None = Field(
        default=None,
        ge=60,
        le=5 * 366 * 86400,
        description="Recovery point objective: the age the newest good backup may reach "
        "before the plan counts as unprotected. Omitted: 1.5 times the longest gap between "
        "the schedule's fires over a year (docs/protection.md).",
    )
    drill: DrillSpec | None = Field(
        default=None, description="Scheduled restore drills; null: none (manual ones still run)."
    )

    @field_validator("name")
    @classmethod
    def _strip(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()


def _context(plan_id: str) -> str:
    return f"plans/{plan_id}"


async def _check(
    store: Database, instance: Document, spec: PlanSpec, min_interval: int
) -> list[str]:
    schedule.validate_frequency(spec.frequency, min_interval)
    schedule.zone(spec.timezone)
    if spec.drill is not None:
        _check_drill(spec.drill, min_interval)
    registered: list[str] = list(instance.get("items") or [])
    items = list(spec.items) if spec.items is not None else registered
    if not items:
        raise InvalidInput(
            "A plan needs at least one backup item, and this instance has none registered.",
            code="invalid_items",
            field="items",
        )
    if len(set(items)) != len(items):
        raise InvalidInput("'items' lists an item twice.", code="invalid_items", field="items")
    unknown = [i for i in items if i not in registered]
    if unknown:
        raise InvalidInput(
            f"{unknown[0]!r} is not a backup item of this instance; its items are "
            f"{', '.join(registered) or '(none)'}.",
            code="unknown_item",
            field="items",
        )
    dest = await store.destinations.find_one(
        {"_id": spec.destination_id, "instance_id": instance["_id"]}, {"_id": 1}
    )
    if dest is None:
        raise InvalidInput(
            f"This instance has no destination {spec.destination_id!r}; create it first.",
            code="unknown_destination",
            field="destination_id",
        )
    return items


def _check_drill(drill: DrillSpec, min_interval: int) -> None:
    """A drill's cron is validated like the plan's frequency; its errors name its field."""
    try:
        schedule.validate_frequency(drill.frequency, min_interval)
    except InvalidInput as exc:
        raise InvalidInput(
            "drill." + exc.description, code=exc.code, field="drill.frequency"
        ) from None


def _next_drill(spec: PlanSpec, after: datetime | None = None) -> Any:
    """The plan's next drill fire, or None (no drill, disabled, or the plan paused)."""
    if spec.drill is None or not spec.drill.enabled or spec.paused:
        return None
    return schedule.next_fire_time(spec.drill.frequency, spec.timezone, after or now())


def _next_run(spec: PlanSpec, after: datetime | None = None) -> Any:
    """The first fire after ``after`` (default: now), or None for a paused plan. Creating,
    resuming and changing the frequency or time zone all schedule from now: fires of the old
    schedule that were not yet due are not owed."""
    if spec.paused:
        return None
    return schedule.next_fire_time(spec.frequency, spec.timezone, after or now())


def _fields(spec: PlanSpec, items: list[str]) -> Document:
    return {
        "name": spec.name,
        "destination_id": spec.destination_id,
        "frequency": " ".join(spec.frequency.split()),
        "timezone": spec.timezone,
        "items": items,
        "retention": spec.retention.model_dump(),
        "compression": spec.compression,
        "encryption": {"enabled": spec.encryption.enabled},
        "paused": spec.paused,
        "rpo_seconds": spec.rpo_seconds,
        "drill": (
            {"frequency": " ".join(spec.drill.frequency.split()), "enabled": spec.drill.enabled}
            if spec.drill is not None
            else None
        ),
    }


def _duplicate(name: str) -> Conflict:
    return Conflict(
        f"This instance already has a plan named {name!r}; choose another name.",
        code="duplicate_name",
        field="name",
    )


async def create(
    store: Database,
    box: SecretBox,
    instance: Document,
    spec: PlanSpec,
    min_interval: int,
    *,
    schedule_from: datetime | None = None,
) -> Document:
    """``schedule_from``: compute the first fire after this time instead of now (tests that
    drive the scheduler with a manual clock)."""
    items = await _check(store, instance, spec, min_interval)
    plan_id = uuid.uuid4().hex
    key = spec.encryption.key.get_secret_value() if spec.encryption.key else None
    if key is None and spec.encryption.enabled:
        key = random.token_urlsafe(32)
    at = now()
    doc: Document = {
        "_id": plan_id,
        "instance_id": instance["_id"],
        **_fields(spec, items),
        "secrets": box.seal_map({"encryption_key": key}, _context(plan_id)),
        "next_run_at": _next_run(spec, schedule_from),
        "drill_next_run_at": _next_drill(spec, schedule_from),
        "last_job_id": None,
        "created_at": at,
        "updated_at": at,
        "version": 1,
        "schema_version": SCHEMA_VERSION,
    }
    try:
        await store.plans.insert_one(doc)
    except DuplicateKeyError:
        raise _duplicate(spec.name) from None
    store.events.plans_changed.fire()
    return doc


async def get(store: Database, instance_id: str, plan_id: str) -> Document:
    doc = await store.plans.find_one({"_id": plan_id, "instance_id": instance_id})
    if doc is None:
        raise NotFound(f"This instance has no plan {plan_id!r}.", code="plan_not_found")
    return doc


async def list_page(store: Database, instance_id: str, limit: int, cursor: str | None) -> Page:
    return await paginate(store.plans, {"instance_id": instance_id}, limit=limit, cursor=cursor)


def spec_of(doc: Document) -> dict[str, Any]:
    """The stored plan as the JSON a user would send to create it (without the key)."""
    return {
        "name": doc["name"],
        "destination_id": doc["destination_id"],
        "frequency": doc["frequency"],
        "timezone": doc["timezone"],
        "items": list(doc["items"]),
        "retention": dict(doc["retention"]),
        "compression": doc["compression"],
        "encryption": {"enabled": bool((doc.get("encryption") or {}).get("enabled"))},
        "paused": doc["paused"],
        "rpo_seconds": doc.get("rpo_seconds"),
        "drill": dict(doc["drill"]) if doc.get("drill") else None,
    }


async def update(
    store: Database,
    box: SecretBox,
    instance: Document,
    plan_id: str,
    patch: dict[str, Any],
    min_interval: int,
    *,
    schedule_from: datetime | None = None,
    check: Callable[[Document, Document], Awaitable[None]] | None = None,
) -> Document:
    """Apply a merge patch; the merged plan is validated as a whole. Retries a few times when
    the scheduler or runner touched the plan meanwhile. ``check(current, fields)`` may refuse
    the merged fields before anything is written (the retention's confirmation)."""
    for _ in range(5):
        current = await get(store, instance["_id"], plan_id)
        spec = PlanSpec.model_validate(merge_patch(spec_of(current), patch))
        items = await _check(store, instance, spec, min_interval)
        sealed = dict(current.get("secrets") or {})
        new_key = spec.encryption.key.get_secret_value() if spec.encryption.key else None
        if new_key is not None and "encryption_key" in sealed:
            raise Conflict(
                "This plan already has an encryption key and it cannot be replaced: earlier "
                "backups need it. Create a new plan to use another key.",
                code="encryption_key_set",
                field="encryption.key",
            )
        if new_key is None and spec.encryption.enabled and "encryption_key" not in sealed:
            new_key = random.token_urlsafe(32)
        if new_key is not None:
            sealed.update(box.seal_map({"encryption_key": new_key}, _context(plan_id)))
        fields = _fields(spec, items)
        if check is not None:
            await check(current, fields)
        timing = ("frequency", "timezone", "paused")
        changes: Document = {**fields, "secrets": sealed, "updated_at": now()}
        if any(fields[k] != current[k] for k in timing) or (
            current.get("next_run_at") is None and not spec.paused
        ):
            changes["next_run_at"] = _next_run(spec, schedule_from)
        if (
            fields["drill"] != current.get("drill")
            or any(fields[k] != current[k] for k in ("timezone", "paused"))
            # a drill stopped because its schedule could not be evaluated, or never scheduled
            or (current.get("drill_next_run_at") is None and fields["drill"] is not None)
        ):
            changes["drill_next_run_at"] = _next_drill(spec, schedule_from)
        try:
            result = await store.plans.update_one(
                {"_id": plan_id, "version": current["version"]},
                {"$set": changes, "$inc": {"version": 1}},
            )
        except DuplicateKeyError:
            raise _duplicate(spec.name) from None
        if result.matched_count == 1:
            store.events.plans_changed.fire()
            return await get(store, instance["_id"], plan_id)
    raise Conflict(
        "The plan keeps changing concurrently; read it again and retry.", code="concurrent_update"
    )


async def delete(store: Database, instance_id: str, plan_id: str) -> None:
    """Delete a plan; its restore points stay, its queued jobs are cancelled."""
    await get(store, instance_id, plan_id)
    await store.plans.delete_one({"_id": plan_id, "instance_id": instance_id})
    store.events.plans_changed.fire()
    at = now()
    await store.jobs.update_many(
        # This instance's jobs only: a restore of one of its points into another instance
        # is that instance's job (backup/jobs.py start_restore).
        {"plan_id": plan_id, "instance_id": instance_id, "status": "QUEUED"},
        {
            "$set": {"status": "CANCELLED", "reason": "The plan was deleted.", "ended_at": at},
            "$inc": {"version": 1},
        },
    )
