"""Pagination of every list, newest first on (created_at, _id), in two styles:

- **Keyset** (``cursor``): each page hands out ``next_cursor``, the sort key of its last
  document; the next page starts strictly after it. Stable under concurrent inserts: new
  documents land before the first page, never inside a later one.
- **Numbered pages** (``page`` and ``size``): for tables that jump to page N. Each answer
  carries ``as_of``, the moment its list was taken (the request's time unless one was sent);
  pages asked with that ``as_of`` count only documents created until then, so inserts do not
  shift them and ``total`` stays the same. (A deleted document still moves later ones up by
  one, as offsets always do; cursors do not have that problem.)

Both are carried by one opaque ``cursor`` string, so every ``list_page(limit, cursor)`` of the
domain serves both: :func:`page_cursor` turns (page, as_of) into such a string. Callers never
parse cursors; a malformed or foreign one is a 400 ``invalid_cursor``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection

from backup.database import Document
from backup.errors import InvalidInput

MAX_LIMIT = 100
DEFAULT_LIMIT = 20
MAX_PAGE = 10_000
MAX_OFFSET = 100_000
"""Numbered pages skip documents one by one in the database: beyond this, use cursors."""
_SORT = [("created_at", -1), ("_id", -1)]


def now() -> datetime:
    """Aware UTC now, cut to the millisecond MongoDB keeps, so cursors compare exactly."""
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


@dataclass
class Page:
    items: list[Document]
    total: int
    next_cursor: str | None
    page: int | None = None
    """The page number, when numbered pages were asked for."""
    as_of: str | None = None
    """Numbered pages: send it back with the next pages to keep them stable."""


Key = tuple[datetime, str]


@dataclass(frozen=True)
class _Offset:
    page: int
    as_of: datetime | None


def _bad_cursor(field: str = "cursor") -> InvalidInput:
    return InvalidInput(
        f"The {field} is not one this API returned; start again without '{field}'.",
        code="invalid_cursor",
        field=field,
    )


def _b64(value: Any) -> str:
    raw = json.dumps(value, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str, field: str) -> Any:
    if len(text) > 512:
        raise _bad_cursor(field)
    try:
        return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, TypeError, binascii.Error, RecursionError):
        raise _bad_cursor(field) from None


def _raw(key: Key) -> list[Any]:
    return [_ms(key[0]), key[1]]


def _key_of(doc: Document) -> Key:
    return doc["created_at"], str(doc["_id"])


def _key(value: Any, field: str) -> Key:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], int)
        or isinstance(value[0], bool)
        or not isinstance(value[1], str)
    ):
        raise _bad_cursor(field)
    try:
        return datetime.fromtimestamp(value[0] / 1000, UTC), value[1]
    except (ValueError, OverflowError, OSError):
        raise _bad_cursor(field) from None


def encode_cursor(doc: Document) -> str:
    """The keyset cursor that continues after ``doc``."""
    return _b64(_raw(_key_of(doc)))


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, _id) a keyset cursor continues after."""
    return _key(_unb64(cursor, "cursor"), "cursor")


def _moment(value: Any, field: str) -> datetime:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad_cursor(field)
    try:
        return datetime.fromtimestamp(value / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        raise _bad_cursor(field) from None


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def page_cursor(page: int, as_of: str | None = None) -> str:
    """The cursor string that asks for numbered page ``page`` (1-based) of a list, as it was
    at the ``as_of`` of an earlier page if given."""
    if not 1 <= page <= MAX_PAGE:
        raise InvalidInput(f"page must be a whole number from 1 to {MAX_PAGE}.", field="page")
    pinned = None
    if as_of:
        value = _unb64(as_of, "as_of")
        pinned = _moment(value.get("t") if isinstance(value, dict) else None, "as_of")
    return _b64({"page": page, "as_of": _ms(pinned) if pinned else None})


def _decode(cursor: str) -> Key | _Offset:
    value = _unb64(cursor, "cursor")
    if isinstance(value, dict):
        page = value.get("page")
        if not isinstance(page, int) or isinstance(page, bool) or not 1 <= page <= MAX_PAGE:
            raise _bad_cursor()
        as_of = value.get("as_of")
        return _Offset(page, _moment(as_of, "cursor") if as_of is not None else None)
    return _key(value, "cursor")


def _after(key: Key) -> dict[str, Any]:
    at, oid = key
    return {"$or": [{"created_at": {"$lt": at}}, {"created_at": at, "_id": {"$lt": oid}}]}


async def paginate(
    collection: AsyncCollection[Document],
    query: dict[str, Any],
    *,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    projection: dict[str, Any] | None = None,
) -> Page:
    """One page of ``query`` newest first, the total matching and the next cursor."""
    limit = max(1, min(limit, MAX_LIMIT))
    position = _decode(cursor) if cursor else None
    if isinstance(position, _Offset):
        return await _numbered(collection, query, limit, position, projection)
    find = {"$and": [query, _after(position)]} if position else query

    async def fetch() -> list[Document]:
        return await collection.find(find, projection).sort(_SORT).limit(limit + 1).to_list()

    docs, total = await asyncio.gather(fetch(), collection.count_documents(query))
    more = len(docs) > limit
    docs = docs[:limit]
    return Page(docs, total, encode_cursor(docs[-1]) if more and docs else None)


async def _numbered(
    collection: AsyncCollection[Document],
    query: dict[str, Any],
    limit: int,
    position: _Offset,
    projection: dict[str, Any] | None,
) -> Page:
    skip = (position.page - 1) * limit
    if skip > MAX_OFFSET:
        raise InvalidInput(
            f"Numbered pages reach only the first {MAX_OFFSET} entries; page through the rest "
            "with 'cursor' (each answer's next_cursor).",
            code="page_out_of_range",
            field="page",
        )
    as_of = position.as_of or now()
    scoped = {"$and": [query, {"created_at": {"$lte": as_of}}]}

    async def fetch() -> list[Document]:
        found = collection.find(scoped, projection).sort(_SORT).skip(skip).limit(limit + 1)
        return await found.to_list()

    docs, total = await asyncio.gather(fetch(), collection.count_documents(scoped))
    more = len(docs) > limit
    docs = docs[:limit]
    return Page(
        docs,
        total,
        encode_cursor(docs[-1]) if more and docs else None,
        page=position.page,
        as_of=_b64({"t": _ms(as_of)}),
    )
