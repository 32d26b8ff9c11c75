"""Restore point manifests: what a restore point is, written as an object beside its files, so
the catalogue can be rebuilt from storage alone after the manager's database is lost
(:mod:`backup.importer`).

A manifest is a JSON object (``"format": 1``) naming the point (its id, which is its backup
job's id), the instance and plan it came from, each item's object key, sizes, checksum,
compression and encryption, the created and expiry times, and, when the backup is encrypted,
the data key sealed with the manager's master key (:class:`SecretBox`: AES-256-GCM, the
sealing key's id recorded, bound to the point's id; never in plain text). The whole manifest
is authenticated with the master key too (``seal``: the SHA-256 of its canonical JSON, sealed
the same way), so that someone holding only the storage credentials can neither forge a
manifest nor move a point to another instance by editing one.

The runner writes it last, after every file of the point is confirmed in storage: a manifest
means a complete point. Its key is ``<destination prefix><instance>/<plan or manual>/<point
id>.osb-manifest.json``, in the folder that holds the point's files (one folder per item).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Protocol

from backup.database import Document
from backup.errors import STORAGE_FAILURES, storage_failure
from backup.secrets import SecretBox, SecretKeyError
from storage import ObjectStore
from storage.settings import S3Settings, SwiftSettings

AnySettings = S3Settings | SwiftSettings

FORMAT = 1
SUFFIX = ".osb-manifest.json"
KIND = "osb-backup-manager/restore-point"
MAX_BYTES = 1024 * 1024
"""A manifest larger than this is not one of ours (a point of 1,000 items is about 400 KB)."""

ITEM_FIELDS = (
    "name",
    "key",
    "filename",
    "size",
    "stored_size",
    "checksum",
    "compression",
    "encryption",
)


class ManifestError(ValueError):
    """A manifest that is not valid: the message says what is wrong, in words."""


def key_for(folder: str, point_id: str) -> str:
    """The manifest's object key in ``folder`` (``<prefix><instance>/<plan or manual>/``)."""
    return f"{folder}{point_id}{SUFFIX}"


def _context(point_id: str) -> str:
    return f"manifests/{point_id}"


