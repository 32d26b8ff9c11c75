"""The audit trail: who changed what, when, under which request.

Each change made through OSB or the ``/v1`` API leaves one entry: the actor (its kind and
identity, as the surface that authenticated it states them), the action, the resource's kind
and id, the NAMES of the fields sent (never their values, so no secret reaches the trail),
the outcome and the request id. Entries are listed newest first with the project's
pagination and pruned by the retention sweep after ``AUDIT_RETENTION_DAYS``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from backup.database import Database, Document
from backup.pagination import Page, now, paginate


class ActorKind(StrEnum):
    USER = "user"
    BINDING = "binding"
    OPERATOR = "operator"
    BROKER = "broker"
    PLATFORM_USER = "platform_user"
    """OSB: the originating identity the platform vouches for."""


@dataclass(frozen=True, slots=True)
class Actor:
    kind: ActorKind
    subject: str
    """The user's id, the binding's id, the account's name; for a platform user, the identity
    the platform sent (its platform name and user id)."""


@dataclass(frozen=True, slots=True)
class Resource:
    kind: str
    """instance, binding, destination, plan, job, restore point..."""
    id: str | None


async def record(
    db: Database,
    actor: Actor,
    action: str,
    resource: Resource,
    fields: Iterable[str],
    request_id: str | None,
    *,
    instance_id: str | None,
    outcome: str = "succeeded",
) -> Document:
    """Store one entry; ``fields`` are the names of what the change set, never values.
    ``instance_id`` is ``None`` for a platform-wide change that concerns no one instance."""
    entry: Document = {
        "_id": str(uuid.uuid4()),
        "created_at": now(),
        "instance_id": instance_id,
        "actor": {"kind": str(actor.kind), "subject": actor.subject},
        "action": action,
        "resource": {"kind": resource.kind, "id": resource.id},
        "fields": sorted(set(fields)),
        "outcome": outcome,
        "request_id": request_id,
    }
    await db.audit.insert_one(entry)
    return entry


async def list_page(
    db: Database, instance_id: str | None, *, limit: int, cursor: str | None
) -> Page:
    """One page of the trail, newest first: one instance's, or every instance's (``None``)."""
    query: dict[str, Any] = {} if instance_id is None else {"instance_id": instance_id}
    return await paginate(db.audit, query, limit=limit, cursor=cursor)


@dataclass(frozen=True, slots=True)
class Filter:
    """The operator-wide trail's filters; unset ones match everything."""

    instance_id: str | None = None
    actor: str | None = None
    """The actor's subject (a user's id, a binding's id, an account's name)."""
    actor_kind: ActorKind | None = None
    since: datetime | None = None
    """Entries recorded at or after it."""
    until: datetime | None = None
    """Entries recorded before it."""


async def list_platform_page(
    db: Database, where: Filter, *, limit: int, cursor: str | None
) -> Page:
    """One page of every instance's trail (platform-wide changes too), newest first, as
    ``where`` narrows it."""
    query: dict[str, Any] = {}
    if where.instance_id is not None:
        query["instance_id"] = where.instance_id
    if where.actor is not None:
        query["actor.subject"] = where.actor
    if where.actor_kind is not None:
        query["actor.kind"] = str(where.actor_kind)
    span: dict[str, Any] = {}
    if where.since is not None:
        span["$gte"] = where.since
    if where.until is not None:
        span["$lt"] = where.until
    if span:
        query["created_at"] = span
    return await paginate(db.audit, query, limit=limit, cursor=cursor)


async def prune(db: Database, *, before: datetime) -> int:
    """Delete the entries recorded before ``before`` (the retention sweep); how many went."""
    result = await db.audit.delete_many({"created_at": {"$lt": before}})
    return result.deleted_count
