"""Restore points: one per successful backup. Deleting one removes its stored files first and
the record last, with the record marked ``deleting`` meanwhile, so a storage failure leaves a
record the user (or retention) can delete again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from backup import destinations
from backup.errors import Conflict, NotFound, Unavailable
from backup.pagination import Page, paginate
from backup.secrets import SecretBox
from backup.store import Document, Store
from storage import ObjectStore, StorageError, open_store

StoreOpener = Callable[[destinations.AnySettings], ObjectStore]


async def get(store: Store, instance_id: str, point_id: str) -> Document:
    doc = await store.restore_points.find_one({"_id": point_id, "instance_id": instance_id})
    if doc is None:
        raise NotFound(
            f"This instance has no restore point {point_id!r}.", code="restore_point_not_found"
        )
    return doc


async def list_page(
    store: Store, instance_id: str, *, plan_id: str | None, limit: int, cursor: str | None
) -> Page:
    query = {"instance_id": instance_id}
    if plan_id:
        query["plan_id"] = plan_id
    return await paginate(store.restore_points, query, limit=limit, cursor=cursor)


async def delete(
    store: Store,
    box: SecretBox,
    instance_id: str,
    point_id: str,
    *,
    opener: StoreOpener = open_store,
    timeout: float = 300.0,
) -> None:
    point = await get(store, instance_id, point_id)
    restoring = await store.jobs.find_one(
        {"restore_point_id": point_id, "status": {"$in": ["QUEUED", "RUNNING"]}}, {"_id": 1}
    )
    if restoring is not None:
        raise Conflict(
            f"Job {restoring['_id']} is restoring from this restore point; wait for it to end.",
            code="restore_point_in_use",
        )
    dest = await store.destinations.find_one({"_id": point["destination_id"]})
    if dest is None:
        raise Conflict(
            "The destination holding this restore point's files no longer exists, so its "
            "files cannot be deleted.",
            code="destination_missing",
        )
    await store.restore_points.update_one(
        {"_id": point_id, "instance_id": instance_id}, {"$set": {"state": "deleting"}}
    )
    try:
        async with asyncio.timeout(timeout):
            async with opener(destinations.settings_for(dest, box)) as objects:
                for item in point.get("items") or []:
                    if item.get("key"):
                        await objects.delete(item["key"])
    except (StorageError, TimeoutError, OSError, ImportError) as exc:
        detail = exc.message if isinstance(exc, StorageError) else "the storage did not answer"
        raise Unavailable(
            f"Deleting the stored files failed ({detail}); the restore point is kept in state "
            "'deleting': retry the delete later.",
            code="storage_unavailable",
        ) from None
    await store.restore_points.delete_one({"_id": point_id, "instance_id": instance_id})
