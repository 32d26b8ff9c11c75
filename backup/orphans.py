"""Restore points whose instance is gone (orphaned), and the crypto-shredding of restore points.

**Kept after a deprovision.** An instance deprovisioned without
``delete_backups_on_deprovision`` keeps its restore points: their records, the sealed copy of
the encryption key each point holds (``secrets.encryption_key``, context
``restore_points/<id>``, see :mod:`backup.restore_points`), and the destinations their files
are in. :func:`keep` detaches them from the instance, so that an instance id provisioned
again never sees them:

- a point's ``instance_id`` becomes ``None`` and ``orphaned`` records
  ``{instance_id: <the former instance>, at: <when>}``;
- a destination that holds such a point gets ``instance_id`` ``orphaned/<its own id>`` (unique,
  for the unique index on (instance_id, name), and never a live instance: an instance id in a
  path cannot hold a ``/``) and the same ``orphaned`` field.

Orphaned points are seen and handled by operators only (platform-scoped API): listed, read,
restored into a live instance (:func:`restore`, a normal restore job of the target), deleted
(:func:`delete`, which shreds first). They expire by the retention recorded on them: the
retention sweep treats them as the points of a deleted plan (:mod:`backup.retention`), and
:func:`prune_destinations` removes an orphaned destination once no point is stored in it.

**Crypto-shredding** (:func:`shred`). Deleting backups (a deprovision with
``delete_backups_on_deprovision``, or an operator's delete of orphaned points) destroys the
keys first: one committed write marks the points ``deleting`` and removes their sealed keys
(``shredded_at`` records when), and only then are the files deleted. Once that write is
acknowledged, nothing the manager holds opens those files, even if the storage deletion
fails or the provider keeps old versions. Files that could not be deleted stay listed on the
keyless record (state ``deleting``), which the retention sweep deletes again until they are
gone; the answer names them.

Limits, said in every answer that meets them: a point of an unencrypted plan has no key to
destroy (``unencrypted``: its files are readable until deleted); a plan's points share the
plan's key, so a point whose key is still held by its plan or by another point that is kept
(pinned, or not deleted by an operator) stays readable through that copy (``key_still_held``);
and a key a user supplied is still known to that user.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from backup import jobs, object_lock, restore_points
from backup.database import Database, Document
from backup.errors import STORAGE_FAILURES, Conflict, NotFound, storage_failure
from backup.jobs import RestorePointState
from backup.pagination import Page, paginate
from backup.restore_points import StoreOpener
from backup.secrets import SecretBox, SecretKeyError
from storage import ObjectNotFound, open_store

log = structlog.get_logger(__name__)

DESTINATION_OWNER = "orphaned/"
"""The prefix of an orphaned destination's ``instance_id`` (followed by its own id)."""


def _orphaned(instance_id: str, at: datetime) -> Document:
    return {"instance_id": instance_id, "at": at}


def not_pinned() -> dict[str, Any]:
    """Points an automatic deletion may take (``pinned``: kept out of every one)."""
    return {"pinned": {"$ne": True}}


async def keep(store: Database, instance_id: str, at: datetime) -> int:
    """Detach the instance's restore points, and the destinations they are stored in, from
    the instance (see the module's docstring); returns how many points. Safe to repeat."""
    dest_ids = await store.restore_points.distinct("destination_id", {"instance_id": instance_id})
    for dest_id in dest_ids:
        # Destinations first: a repeat after a crash finds the points still to detach.
        await store.destinations.update_one(
            {"_id": dest_id, "instance_id": instance_id},
            {
                "$set": {
                    "instance_id": f"{DESTINATION_OWNER}{dest_id}",
                    "orphaned": _orphaned(instance_id, at),
                }
            },
        )
    kept = await store.restore_points.update_many(
        {"instance_id": instance_id},
        {"$set": {"instance_id": None, "orphaned": _orphaned(instance_id, at)}},
    )
    if kept.modified_count:
        log.info("restore_points_orphaned", instance_id=instance_id, points=kept.modified_count)
    return kept.modified_count


