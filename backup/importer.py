"""Import: rebuild the catalogue of restore points from storage, after the manager's database
is lost, from the manifests the runner writes beside every point (:mod:`backup.manifest`).

An operator names a destination (the settings and credentials of an S3 bucket or Swift
container, checked like any destination's, the egress policy included) and, optionally, which
instance each source instance's points go to. The import lists the manifests under the
destination's prefix and verifies each: its format, its seal (it opens with one of the
configured master keys, so it was written by this manager's keys and not changed), and that
every object it names exists with the recorded size (with ``verify_checksums``, that its bytes
have the recorded SHA-256: a full read). Only then does it write anything: for each target
instance a destination (found again by a deterministic id on the next import) and the
restore points, under their own ids (an id already present is left alone: importing twice
creates nothing new), marked ``imported``, with the data key resealed for the point so a
restore can decrypt it.

The points of an instance that is not registered here (and not mapped to one) are imported
all the same, as orphaned points of their source instance (as a deprovision that keeps backups
leaves them, :mod:`backup.orphans`): seen by operators only, restorable into another instance.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pymongo.errors import DuplicateKeyError

from backup import destinations, manifest, orphans, restore_points
from backup.database import SCHEMA_VERSION, Database, Document
from backup.errors import (
    InvalidInput,
    NotFound,
    StorageUnavailable,
    Unprocessable,
    storage_failure,
)
from backup.jobs import RestorePointState
from backup.operations import InstanceState
from backup.pagination import now
from backup.secrets import SecretBox, SecretKeyError
from storage import ChecksumMismatch, InvalidKey, ObjectNotFound, StorageError, open_store
from storage.base import EgressDenied, ObjectStore

log = structlog.get_logger(__name__)

MAX_READ = 2000
"""Manifests read (of points not yet in the catalogue) per import; the answer says how many
remain, and the next import goes on with them."""
DEFAULT_TIMEOUT = 600.0
_GONE = (InstanceState.DEPROVISIONING, InstanceState.DELETED)

Id = str


class ImportRequest(BaseModel):
    """What the operator sends: where the backups are, and where their points go."""

    model_config = ConfigDict(extra="forbid", strict=True)

    destination: dict[str, Any] = Field(
        description="The destination holding the backups, as a destination is created (S3 "
        "or Swift settings with the credentials; `name` optional). Checked like any "
        "destination, the egress policy included."
    )
    instances: dict[str, str] = Field(
        default_factory=dict,
        max_length=10_000,
        description="Source instance id -> registered instance id that receives its restore "
        "points. Unmapped: the source instance if registered, else the points are kept as "
        "orphaned points of their source instance.",
    )
    verify_checksums: bool = Field(
        default=False,
        description="Also read every object and compare its SHA-256 with the manifest's "
        "(slow: reads every byte); by default, existence and sizes are verified.",
    )
    dry_run: bool = Field(default=False, description="Verify and report; change nothing.")


class ImportStatus(StrEnum):
    IMPORTED = "imported"
    WOULD_IMPORT = "would_import"  # dry run
    EXISTING = "existing"  # already in the catalogue: left as it is
    INVALID = "invalid"  # the manifest is not one this manager can trust or read
    INCOMPLETE = "incomplete"  # an object it names is missing or differs


@dataclass
class PointOutcome:
    id: str
    manifest_key: str
    status: ImportStatus
    source_instance_id: str | None = None
    instance_id: str | None = None
    plan_id: str | None = None
    plan_name: str | None = None
    created_at: datetime | None = None
    orphaned: bool = False
    reason: str | None = None


@dataclass
class ImportResult:
    dry_run: bool
    found: int = 0
    remaining: int = 0
    """Manifests not read this time (past :data:`MAX_READ`): import again to go on."""
    points: list[PointOutcome] = field(default_factory=list)
    destinations: dict[str, str] = field(default_factory=dict)
    """Target instance id (``orphaned:<source instance id>`` for orphaned points) -> the
    destination id its imported points use."""

    def count(self, status: ImportStatus) -> int:
        return sum(1 for p in self.points if p.status == status)


# --- request --------------------------------------------------------------------------------


def _invalid(exc: ValidationError, where: str) -> InvalidInput:
    problem = exc.errors(include_url=False, include_input=False)[0]
    loc = ".".join(str(p) for p in problem["loc"])
    name = f"{where}.{loc}" if loc else where
    return InvalidInput(f"Invalid request body: {name}: {problem['msg']}.", field=name)


def parse(
    raw: dict[str, Any],
) -> tuple[ImportRequest, destinations.S3DestinationSpec | destinations.SwiftDestinationSpec]:
    """The request and its destination, validated (field names as sent: ``destination.bucket``)."""
    try:
        request = ImportRequest.model_validate(raw)
    except ValidationError as exc:
        raise _invalid(exc, "body") from None
    for source, target in request.instances.items():
        for value in (source, target):
            if not value or len(value) > 64:
                raise InvalidInput(
                    "Each instance id in 'instances' must be 1 to 64 characters.",
                    field="instances",
                )
    try:
        spec = destinations.parse({"name": "imported", **request.destination})
    except ValidationError as exc:
        raise _invalid(exc, "destination") from None
    return request, spec


async def _targets(db: Database, mapping: dict[str, str]) -> None:
    """Every mapped target instance must be registered (and not going)."""
    if not mapping:
        return
    wanted = set(mapping.values())
    found = {
        d["_id"]
        async for d in db.instances.find(
            {"_id": {"$in": list(wanted)}, "state": {"$nin": list(_GONE)}}, {"_id": 1}
        )
    }
    missing = sorted(wanted - found)
    if missing:
        raise NotFound(
            f"Instance {missing[0]!r} named in 'instances' is not registered here; register it "
            "first, or leave its source unmapped to keep the points as orphaned points.",
            code="instance_not_found",
        )


# --- reading the destination ----------------------------------------------------------------


def _storage_problem(exc: BaseException, settings: destinations.AnySettings) -> Exception:
    if isinstance(exc, EgressDenied):
        name = "endpoint" if settings.type == "S3" else "auth_url"
        return Unprocessable(exc.message, code="egress_denied", field=f"destination.{name}")
    if isinstance(exc, StorageError) and not exc.transient:
        text = destinations.advice(exc.code, settings, None, exc.message)
        return Unprocessable(f"Nothing was imported: {text}", code=exc.code)
    return StorageUnavailable(
        f"Nothing was imported: the storage failed ({storage_failure(exc)}); retry the import."
    )


async def _read(objects: ObjectStore, key: str) -> bytes:
    data = bytearray()
    async for chunk in objects.download(key):
        data.extend(chunk)
        if len(data) > manifest.MAX_BYTES:
            raise manifest.ManifestError(f"It is larger than {manifest.MAX_BYTES} bytes.")
    return bytes(data)


async def _verify_objects(objects: ObjectStore, body: dict[str, Any], full: bool) -> str | None:
    """None if every object of the manifest is there as recorded; else what is not."""
    for item in body["items"]:
        key, name = item["key"], item["name"]
        expected = item.get("stored_size")
        if expected is None:
            expected = item.get("size")
        try:
            info = await objects.stat(key)
        except (ObjectNotFound, InvalidKey):
            return f"The object {key!r} of item {name!r} is missing."
        if expected is not None and info.size != expected:
            return f"The object {key!r} of item {name!r} has {info.size} bytes, not {expected}."
        checksum = str(item.get("checksum") or "")
        if full and checksum.startswith("sha256:"):
            try:
                async for _ in objects.download(key, expected_sha256=checksum[7:]):
                    pass
            except ChecksumMismatch:
                return f"The object {key!r} of item {name!r} does not have the recorded checksum."
    return None


@dataclass
class _Verified:
    outcome: PointOutcome
    body: dict[str, Any]
    data_key: str | None


async def _verify(
    db: Database,
    box: SecretBox,
    objects: ObjectStore,
    key: str,
    request: ImportRequest,
    registered: dict[str, bool],
) -> _Verified | PointOutcome:
    point_id = key.rpartition("/")[2][: -len(manifest.SUFFIX)]
    try:
        try:
            data = await _read(objects, key)
        except ObjectNotFound:
            raise manifest.ManifestError("It was deleted while the import ran.") from None
        body = manifest.parse(data, box)
        if body["restore_point_id"] != point_id:
            raise manifest.ManifestError("Its object's name is not its restore point's id.")
        data_key = manifest.data_key(box, body)
        created, _ = manifest.times(body)
    except manifest.ManifestError as exc:
        return PointOutcome(point_id, key, ImportStatus.INVALID, reason=str(exc))
    source = str(body["instance_id"])
    plan = body.get("plan") if isinstance(body.get("plan"), dict) else None
    outcome = PointOutcome(
        point_id,
        key,
        ImportStatus.WOULD_IMPORT if request.dry_run else ImportStatus.IMPORTED,
        source_instance_id=source,
        plan_id=(plan or {}).get("id"),
        plan_name=(plan or {}).get("name"),
        created_at=created,
    )
    target = request.instances.get(source)
    if target is None:
        if source not in registered:
            registered[source] = (
                await db.instances.find_one(
                    {"_id": source, "state": {"$nin": list(_GONE)}}, {"_id": 1}
                )
                is not None
            )
        outcome.orphaned = not registered[source]
        target = None if outcome.orphaned else source
    outcome.instance_id = target
    problem = await _verify_objects(objects, body, request.verify_checksums)
    if problem:
        outcome.status, outcome.reason = ImportStatus.INCOMPLETE, problem
        return outcome
    return _Verified(outcome, body, data_key)


def _existing(doc: Document, key: str) -> PointOutcome:
    """A point already in the catalogue, as it is there."""
    orphaned = doc.get("orphaned") or {}
    return PointOutcome(
        str(doc["_id"]),
        key,
        ImportStatus.EXISTING,
        source_instance_id=orphaned.get("instance_id") or doc.get("instance_id"),
        instance_id=doc.get("instance_id"),
        plan_id=doc.get("plan_id"),
        plan_name=doc.get("plan_name"),
        created_at=doc.get("created_at"),
        orphaned=bool(orphaned),
    )


# --- writing the catalogue ------------------------------------------------------------------


def destination_id(instance_id: str, settings: destinations.AnySettings) -> str:
    """The same destination for the same instance and storage on every import."""
    where = (
        f"S3|{settings.endpoint or ''}|{settings.bucket}"
        if settings.type == "S3"
        else f"SWIFT|{settings.auth_url}|{settings.container}"
    )
    digest = hashlib.sha256(f"{instance_id}|{where}|{settings.prefix}".encode()).hexdigest()
    return f"import-{digest[:32]}"


def _owner(outcome: PointOutcome) -> str:
    if outcome.orphaned:
        return f"orphaned:{outcome.source_instance_id}"
    return str(outcome.instance_id)


async def _destination(
    db: Database, box: SecretBox, outcome: PointOutcome, settings: destinations.AnySettings
) -> str:
    """The destination of the imported points of ``outcome``'s target instance; for orphaned
    points, an orphaned destination (as :func:`backup.orphans.keep` leaves one)."""
    dest_id = destination_id(_owner(outcome), settings)
    at = now()
    instance_id = str(outcome.instance_id)
    extra: Document = {}
    if outcome.orphaned:
        instance_id = f"{orphans.DESTINATION_OWNER}{dest_id}"
        extra["orphaned"] = {"instance_id": outcome.source_instance_id, "at": at}
    fields = {
        **destinations.public_settings(settings),
        "secrets": box.seal_map(
            destinations.sealed_secret(settings), destinations._context(dest_id)
        ),
        "updated_at": at,
    }
    if await db.destinations.find_one({"_id": dest_id}, {"_id": 1}) is not None:
        # Found again: the credentials that just worked replace the stored ones.
        await db.destinations.update_one({"_id": dest_id}, {"$set": fields})
        return dest_id
    for name in (f"imported-{dest_id[-8:]}", f"imported-{dest_id}"):
        try:
            await db.destinations.insert_one(
                {
                    "_id": dest_id,
                    "instance_id": instance_id,
                    "name": name,
                    **fields,
                    "created_at": at,
                    "imported": True,
                    **extra,
                    "version": 1,
                    "schema_version": SCHEMA_VERSION,
                }
            )
            return dest_id
        except DuplicateKeyError:
            if await db.destinations.find_one({"_id": dest_id}, {"_id": 1}) is not None:
                return dest_id  # a concurrent import made it
    raise InvalidInput(
        f"Instance {instance_id!r} already has destinations named like the imported one.",
        code="duplicate_name",
    )


def _point(box: SecretBox, verified: _Verified, dest_id: str, at: datetime) -> Document:
    body, outcome = verified.body, verified.outcome
    created, expires = manifest.times(body)
    job = {
        "_id": outcome.id,
        "instance_id": outcome.instance_id,
        "plan_id": outcome.plan_id,
        "destination_id": dest_id,
    }
    agent = body.get("agent") if isinstance(body.get("agent"), dict) else None
    point = restore_points.new_point(
        box,
        job,
        items=[{f: i.get(f) for f in manifest.ITEM_FIELDS} for i in body["items"]],
        created_at=created,
        expires_at=expires,
        retention=body.get("retention") if isinstance(body.get("retention"), dict) else None,
        encryption_key=verified.data_key,
        agent=agent,
    )
    point.update(
        job_id=body.get("job_id") or outcome.id,
        state=RestorePointState.AVAILABLE,
        imported=True,
        imported_at=at,
        manifest_key=outcome.manifest_key,
        plan_name=outcome.plan_name,
    )
    if (locked := manifest.locked_until(body)) is not None:
        point["locked_until"] = locked
    if outcome.orphaned:
        point["orphaned"] = {"instance_id": outcome.source_instance_id, "at": at}
    elif outcome.source_instance_id != outcome.instance_id:
        point["source_instance_id"] = outcome.source_instance_id
    return point


async def run(
    db: Database,
    box: SecretBox,
    raw: dict[str, Any],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    check_timeout: float = 30.0,
) -> ImportResult:
    """Import the restore points of the destination ``raw`` names (see the module's text).
    Storage is read first and the catalogue written last, so a failure changes nothing."""
    request, spec = parse(raw)
    settings = spec.settings()
    await _targets(db, request.instances)
    result = ImportResult(dry_run=request.dry_run)
    verified: list[_Verified] = []
    registered: dict[str, bool] = {}
    try:
        async with open_store(settings.model_copy(update={"prefix": ""})) as objects:
            async with asyncio.timeout(check_timeout):  # an endpoint that is not one: quickly
                await objects.check_server()
            async with asyncio.timeout(timeout):
                keys = [
                    o.key
                    async for o in objects.list(settings.prefix)
                    if o.key.endswith(manifest.SUFFIX)
                ]
                result.found = len(keys)
                ids = {k.rpartition("/")[2][: -len(manifest.SUFFIX)]: k for k in keys}
                present = {
                    d["_id"]: d
                    async for d in db.restore_points.find(
                        {"_id": {"$in": list(ids)}},
                        {
                            "instance_id": 1,
                            "plan_id": 1,
                            "plan_name": 1,
                            "created_at": 1,
                            "orphaned": 1,
                        },
                    )
                }
                read = 0
                for point_id, key in ids.items():
                    if point_id in present:
                        result.points.append(_existing(present[point_id], key))
                        continue
                    if read >= MAX_READ:
                        result.remaining += 1
                        continue
                    read += 1
                    checked = await _verify(db, box, objects, key, request, registered)
                    if isinstance(checked, _Verified):
                        verified.append(checked)
                        result.points.append(checked.outcome)
                    else:
                        result.points.append(checked)
    except (StorageError, TimeoutError, OSError, ImportError, SecretKeyError) as exc:
        raise _storage_problem(exc, settings) from None
    if request.dry_run:
        return result
    at = now()
    for entry in verified:
        owner = _owner(entry.outcome)
        if owner not in result.destinations:
            result.destinations[owner] = await _destination(db, box, entry.outcome, settings)
        point = _point(box, entry, result.destinations[owner], at)
        if not await restore_points.record(db, point):
            entry.outcome.status = ImportStatus.EXISTING  # a concurrent import was first
    log.info(
        "restore_points_imported",
        found=result.found,
        imported=result.count(ImportStatus.IMPORTED),
        existing=result.count(ImportStatus.EXISTING),
        invalid=result.count(ImportStatus.INVALID),
        incomplete=result.count(ImportStatus.INCOMPLETE),
    )
    return result