def _iso(value: datetime | None) -> str | None:
    """In milliseconds, as the database keeps times: an imported point has the same times."""
    if value is None:
        return None
    return value.replace(microsecond=value.microsecond // 1000 * 1000).isoformat()


def _sealed_json(sealed: Mapping[str, object]) -> dict[str, Any]:
    nonce, ciphertext = sealed["n"], sealed["ct"]
    assert isinstance(nonce, bytes) and isinstance(ciphertext, bytes)
    return {
        "v": sealed["v"],
        "key_id": sealed["kid"],
        "nonce": base64.b64encode(nonce).decode(),
        "ciphertext": base64.b64encode(ciphertext).decode(),
    }


def _sealed_from_json(data: object, what: str) -> dict[str, object]:
    if not isinstance(data, dict):
        raise ManifestError(f"{what} is not a sealed value.")
    try:
        return {
            "v": data["v"],
            "kid": str(data["key_id"]),
            "n": base64.b64decode(str(data["nonce"]), validate=True),
            "ct": base64.b64decode(str(data["ciphertext"]), validate=True),
        }
    except (KeyError, ValueError):
        raise ManifestError(f"{what} is not a sealed value.") from None


def _canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(
        {k: v for k, v in body.items() if k != "seal"},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()


def build(
    box: SecretBox,
    point: Document,
    *,
    plan_name: str | None,
    encryption_key: str | None,
) -> dict[str, Any]:
    """The manifest of ``point`` (a restore point document, as recorded), with its data key
    ``encryption_key`` (plain, from the runner) sealed under the active master key."""
    point_id = str(point["_id"])
    items = [{f: i.get(f) for f in ITEM_FIELDS} for i in point.get("items") or []]
    compression = sorted({str(i["compression"]) for i in items if i.get("compression")})
    schemes = sorted({str(i["encryption"]) for i in items if i.get("encryption")})
    data_key = None
    if encryption_key:
        data_key = _sealed_json(box.seal(encryption_key, f"{_context(point_id)}/encryption_key"))
    agent = point.get("agent") or None
    body: dict[str, Any] = {
        "format": FORMAT,
        "kind": KIND,
        "restore_point_id": point_id,
        "job_id": point.get("job_id"),
        "instance_id": point["instance_id"],
        "plan": {"id": point["plan_id"], "name": plan_name} if point.get("plan_id") else None,
        "created_at": _iso(point["created_at"]),
        "expires_at": _iso(point.get("expires_at")),
        "retention": point.get("retention"),
        "locked_until": _iso(point.get("locked_until")),
        "agent": {"kind": agent.get("kind"), "version": agent.get("version")} if agent else None,
        "compression": compression[0] if len(compression) == 1 else (compression or None),
        "encryption": {"scheme": schemes[0] if len(schemes) == 1 else schemes, "data_key": data_key}
        if schemes
        else None,
        "items": items,
    }
    digest = hashlib.sha256(_canonical(body)).hexdigest()
    body["seal"] = _sealed_json(box.seal(digest, _context(point_id)))
    return body


def encode(manifest: Mapping[str, Any]) -> bytes:
    return json.dumps(manifest, indent=1, ensure_ascii=False).encode() + b"\n"


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


# --- reading --------------------------------------------------------------------------------


def _text(body: Mapping[str, Any], name: str, *, optional: bool = False) -> str | None:
    value = body.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise ManifestError(f"Its {name!r} is missing or not a string.")
    return value


def _time(body: Mapping[str, Any], name: str, *, optional: bool = False) -> datetime | None:
    value = _text(body, name, optional=optional)
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ManifestError(f"Its {name!r} is not a date and time.") from None
    if parsed.tzinfo is None:
        raise ManifestError(f"Its {name!r} has no time zone.")
    return parsed


def _size(item: Mapping[str, Any], name: str) -> int | None:
    value = item.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ManifestError(f"An item's {name!r} is not a size in bytes.")
    return value


def parse(data: bytes, box: SecretBox) -> dict[str, Any]:
    """The manifest in ``data``, checked: its format, its seal (made with one of the
    configured master keys, over exactly this content), and the shape of every field the
    import uses. Raises :class:`ManifestError` saying what is wrong."""
    if len(data) > MAX_BYTES:
        raise ManifestError(f"It is larger than {MAX_BYTES} bytes.")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ManifestError("It is not JSON.") from None
    if not isinstance(body, dict):
        raise ManifestError("It is not a JSON object.")
    if body.get("format") != FORMAT or body.get("kind") != KIND:
        raise ManifestError(
            f"Its format is {body.get('format')!r}; this manager reads format {FORMAT}."
        )
    point_id = _text(body, "restore_point_id")
    assert point_id is not None
    if len(point_id) > 64:
        raise ManifestError("Its 'restore_point_id' is too long.")
    try:
        digest = box.open(_sealed_from_json(body.get("seal"), "Its seal"), _context(point_id))
    except SecretKeyError as exc:
        raise ManifestError(
            f"Its seal does not open with the configured master keys ({exc}): it was written "
            "by a manager with other keys, or changed since."
        ) from None
    if digest != hashlib.sha256(_canonical(body)).hexdigest():
        raise ManifestError("Its content was changed after it was written (the seal differs).")
    # Sealed by us: the shape is ours, but a manifest of a later version may still differ.
    _text(body, "instance_id")
    _time(body, "created_at")
    _time(body, "expires_at", optional=True)
    _time(body, "locked_until", optional=True)
    items = body.get("items")
    if not isinstance(items, list) or not items:
        raise ManifestError("It lists no items.")
    for item in items:
        if not isinstance(item, dict):
            raise ManifestError("An item is not an object.")
        _text(item, "name")
        _text(item, "key")
        _size(item, "size")
        _size(item, "stored_size")
    return body


def data_key(box: SecretBox, manifest: Mapping[str, Any]) -> str | None:
    """The data key of a parsed manifest, opened (None: the backup is not encrypted)."""
    encryption = manifest.get("encryption")
    if not isinstance(encryption, dict) or encryption.get("data_key") is None:
        return None
    point_id = str(manifest["restore_point_id"])
    sealed = _sealed_from_json(encryption["data_key"], "Its data key")
    try:
        return box.open(sealed, f"{_context(point_id)}/encryption_key")
    except SecretKeyError as exc:
        raise ManifestError(f"Its data key does not open ({exc}).") from None


def times(manifest: Mapping[str, Any]) -> tuple[datetime, datetime | None]:
    created = _time(manifest, "created_at")
    assert created is not None
    return created, _time(manifest, "expires_at", optional=True)


def locked_until(manifest: Mapping[str, Any]) -> datetime | None:
    """Until when the point's objects are locked (S3 Object Lock), if they are."""
    return _time(manifest, "locked_until", optional=True)


# --- writing --------------------------------------------------------------------------------


class _Stores(Protocol):
    def use(self, settings: AnySettings) -> AbstractAsyncContextManager[ObjectStore]: ...


async def _upload(
    objects: ObjectStore, key: str, data: bytes, locked_until: datetime | None
) -> None:
    """The same lock as the point's files (S3 Object Lock), if they have one."""
    if locked_until is not None:
        from storage.s3 import S3Store

        if isinstance(objects, S3Store):
            await objects.upload(key, chunks(data), retain_until=locked_until)
            return
    await objects.upload(key, chunks(data))


async def write(
    stores: _Stores,
    settings: AnySettings,
    box: SecretBox,
    point: Document,
    *,
    folder: str,
    plan_name: str | None,
    encryption_key: str | None,
    timeout: float,
) -> str | None:
    """Write the manifest of ``point`` into ``folder`` with ``settings`` (a destination's
    settings for whole keys: prefix ''), record its key on ``point`` (``manifest_key``), and
    return None; or return what failed, in a sentence, having recorded nothing."""
    key = key_for(folder, str(point["_id"]))
    data = encode(build(box, point, plan_name=plan_name, encryption_key=encryption_key))
    try:
        async with asyncio.timeout(timeout):
            async with stores.use(settings) as objects:
                await _upload(objects, key, data, point.get("locked_until"))
    except STORAGE_FAILURES as exc:
        return f"The restore point's manifest could not be written ({storage_failure(exc)})."
    point["manifest_key"] = key
    return None