# --- operators' views -------------------------------------------------------------------------


def _query(former_instance_id: str | None = None) -> dict[str, Any]:
    query: dict[str, Any] = {"instance_id": None, "orphaned.instance_id": {"$exists": True}}
    if former_instance_id:
        query["orphaned.instance_id"] = former_instance_id
    return query


async def list_page(
    store: Database, *, former_instance_id: str | None, limit: int, cursor: str | None
) -> Page:
    """Orphaned restore points, newest first (of one former instance, if given)."""
    return await paginate(
        store.restore_points, _query(former_instance_id), limit=limit, cursor=cursor
    )


async def get(store: Database, point_id: str) -> Document:
    doc = await store.restore_points.find_one({"_id": point_id, **_query()})
    if doc is None:
        raise NotFound(
            f"There is no orphaned restore point {point_id!r}.",
            code="restore_point_not_found",
        )
    return doc


async def restore(
    store: Database,
    point_id: str,
    target: Document,
    items: Sequence[str | tuple[str, str | None]] | None,
) -> Document:
    """Queue a restore of an orphaned point into ``target`` (a live instance): a restore job
    of the target, as :func:`backup.jobs.start_restore` makes one; every item is restored
    into a registered item of the target (the source instance is gone)."""
    point = await get(store, point_id)
    # The job names the point's former instance as its source (for its answer and for the
    # cancel of a deprovision of that id); the point itself stays orphaned.
    source = {**point, "instance_id": point["orphaned"]["instance_id"]}
    return await jobs.start_restore(store, source, items, target=target)


# --- crypto-shredding -------------------------------------------------------------------------


@dataclass
class ShredResult:
    """What a shred did, point by point (ids)."""

    shredded: list[str] = field(default_factory=list)  # keys destroyed
    unencrypted: list[str] = field(default_factory=list)  # no key to destroy
    key_still_held: dict[str, list[str]] = field(default_factory=dict)  # point -> holders
    deleted: list[str] = field(default_factory=list)  # files and record gone
    remaining: dict[str, list[str]] = field(default_factory=dict)  # point -> objects left
    manifests_left: dict[str, str] = field(default_factory=dict)  # point -> its manifest
    errors: list[str] = field(default_factory=list)

    def add(self, other: ShredResult) -> None:
        self.shredded += other.shredded
        self.unencrypted += other.unencrypted
        self.key_still_held.update(other.key_still_held)
        self.deleted += other.deleted
        self.remaining.update(other.remaining)
        self.manifests_left.update(other.manifests_left)
        self.errors += other.errors

    @property
    def remaining_files(self) -> list[str]:
        return [key for keys in self.remaining.values() for key in keys]

    def describe(self, *, limit: int = 5) -> str:
        """The outcome in sentences (no key material, object names only)."""
        parts: list[str] = []
        if self.shredded:
            parts.append(
                f"The encryption keys of {len(self.shredded)} restore point(s) were destroyed "
                "before their files were deleted."
            )
        if self.unencrypted:
            parts.append(
                f"{len(self.unencrypted)} restore point(s) were not encrypted, so they could "
                "not be crypto-shredded: their files are readable until deleted."
            )
        if self.key_still_held:
            parts.append(
                f"The key of {len(self.key_still_held)} restore point(s) is still held by "
                "points that are kept (pinned, or of the same plan), which can still read them."
            )
        files = self.remaining_files
        if files:
            shown = ", ".join(files[:limit])
            more = f" and {len(files) - limit} more" if len(files) > limit else ""
            parts.append(
                f"{len(files)} file(s) of {len(self.remaining)} restore point(s) could not be "
                f"deleted yet ({shown}{more}); the retention sweep keeps deleting them."
            )
        if self.manifests_left:
            parts.append(
                f"{len(self.manifests_left)} of them still have their manifest in storage, "
                "which holds the data key sealed with the master key (for recovery without "
                "the database): until it is deleted, whoever holds both the storage and the "
                "master key can read that backup."
            )
        return " ".join(parts)


