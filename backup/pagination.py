"""Keyset pagination, newest first, on (created_at, _id): stable under concurrent inserts
(new documents land before the first page, never inside a later one). The cursor is opaque
to callers: base64url of the last document's sort key."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection

from backup.errors import InvalidInput
from backup.store import Document

MAX_LIMIT = 100
DEFAULT_LIMIT = 20
_SORT = [("created_at", -1), ("_id", -1)]


def now() -> datetime:
    """Aware UTC now, cut to the millisecond MongoDB keeps, so cursors compare exactly."""
    t = datetime.now(UTC)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


@dataclass
class Page:
    items: list[Document]
    total: int
    next_cursor: str | None


def encode_cursor(doc: Document) -> str:
    created: datetime = doc["created_at"]
    ms = int(created.timestamp() * 1000)
    raw = json.dumps([ms, str(doc["_id"])], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    bad = InvalidInput(
        "The cursor is not one this API returned; start again without 'cursor'.",
        code="invalid_cursor",
        field="cursor",
    )
    if len(cursor) > 512:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        ms, oid = json.loads(raw)
        if not isinstance(ms, int) or isinstance(ms, bool) or not isinstance(oid, str):
            raise ValueError
        return datetime.fromtimestamp(ms / 1000, UTC), oid
    except (ValueError, TypeError, binascii.Error, OverflowError, OSError, RecursionError):
        raise bad from None


async def paginate(
    collection: AsyncCollection[Document],
    query: dict[str, Any],
    *,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    projection: dict[str, Any] | None = None,
) -> Page:
    """One page of ``query`` newest first, the total matching ``query`` and the next cursor."""
    limit = max(1, min(limit, MAX_LIMIT))
    find = query
    if cursor:
        at, oid = decode_cursor(cursor)
        find = {
            "$and": [
                query,
                {"$or": [{"created_at": {"$lt": at}}, {"created_at": at, "_id": {"$lt": oid}}]},
            ]
        }

    async def fetch() -> list[Document]:
        return await collection.find(find, projection).sort(_SORT).limit(limit + 1).to_list()

    docs, total = await asyncio.gather(fetch(), collection.count_documents(query))
    more = len(docs) > limit
    docs = docs[:limit]
    return Page(docs, total, encode_cursor(docs[-1]) if more and docs else None)
