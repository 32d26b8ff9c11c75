"""Orphaned restore points in the API: points kept after their instance was deprovisioned
(``/v1/orphaned_restore_points``), for operators only (:func:`broker.api.routes.platform_op`:
a tenant gets 403, never a list). Operators list and read them, restore one into a live
instance, and delete one (crypto-shredded: its key first, its files after). The domain is
:mod:`backup.orphans`; routes.py imports this module so the operations are registered.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from backup import orphans
from backup.clock import SystemClock
from backup.database import Document
from backup.instances import LIVE_STATES
from broker.api import models, views
from broker.api.auth import instance_not_found
from broker.api.routes import PlatformCtx, _page, platform_op
from broker.context import STORE_OPENER

_OUT = ConfigDict(extra="ignore")
_IN = ConfigDict(extra="forbid", strict=True)
TAG = "orphaned restore points"


# --- models ---------------------------------------------------------------------------------


class OrphanedOut(BaseModel):
    model_config = _OUT
    instance_id: str = Field(description="The deprovisioned instance the point belonged to.")
    at: datetime = Field(description="When that instance was deleted and the point kept.")


class OrphanedRestorePointOut(models.RestorePointOut):
    orphaned: OrphanedOut
    shredded_at: datetime | None = Field(
        default=None,
        description="When its key was destroyed (a delete under way: its files are still being "
        "deleted; it can no longer be restored).",
    )


class OrphanedRestorePointPage(models._PageOut):
    items: list[OrphanedRestorePointOut]


class OrphanListQuery(models.ListQuery):
    instance_id: models.Id | None = Field(
        default=None, description="Only the points of this deprovisioned instance."
    )


class OrphanRestoreIn(BaseModel):
    """A restore of an orphaned restore point into a live instance."""

    model_config = _IN
    target_instance_id: models.Text = Field(
        description="The live instance to restore into; the job is recorded and listed there "
        "and runs on its agent with its database."
    )
    items: list[models.RestoreItemChoice] | None = Field(
        default=None,
        max_length=1000,
        description="A subset of the point's items (default: all), each a name or {name, "
        "target}; every target must be a registered item of the target instance.",
    )

    def pairs(self) -> list[tuple[str, str | None]] | None:
        if self.items is None:
            return None
        return [(i, None) if isinstance(i, str) else (i.name, i.target) for i in self.items]


class ShredOut(BaseModel):
    model_config = _OUT
    id: str = Field(description="The restore point deleted.")
    key_destroyed: bool = Field(
        description="Its sealed encryption key was removed from the manager's database before "
        "any file was touched: what is left in storage can no longer be decrypted with "
        "anything the manager holds (see key_still_held_by)."
    )
    encrypted: bool = Field(
        description="False: the point was not encrypted, so it could not be crypto-shredded; "
        "its files are readable until they are deleted."
    )
    key_still_held_by: list[str] = Field(
        default=[],
        description="Other records that hold the same key (its plan's other kept points): "
        "they can still decrypt its files while they remain.",
    )
    files_deleted: bool = Field(description="Every file and the record are gone.")
    files_remaining: list[str] = Field(
        default=[],
        description="Objects that could not be deleted yet; the retention sweep keeps deleting "
        "them (the record stays, in state 'deleting', without its key).",
    )
    manifest_remaining: bool = Field(
        default=False,
        description="Its manifest is among the files left: it holds the data key sealed with "
        "the master key (for recovery without the database), so until it is deleted whoever "
        "holds both the storage and the master key can still read the backup.",
    )
    description: str


# --- operations -----------------------------------------------------------------------------


def _view(doc: Document) -> OrphanedRestorePointOut:
    return OrphanedRestorePointOut.model_validate(
        {
            **views.restore_point(doc).model_dump(),
            "orphaned": doc["orphaned"],
            "shredded_at": doc.get("shredded_at"),
        }
    )


@platform_op(
    "GET",
    "/orphaned_restore_points",
    summary="Restore points kept after their instance was deprovisioned, newest first "
    "(operators only)",
    tag=TAG,
    response=OrphanedRestorePointPage,
    query=OrphanListQuery,
)
async def list_orphaned_restore_points(ctx: PlatformCtx) -> OrphanedRestorePointPage:
    query = ctx.query(OrphanListQuery)
    limit, cursor = query.window()
    page = await orphans.list_page(
        ctx.db, former_instance_id=query.instance_id, limit=limit, cursor=cursor
    )
    return _page(OrphanedRestorePointPage, page, [_view(d) for d in page.items])


@platform_op(
    "GET",
    "/orphaned_restore_points/{restore_point_id}",
    summary="Read an orphaned restore point (operators only)",
    tag=TAG,
    response=OrphanedRestorePointOut,
    errors=(404,),
)
async def get_orphaned_restore_point(ctx: PlatformCtx) -> OrphanedRestorePointOut:
    return _view(await orphans.get(ctx.db, ctx.request.match_info["restore_point_id"]))


@platform_op(
    "POST",
    "/orphaned_restore_points/{restore_point_id}/restores",
    summary="Restore an orphaned restore point into a live instance (operators only): a "
    "restore job of that instance",
    tag=TAG,
    status=202,
    body=OrphanRestoreIn,
    response=models.JobOut,
    errors=(400, 404, 409),
)
async def restore_orphaned_restore_point(ctx: PlatformCtx) -> models.JobOut:
    spec = await ctx.body(OrphanRestoreIn)
    point_id = ctx.request.match_info["restore_point_id"]
    await orphans.get(ctx.db, point_id)  # an unknown point is 404 before the target is read
    target = await ctx.db.instances.find_one(
        {"_id": spec.target_instance_id, "state": {"$in": list(LIVE_STATES)}}
    )
    if target is None:
        raise instance_not_found(spec.target_instance_id)
    job = await orphans.restore(ctx.db, point_id, target, spec.pairs())
    ctx.instance_id = str(target["_id"])
    return views.job(job, None)


@platform_op(
    "DELETE",
    "/orphaned_restore_points/{restore_point_id}",
    summary="Delete an orphaned restore point (operators only): its key is destroyed first, "
    "then its files; the answer says what is left in storage",
    tag=TAG,
    response=ShredOut,
    errors=(404, 409),
)
async def delete_orphaned_restore_point(ctx: PlatformCtx) -> ShredOut:
    point_id = ctx.request.match_info["restore_point_id"]
    result = await orphans.delete(
        ctx.db,
        ctx.box,
        point_id,
        at=SystemClock().now(),
        opener=ctx.request.app[STORE_OPENER],
    )
    return ShredOut(
        id=point_id,
        key_destroyed=point_id in result.shredded,
        encrypted=point_id not in result.unencrypted,
        key_still_held_by=result.key_still_held.get(point_id, []),
        files_deleted=point_id in result.deleted,
        files_remaining=result.remaining.get(point_id, []),
        manifest_remaining=point_id in result.manifests_left,
        description=result.describe(limit=20) or "Deleted.",
    )
