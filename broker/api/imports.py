"""Import in the API (``POST /v1/imports``): an operator rebuilds the catalogue of restore
points from a destination's manifests after the manager's database is lost. Operators only
(:func:`broker.api.routes.platform_op`: a tenant gets 403). The domain is
:mod:`backup.importer`; routes.py imports this module so the operation is registered.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from backup import importer
from broker.api import models
from broker.api.routes import PlatformCtx, platform_op

_OUT = ConfigDict(extra="ignore")
TAG = "imports"


class ImportIn(BaseModel):
    """Where the backups are, and where their restore points go."""

    model_config = ConfigDict(extra="forbid", strict=True)

    destination: models.DestinationIn = Field(
        description="The destination holding the backups, as a destination is created (S3 or "
        "Swift settings with the credentials; `name` is optional and unused). Checked like any "
        "destination, the egress policy included."
    )
    instances: dict[str, str] = Field(
        default_factory=dict,
        description="Source instance id -> a registered instance that receives its restore "
        "points. Unmapped: the source instance if it is registered here, else its points are "
        "kept as orphaned points (GET /v1/orphaned_restore_points).",
    )
    verify_checksums: bool = Field(
        default=False,
        description="Also read every object and compare its SHA-256 with the manifest's (reads "
        "every byte); by default each object's existence and size are verified.",
    )
    dry_run: bool = Field(default=False, description="Verify and report; change nothing.")


class ImportedPointOut(BaseModel):
    model_config = _OUT
    id: str = Field(description="The restore point's id (the same as before the loss).")
    status: importer.ImportStatus = Field(
        description="imported; would_import (dry run); existing (already in the catalogue: "
        "left as it is); invalid (a manifest this manager cannot trust or read: see reason); "
        "incomplete (an object it names is missing or differs: see reason)."
    )
    manifest_key: str
    instance_id: str | None = Field(
        default=None, description="The instance it belongs to now (null: orphaned)."
    )
    source_instance_id: str | None = Field(
        default=None, description="The instance it was backed up from."
    )
    orphaned: bool = False
    plan_id: str | None = None
    plan_name: str | None = None
    created_at: datetime | None = None
    reason: str | None = None


class ImportOut(BaseModel):
    model_config = _OUT
    dry_run: bool
    found: int = Field(description="Manifests found under the destination's prefix.")
    imported: int
    existing: int
    invalid: int
    incomplete: int
    remaining: int = Field(
        description="Manifests not read this time (more than "
        f"{importer.MAX_READ} new ones): import again to go on."
    )
    destinations: dict[str, str] = Field(
        description="Target instance id (orphaned:<source instance id> for orphaned points) -> "
        "the destination created (or found again) for its imported points."
    )
    points: list[ImportedPointOut]


@platform_op(
    "POST",
    "/imports",
    summary="Import the restore points of a destination from their manifests, after the "
    "manager's database is lost (operators only); idempotent",
    tag=TAG,
    body=ImportIn,
    response=ImportOut,
    errors=(400, 404, 422, 503),
)
async def import_restore_points(ctx: PlatformCtx) -> ImportOut:
    result = await importer.run(
        ctx.db, ctx.box, await ctx.raw_body(), check_timeout=ctx.api.validate_timeout_seconds
    )
    status = importer.ImportStatus
    return ImportOut(
        dry_run=result.dry_run,
        found=result.found,
        imported=result.count(status.WOULD_IMPORT if result.dry_run else status.IMPORTED),
        existing=result.count(status.EXISTING),
        invalid=result.count(status.INVALID),
        incomplete=result.count(status.INCOMPLETE),
        remaining=result.remaining,
        destinations=result.destinations,
        points=[ImportedPointOut.model_validate(p, from_attributes=True) for p in result.points],
    )