def _key(box: SecretBox, doc: Document, context: str) -> str | None:
    try:
        return box.open_map(doc.get("secrets") or {}, context).get("encryption_key")
    except SecretKeyError:
        return None


async def _holders(
    store: Database, box: SecretBox, points: list[Document], keys: dict[str, str]
) -> dict[str, list[str]]:
    """For each point whose key was opened (``keys``), who else still holds the same key: its
    plan (``plans/<id>``) or restore points outside this shred."""
    shredding = {p["_id"] for p in points}
    out: dict[str, list[str]] = {}
    by_plan: dict[str, list[Document]] = {}
    for p in points:
        if p["_id"] in keys and p.get("plan_id"):
            by_plan.setdefault(p["plan_id"], []).append(p)
    for plan_id, members in by_plan.items():
        holders: list[tuple[str, str]] = []
        plan = await store.plans.find_one({"_id": plan_id}, {"secrets": 1})
        if plan is not None:
            key = _key(box, plan, f"plans/{plan_id}")
            if key:
                holders.append((f"plans/{plan_id}", key))
        async for other in store.restore_points.find(
            {"plan_id": plan_id, "_id": {"$nin": sorted(shredding)}, "secrets": {"$exists": 1}},
            {"secrets": 1},
        ):
            key = _key(box, other, restore_points.context(other["_id"]))
            if key:
                holders.append((f"restore_points/{other['_id']}", key))
        for p in members:
            same = [name for name, key in holders if key == keys[p["_id"]]]
            if same:
                out[p["_id"]] = same
    return out


async def destroy_keys(
    store: Database, box: SecretBox, query: dict[str, Any], *, at: datetime
) -> tuple[ShredResult, list[Document]]:
    """The shred's first step: every point matching ``query`` (pinned ones excepted) is marked
    ``deleting`` and loses its sealed key, in one write; returns what was shredded and the
    points (as they were, keys removed) whose files are to be deleted next."""
    query = {"$and": [query, not_pinned()]}
    points = await store.restore_points.find(query).to_list()
    result = ShredResult()
    if not points:
        return result, []
    keys: dict[str, str] = {}
    for p in points:
        key = _key(box, p, restore_points.context(p["_id"]))
        if key:
            keys[p["_id"]] = key
        elif "encryption_key" not in (p.get("secrets") or {}) and not p.get("shredded_at"):
            result.unencrypted.append(p["_id"])
    ids = [p["_id"] for p in points]
    await store.restore_points.update_many(
        {"_id": {"$in": ids}},
        {
            "$set": {"state": RestorePointState.DELETING, "shredded_at": at},
            "$unset": {"secrets": ""},
        },
    )
    result.shredded = sorted(keys)
    result.key_still_held = await _holders(store, box, points, keys)
    keys.clear()
    log.info(
        "restore_points_shredded",
        points=len(ids),
        keys_destroyed=len(result.shredded),
        unencrypted=len(result.unencrypted),
    )
    for p in points:
        p.pop("secrets", None)
        p["state"] = RestorePointState.DELETING
    return result, points


