"""Destinations: where an instance's backups are stored (an S3 bucket or a Swift container).

The document holds the public settings of :class:`storage.S3Settings` / :class:`SwiftSettings`
at top level and the secret (``secret_access_key`` or ``password``) sealed under ``secrets``.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import SecretStr
from pymongo.errors import DuplicateKeyError

from backup.errors import Conflict, NotFound
from backup.pagination import Page, now, paginate
from backup.secrets import SecretBox
from backup.store import SCHEMA_VERSION, Document, Store
from storage.settings import S3Settings, SwiftSettings

AnySettings = S3Settings | SwiftSettings
SECRET_FIELD = {"S3": "secret_access_key", "SWIFT": "password"}
# Never taken from users: a path on the manager's disk.
_SERVER_ONLY = {"ca_bundle"}


def _context(dest_id: str) -> str:
    return f"destinations/{dest_id}"


def public_settings(settings: AnySettings) -> dict[str, Any]:
    secret = SECRET_FIELD[settings.type]
    return settings.model_dump(exclude={secret, *_SERVER_ONLY})


def settings_for(doc: Document, box: SecretBox) -> AnySettings:
    """The connection settings of a stored destination, with its secret opened."""
    kind = doc["type"]
    secret = SECRET_FIELD[kind]
    opened = box.open_map(doc.get("secrets") or {}, _context(doc["_id"]))
    cls = S3Settings if kind == "S3" else SwiftSettings
    fields = {k: doc[k] for k in cls.model_fields if k in doc and k != secret}
    return cls(**fields, **{secret: SecretStr(opened.get(secret, ""))})


async def _check_name(store: Store, instance_id: str, name: str, own_id: str | None) -> None:
    other = await store.destinations.find_one(
        {"instance_id": instance_id, "name": name, "_id": {"$ne": own_id}}, {"_id": 1}
    )
    if other is not None:
        raise Conflict(
            f"This instance already has a destination named {name!r}; choose another name.",
            code="duplicate_name",
            field="name",
        )


async def create(
    store: Store, box: SecretBox, instance_id: str, name: str, settings: AnySettings
) -> Document:
    await _check_name(store, instance_id, name, None)
    dest_id = uuid.uuid4().hex
    secret = SECRET_FIELD[settings.type]
    at = now()
    doc: Document = {
        "_id": dest_id,
        "instance_id": instance_id,
        "name": name,
        **public_settings(settings),
        "secrets": box.seal_map(
            {secret: getattr(settings, secret).get_secret_value()}, _context(dest_id)
        ),
        "created_at": at,
        "updated_at": at,
        "version": 1,
        "schema_version": SCHEMA_VERSION,
    }
    await store.destinations.insert_one(doc)
    return doc


async def get(store: Store, instance_id: str, dest_id: str) -> Document:
    doc = await store.destinations.find_one({"_id": dest_id, "instance_id": instance_id})
    if doc is None:
        raise NotFound(
            f"This instance has no destination {dest_id!r}.", code="destination_not_found"
        )
    return doc


async def list_page(store: Store, instance_id: str, limit: int, cursor: str | None) -> Page:
    return await paginate(
        store.destinations, {"instance_id": instance_id}, limit=limit, cursor=cursor
    )


async def replace(
    store: Store,
    box: SecretBox,
    current: Document,
    name: str,
    settings: AnySettings,
) -> Document:
    """Store new settings (already merged and validated) if nobody changed it meanwhile."""
    await _check_name(store, current["instance_id"], name, current["_id"])
    secret = SECRET_FIELD[settings.type]
    dest_id = current["_id"]
    public = public_settings(settings)
    stale = [
        k for k in set(S3Settings.model_fields) | set(SwiftSettings.model_fields) if k in current
    ]
    update: dict[str, Any] = {
        "$set": {
            "name": name,
            **public,
            "secrets": box.seal_map(
                {secret: getattr(settings, secret).get_secret_value()}, _context(dest_id)
            ),
            "updated_at": now(),
        },
        "$inc": {"version": 1},
    }
    unset = {k: "" for k in stale if k not in public}
    if unset:
        update["$unset"] = unset
    try:
        result = await store.destinations.update_one(
            {"_id": dest_id, "version": current["version"]}, update
        )
    except DuplicateKeyError:  # pragma: no cover - no unique index on names today
        raise Conflict("A destination with this name exists.", code="duplicate_name") from None
    if result.matched_count != 1:
        raise Conflict(
            "The destination was changed by someone else meanwhile; read it again and retry.",
            code="concurrent_update",
        )
    return await get(store, current["instance_id"], dest_id)


async def delete(store: Store, instance_id: str, dest_id: str) -> None:
    await get(store, instance_id, dest_id)
    plan = await store.plans.find_one(
        {"instance_id": instance_id, "destination_id": dest_id}, {"name": 1}
    )
    if plan is not None:
        raise Conflict(
            f"Plan {plan.get('name')!r} stores its backups in this destination; change or delete "
            "that plan first.",
            code="destination_in_use",
        )
    points = await store.restore_points.count_documents(
        {"instance_id": instance_id, "destination_id": dest_id}
    )
    if points:
        raise Conflict(
            f"{points} restore point(s) are stored in this destination; delete them first "
            "(deleting the destination would leave their files unreachable).",
            code="destination_in_use",
        )
    active = await store.jobs.find_one(
        {"destination_id": dest_id, "status": {"$in": ["QUEUED", "RUNNING"]}}, {"_id": 1}
    )
    if active is not None:
        raise Conflict(
            f"Job {active['_id']} is using this destination; wait for it to end.",
            code="destination_in_use",
        )
    await store.destinations.delete_one({"_id": dest_id, "instance_id": instance_id})
