"""Restore points: one per successful backup job, written by the job runner once every item's
upload is confirmed. Its id is the id of the backup job that produced it, so the database's
primary key guarantees "one restore point per job" even when a replica that took a job over
finishes it a second time.

Each item records the exact object name in the bucket or container (``key``: the
destination's prefix included), its sizes, checksum and how it was compressed and
encrypted. When the backup was encrypted, a sealed copy of the plan's key is kept with the
restore point (context ``restore_points/<id>``), so it can be restored after its plan is gone.

Deleting one (by a user or by retention) removes its stored files first and the record last,
with the record marked ``deleting`` meanwhile, so a storage failure leaves a record that the
user or the next retention sweep deletes again: never a file without a record.

A point can be pinned (``pinned``, ``pin_reason``, ``pinned_at``): retention and deprovision
leave it alone and a user's delete is refused until it is unpinned (docs/retention.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from pydantic import ValidationError
from pymongo.errors import DuplicateKeyError

from backup import destinations, object_lock, webhooks
from backup.agent_client import AgentKind
from backup.database import SCHEMA_VERSION, Database, Document
from backup.errors import (
    STORAGE_FAILURES,
    Conflict,
    InvalidInput,
    NotFound,
    StorageUnavailable,
    invalid_field,
    storage_failure,
)
from backup.jobs import ACTIVE, JobType, RestorePointState
from backup.pagination import Page, now, paginate
from backup.secrets import SecretBox
from storage import ObjectLocked, ObjectStore, open_store

log = structlog.get_logger(__name__)

StoreOpener = Callable[[destinations.AnySettings], ObjectStore]


def context(point_id: str) -> str:
    return f"restore_points/{point_id}"


def object_settings(dest: Document, box: SecretBox) -> destinations.AnySettings:
    """A destination's settings for addressing restore point objects, whose keys already
    include the destination's prefix."""
    return destinations.settings_for(dest, box).model_copy(update={"prefix": ""})


async def get(store: Database, instance_id: str, point_id: str) -> Document:
    doc = await store.restore_points.find_one({"_id": point_id, "instance_id": instance_id})
    if doc is None:
        raise NotFound(
            f"This instance has no restore point {point_id!r}.", code="restore_point_not_found"
        )
    return doc


async def list_page(
    store: Database, instance_id: str, *, plan_id: str | None, limit: int, cursor: str | None
) -> Page:
    query = {"instance_id": instance_id}
    if plan_id:
        query["plan_id"] = plan_id
    return await paginate(store.restore_points, query, limit=limit, cursor=cursor)


def new_point(
    box: SecretBox,
    job: Document,
    *,
    items: list[Document],
    created_at: datetime,
    expires_at: datetime | None,
    retention: dict[str, Any] | None,
    encryption_key: str | None,
    agent: dict[str, Any] | None = None,
) -> Document:
    """The restore point of a successful backup ``job`` (same id as the job)."""
    point_id = job["_id"]
    return {
        "_id": point_id,
        "instance_id": job["instance_id"],
        "plan_id": job.get("plan_id"),
        "destination_id": job["destination_id"],
        "job_id": job["_id"],
        "created_at": created_at,
        "expires_at": expires_at,
        "retention": retention,
        "items": items,
        "agent": agent,
        "state": RestorePointState.AVAILABLE,
        "secrets": box.seal_map({"encryption_key": encryption_key}, context(point_id)),
        "schema_version": SCHEMA_VERSION,
    }


async def record(store: Database, point: Document) -> bool:
    """Insert a restore point; False if the job's point already exists (a replica that took
    the job over is finishing it again)."""
    try:
        await store.restore_points.insert_one(point)
    except DuplicateKeyError:
        return False
    return True


def encryption_key(box: SecretBox, point: Document) -> str | None:
    return box.open_map(point.get("secrets") or {}, context(point["_id"])).get("encryption_key")


async def active_restore(store: Database, point_id: str) -> Document | None:
    """A queued or running job that reads ``point_id``'s files: a restore or a restore drill
    (a drill downloads them as a restore does, so its point must not be deleted under it)."""
    return await store.jobs.find_one(
        {
            "restore_point_id": point_id,
            "type": {"$in": [JobType.RESTORE, JobType.DRILL]},
            "status": {"$in": list(ACTIVE)},
        },
        {"_id": 1},
    )


async def referenced(
    store: Database, destination_id: str, keys: list[str], *, besides: str | None = None
) -> set[str]:
    """Which of ``keys`` (in one destination) a restore point other than ``besides`` still
    names. Such an object must not be deleted. Only the Go agent on Swift can make two
    restore points share an object (it ignores the prefix, so the runner's folder per agent
    job does not apply, and names files by the minute), so only points it made count."""
    if not keys:
        return set()
    query: dict[str, Any] = {
        "destination_id": destination_id,
        "items.key": {"$in": keys},
        "agent.kind": AgentKind.GO,
    }
    if besides is not None:
        query["_id"] = {"$ne": besides}
    wanted = set(keys)
    found: set[str] = set()
    async for doc in store.restore_points.find(query, {"items.key": 1}):
        found.update(i.get("key") for i in doc.get("items") or [] if i.get("key") in wanted)
    return found