async def delete_files(
    store: Database,
    box: SecretBox,
    points: list[Document],
    *,
    opener: StoreOpener = open_store,
    timeout: float = 300.0,
) -> ShredResult:
    """The shred's second step: each point's files, then its record (``purge``); a point
    whose files could not be deleted stays ``deleting`` for the retention sweep."""
    result = ShredResult()
    for p in points:
        keys = [i["key"] for i in p.get("items") or [] if i.get("key")]
        if p.get("manifest_key"):
            keys.insert(0, p["manifest_key"])  # deleted first (restore_points.purge)
        dest = await store.destinations.find_one({"_id": p["destination_id"]})
        if dest is None:
            # Nothing can reach them any more: the record goes (with no key, they are noise).
            await store.restore_points.delete_one({"_id": p["_id"]})
            result.remaining[p["_id"]] = keys
            result.errors.append(f"{p['_id']}: its destination no longer exists")
            continue
        until = object_lock.locked(p, datetime.now(UTC))
        if until is not None:
            # Its files cannot be deleted before then (S3 Object Lock): the key is gone, the
            # retention sweep deletes them once the lock lapses.
            result.remaining[p["_id"]] = keys
            if p.get("manifest_key"):
                result.manifests_left[p["_id"]] = p["manifest_key"]
            result.errors.append(f"{p['_id']}: its files are locked until {until.isoformat()}")
            continue
        try:
            await restore_points.purge(store, box, p, dest, opener=opener, timeout=timeout)
        except STORAGE_FAILURES as exc:
            reason = storage_failure(exc)
            left = await _still_there(store, box, dest, keys, opener)
            result.remaining[p["_id"]] = left
            if p.get("manifest_key") in left:
                result.manifests_left[p["_id"]] = p["manifest_key"]
            result.errors.append(f"{p['_id']}: {reason}")
            log.warning("shredded_point_files_left", restore_point_id=p["_id"], reason=reason)
            continue
        result.deleted.append(p["_id"])
    return result


async def _still_there(
    store: Database, box: SecretBox, dest: Document, keys: list[str], opener: StoreOpener
) -> list[str]:
    """Which of ``keys`` are still in storage after a failed delete (all of them when the
    storage cannot even be asked)."""
    left: list[str] = []
    try:
        async with asyncio.timeout(30):
            async with opener(restore_points.object_settings(dest, box)) as objects:
                for key in keys:
                    try:
                        await objects.stat(key)
                    except ObjectNotFound:
                        continue
                    left.append(key)
    except STORAGE_FAILURES:
        return keys
    return left


async def shred(
    store: Database,
    box: SecretBox,
    query: dict[str, Any],
    *,
    at: datetime,
    opener: StoreOpener = open_store,
    timeout: float = 300.0,
) -> ShredResult:
    """Keys first (:func:`destroy_keys`), files after (:func:`delete_files`)."""
    result, points = await destroy_keys(store, box, query, at=at)
    result.add(await delete_files(store, box, points, opener=opener, timeout=timeout))
    return result


async def delete(
    store: Database,
    box: SecretBox,
    point_id: str,
    *,
    at: datetime,
    opener: StoreOpener = open_store,
    timeout: float = 300.0,
) -> ShredResult:
    """An operator's delete of an orphaned point: shredded, then its files deleted."""
    point = await get(store, point_id)
    if point.get("pinned"):
        raise Conflict(
            "This restore point is pinned; unpin it before deleting it.",
            code="restore_point_pinned",
        )
    restoring = await restore_points.active_restore(store, point_id)
    if restoring is not None:
        raise Conflict(
            f"Job {restoring['_id']} is reading this restore point (a restore or a drill); "
            "wait for it to end.",
            code="restore_point_in_use",
        )
    result = await shred(
        store, box, {"_id": point_id, **_query()}, at=at, opener=opener, timeout=timeout
    )
    await prune_destinations(store)
    return result


async def prune_destinations(store: Database) -> int:
    """Delete the orphaned destinations no restore point is stored in any more."""
    removed = 0
    async for dest in store.destinations.find(
        {"orphaned.instance_id": {"$exists": True}}, {"_id": 1}
    ):
        if await store.restore_points.find_one({"destination_id": dest["_id"]}, {"_id": 1}):
            continue
        gone = await store.destinations.delete_one(
            {"_id": dest["_id"], "orphaned.instance_id": {"$exists": True}}
        )
        removed += gone.deleted_count
    return removed