async def purge(
    store: Database,
    box: SecretBox,
    point: Document,
    dest: Document,
    *,
    opener: StoreOpener = open_store,
    timeout: float = 300.0,
) -> None:
    """Delete the files of a point already marked ``deleting`` (those no other point names),
    then its record. Raises :class:`StorageError`, ``TimeoutError`` or ``OSError`` with the
    record left in place."""
    keys = [i["key"] for i in point.get("items") or [] if i.get("key")]
    shared = await referenced(store, point["destination_id"], keys, besides=point["_id"])
    async with asyncio.timeout(timeout):
        async with opener(object_settings(dest, box)) as objects:
            if point.get("manifest_key"):  # first: a manifest means a complete point
                await objects.delete(point["manifest_key"])
            for key in keys:
                if key not in shared:
                    await objects.delete(key)
    await store.restore_points.delete_one(
        {"_id": point["_id"], "state": RestorePointState.DELETING}
    )


async def pin(
    store: Database, instance_id: str, point_id: str, *, pinned: bool, reason: str | None
) -> Document:
    """Pin a restore point (``reason`` required) or unpin it. A pinned point is kept by every
    automatic deletion (retention, deprovision) and refused by ``delete`` until unpinned."""
    if pinned and not reason:
        raise InvalidInput(
            "Say why the restore point is pinned: pin_reason is required with pinned: true.",
            field="pin_reason",
        )
    if not pinned and reason is not None:
        raise InvalidInput(
            "pin_reason goes with pinned: true; send pinned: false alone to unpin.",
            field="pin_reason",
        )
    point = await get(store, instance_id, point_id)
    changes: Document = (
        {"$set": {"pinned": True, "pin_reason": reason, "pinned_at": now()}}
        if pinned
        else {"$set": {"pinned": False}, "$unset": {"pin_reason": "", "pinned_at": ""}}
    )
    done = await store.restore_points.update_one(
        {"_id": point_id, "instance_id": instance_id, "state": RestorePointState.AVAILABLE},
        changes,
    )
    if done.matched_count != 1:
        raise Conflict(
            f"This restore point is {point.get('state')!r}: its files are being deleted, so "
            "it can no longer be pinned or unpinned.",
            code="restore_point_deleting",
        )
    return await get(store, instance_id, point_id)


def _pinned(point: Document) -> Conflict:
    return Conflict(
        f"This restore point is pinned ({point.get('pin_reason')}); unpin it first "
        '(PATCH with {"pinned": false}), then delete it.',
        code="restore_point_pinned",
    )


async def delete(
    store: Database,
    box: SecretBox,
    instance_id: str,
    point_id: str,
    *,
    opener: StoreOpener = open_store,
    timeout: float = 300.0,
) -> None:
    point = await get(store, instance_id, point_id)
    if point.get("pinned"):
        raise _pinned(point)
    until = object_lock.locked(point, datetime.now(UTC))
    if until is not None:
        raise object_lock.conflict(until)
    restoring = await active_restore(store, point_id)
    if restoring is not None:
        raise Conflict(
            f"Job {restoring['_id']} is reading this restore point (a restore or a drill); "
            "wait for it to end.",
            code="restore_point_in_use",
        )
    dest = await store.destinations.find_one({"_id": point["destination_id"]})
    if dest is None:
        raise Conflict(
            "The destination holding this restore point's files no longer exists, so its "
            "files cannot be deleted.",
            code="destination_missing",
        )
    try:
        object_settings(dest, box)
    except ValidationError as exc:
        # Stored before today's rules on endpoints and regions: nothing can be reached with
        # them, so the point is left as it was rather than marked for a delete that must fail.
        raise Conflict(
            f"The destination holding this restore point's files has settings that are no "
            f"longer accepted ({invalid_field(exc)}); correct the destination, then delete the "
            "restore point again.",
            code="destination_invalid",
        ) from None
    marked = await store.restore_points.update_one(
        {"_id": point_id, "instance_id": instance_id, "pinned": {"$ne": True}},
        {"$set": {"state": RestorePointState.DELETING}},
    )
    if marked.matched_count != 1:  # pinned meanwhile
        raise _pinned(await get(store, instance_id, point_id))
    try:
        await purge(store, box, point, dest, opener=opener, timeout=timeout)
    except ObjectLocked as exc:  # locked longer than recorded: nothing deleted, kept
        await object_lock.keep_locked(store, point_id, exc.until)
        if exc.until is None:
            raise Conflict(exc.message, code="restore_point_locked") from None
        raise object_lock.conflict(exc.until) from None
    except Exception as exc:
        # Whatever failed, the point stays 'deleting': an honest state that a retry (or the
        # next retention sweep) finishes, never a 500 that leaves it unexplained.
        if not isinstance(exc, STORAGE_FAILURES):
            log.error("restore_point_delete_failed", point=point_id, error=type(exc).__name__)
        raise StorageUnavailable(
            f"Deleting the stored files failed ({storage_failure(exc)}); the restore point is "
            "kept in state 'deleting': retry the delete later."
        ) from None
    await webhooks.restore_point_gone(store, point, webhooks.EventType.RESTORE_POINT_DELETED)


async def record_drill(store: Database, point_id: str, last_drill: Document) -> bool:
    """Record a restore drill's outcome on the restore point it proved (``last_drill``: job
    id, at, outcome, reason, kind, timings); a later drill's outcome replaces an earlier
    one, never the other way round. False if the point is gone."""
    result = await store.restore_points.update_one(
        {
            "_id": point_id,
            "$or": [
                {"last_drill.at": {"$exists": False}},
                {"last_drill.at": {"$lte": last_drill["at"]}},
            ],
        },
        {"$set": {"last_drill": last_drill}},
    )
    return result.matched_count == 1
