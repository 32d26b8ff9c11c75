"""Pagination of every list, newest first on (created_at, _id), in two styles:

- **Keyset** (``cursor``): each page hands out ``next_cursor``, the sort key of its last
  document (and how many documents came before it); the next page starts strictly after it.
  Stable under concurrent inserts: new documents land before the first page, never inside a
  later one. ``total`` is given when the page ends the list (it is then known without
  counting), else ``None``: counting costs a pass over the whole list, which a page must not.
- **Numbered pages** (``page`` and ``size``): for tables that jump to page N. Each answer
  carries ``as_of``, the moment its list was taken (the request's time unless one was sent),
  and the list's ``total`` at that moment (counted by the first page that needs it, then
  carried in ``as_of``); pages asked with that ``as_of`` count only documents created until
  then, so inserts do not shift them and ``total`` stays the same. (A deleted document still
  moves later ones up by one, as offsets always do; cursors do not have that problem.)

Every read is a bounded range of ``created_at`` (see "bounded reads" below), so a page
examines about what it holds on the embedded server as on MongoDB.

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
from datetime import UTC, datetime, timedelta
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
    total: int | None
    """The entries of the whole list; None on a cursor page that does not end the list."""
    next_cursor: str | None
    page: int | None = None
    """The page number, when numbered pages were asked for."""
    as_of: str | None = None
    """Numbered pages: send it back with the next pages to keep them stable."""


Key = tuple[datetime, str, int | None]
"""(created_at, _id) of the last document of a page, and how many documents precede the next
page (None in cursors of earlier versions)."""


@dataclass(frozen=True)
class _Offset:
    page: int
    as_of: datetime | None
    total: int | None = None


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


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _key(value: Any, field: str) -> Key:
    if (
        not isinstance(value, list)
        or len(value) not in (2, 3)
        or not _whole(value[0])
        or not isinstance(value[1], str)
        or (len(value) == 3 and not (_whole(value[2]) and 0 <= value[2] <= 10**12))
    ):
        raise _bad_cursor(field)
    try:
        at = datetime.fromtimestamp(value[0] / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        raise _bad_cursor(field) from None
    return at, value[1], value[2] if len(value) == 3 else None


def encode_cursor(doc: Document, offset: int | None = None) -> str:
    """The keyset cursor that continues after ``doc``, which ends the first ``offset``
    documents of the list (if known)."""
    raw: list[Any] = [_ms(doc["created_at"]), str(doc["_id"])]
    return _b64(raw if offset is None else [*raw, offset])


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, _id) a keyset cursor continues after."""
    at, oid, _ = _key(_unb64(cursor, "cursor"), "cursor")
    return at, oid


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
    pinned, total = None, None
    if as_of:
        value = _unb64(as_of, "as_of")
        pinned = _moment(value.get("t") if isinstance(value, dict) else None, "as_of")
        total = _count(value.get("n"), "as_of")
    return _b64({"page": page, "as_of": _ms(pinned) if pinned else None, "n": total})


def _count(value: Any, field: str) -> int | None:
    """A total carried in ``as_of`` (absent in those of earlier versions)."""
    if value is None:
        return None
    if not _whole(value) or not 0 <= value <= 10**12:
        raise _bad_cursor(field)
    return int(value)


def _decode(cursor: str) -> Key | _Offset:
    value = _unb64(cursor, "cursor")
    if isinstance(value, dict):
        page = value.get("page")
        if not isinstance(page, int) or isinstance(page, bool) or not 1 <= page <= MAX_PAGE:
            raise _bad_cursor()
        as_of = value.get("as_of")
        pinned = _moment(as_of, "cursor") if as_of is not None else None
        return _Offset(page, pinned, _count(value.get("n"), "cursor") if pinned else None)
    return _key(value, "cursor")


def _within(query: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """``query`` with conditions on further fields, kept flat (``{instance_id: .., created_at:
    {..}}``) so that a server's planner matches it to the compound index (instance_id,
    created_at, _id); nested in ``$and`` only when ``query`` already constrains a field."""
    if any(name in query or name.startswith("$") for name in extra) or any(
        name.startswith("$") for name in query
    ):
        return {"$and": [query, *({name: value} for name, value in extra.items())]}
    return {**query, **extra}


# --- bounded reads ------------------------------------------------------------------------
#
# A page reads the newest documents of its list in windows of ``created_at``: first the span
# that held about twice a page the last time this list was read, then wider ones if the span
# held too few, and after _MAX_PROBES windows everything older. Each query is an exact range
# on the index (instance_id, created_at, _id), so a server examines what the window holds,
# whether or not it stops at the limit while walking the index: MongoDB does, the embedded
# SecantusDB fetches every match before sorting. Results never depend on the hints below:
# they only choose the windows' widths (a wrong one costs another window, not a wrong page),
# and no document is kept across requests.


@dataclass
class _Hint:
    spacing: float | None = None
    """Seconds between neighbouring documents near the head of the list, when it was longer
    than the documents a page needed."""
    whole: bool = False
    """The list was read to its end last time: it is short, one query reads it whole."""


_HINTS: dict[str, _Hint] = {}
_HINTS_MAX = 10_000
_MAX_PROBES = 3
_MARGIN = 1.5
_MS = timedelta(milliseconds=1)
"""Bounds are strict ($gt, $lt), an inclusive one moved by a millisecond (the same on BSON
dates, which keep milliseconds): SecantusDB 0.7.0b3 drops the documents equal to a $gte
bound on a descending field of a compound index, and to a $lte bound on an ascending one,
when another field follows it in the index (``(instance_id, created_at, _id)``)."""


def _to_ms(at: datetime) -> datetime:
    return at.replace(microsecond=at.microsecond // 1000 * 1000)


"""Windows are sized to hold this many times the documents a page needs."""


def _hint_key(collection: AsyncCollection[Document], query: dict[str, Any]) -> str:
    return collection.full_name + "\0" + repr(sorted(query.items()))


def _remember(key: str, hint: _Hint) -> None:
    if key not in _HINTS and len(_HINTS) >= _HINTS_MAX:
        for old in list(_HINTS)[: _HINTS_MAX // 10]:  # the oldest tenth
            del _HINTS[old]
    _HINTS[key] = hint


def forget_hints() -> None:
    """Drop every window hint (tests, and benchmarks measuring a cold start)."""
    _HINTS.clear()


async def _newest(
    collection: AsyncCollection[Document],
    query: dict[str, Any],
    projection: dict[str, Any] | None,
    *,
    need: int,
    before: datetime | None = None,
    inclusive: bool = False,
) -> tuple[list[Document], bool]:
    """Up to ``need`` documents of ``query`` newest first, created before ``before`` (at or
    before, if ``inclusive``; no bound if None), and whether the list ended there (fewer
    than ``need`` exist)."""
    key = _hint_key(collection, query)
    hint = _HINTS.get(key)
    anchor = before if before is not None else now()
    width = (
        timedelta(seconds=hint.spacing * need * _MARGIN)
        if hint is not None and hint.spacing is not None and not hint.whole
        else None
    )
    upper: dict[str, Any] = {} if before is None else {"$lt": before + _MS if inclusive else before}
    out: list[Document] = []
    probes = 0
    while True:
        lower = _to_ms(anchor - width) if width is not None and probes < _MAX_PROBES else None
        span = {**upper, **({"$gt": lower} if lower is not None else {})}
        find = _within(query, created_at=span) if span else query
        wanted = need - len(out)
        found = collection.find(find, projection).sort(_SORT).limit(wanted).batch_size(wanted)
        out += await found.to_list()
        if len(out) >= need:
            ended = False
            break
        if lower is None:
            ended = True
            break
        # The window held too few: the next one is sized by the density seen so far (and at
        # least four times as wide), starting where this one ended.
        assert width is not None
        seen = max((anchor - lower).total_seconds(), 0.001)
        density = len(out) / seen
        rest = (need - len(out)) / density * _MARGIN if density else 0.0
        upper = {"$lt": lower + _MS}
        anchor, width = lower, max(width * 4, timedelta(seconds=rest))
        probes += 1
    if ended and before is None:
        _remember(key, _Hint(whole=True))
    elif not ended:
        head = before if before is not None else now()
        spread = max((head - out[-1]["created_at"]).total_seconds(), 0.001)
        _remember(key, _Hint(spacing=spread / len(out)))
    return out, ended


async def paginate(
    collection: AsyncCollection[Document],
    query: dict[str, Any],
    *,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    projection: dict[str, Any] | None = None,
) -> Page:
    """One page of ``query`` newest first and the next cursor; ``total`` when it is known
    without counting (the page ends the list), or on numbered pages (counted once, then
    carried by ``as_of``)."""
    limit = max(1, min(limit, MAX_LIMIT))
    position = _decode(cursor) if cursor else None
    if isinstance(position, _Offset):
        return await _numbered(collection, query, limit, position, projection)
    if position is None:
        docs, _ = await _newest(collection, query, projection, need=limit + 1)
        offset = 0
    else:
        at, oid, offset_ = position
        offset = offset_ if offset_ is not None else -1
        # the documents sharing the cursor's moment first, then the older ones
        ties_query = _within(query, created_at=at, _id={"$lt": oid})
        ties_find = collection.find(ties_query, projection).sort(_SORT).limit(limit + 1)
        ties, (older, _) = await asyncio.gather(
            ties_find.to_list(),
            _newest(collection, query, projection, need=limit + 1, before=at),
        )
        docs = ties + older
    more = len(docs) > limit
    docs = docs[:limit]
    total = offset + len(docs) if not more and offset >= 0 else None
    after = offset + len(docs) if offset >= 0 else None
    return Page(docs, total, encode_cursor(docs[-1], after) if more and docs else None)


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
    # Deeper pages find their place from the keys alone (the server still examines what
    # comes before the page, as an offset must, but sends only keys), then fetch the page.
    found, ended = await _newest(
        collection,
        query,
        projection if not skip else {"created_at": 1},
        need=skip + limit + 1,
        before=as_of,
        inclusive=True,
    )
    total = position.total
    if total is None:
        total = (
            len(found)
            if ended
            else await collection.count_documents(_within(query, created_at={"$lt": as_of + _MS}))
        )
    docs = found[skip : skip + limit + 1]
    if skip and docs:
        span = {"$gt": docs[-1]["created_at"] - _MS, "$lt": docs[0]["created_at"] + _MS}
        wanted = {d["_id"]: n for n, d in enumerate(docs)}
        fetched = await collection.find(_within(query, created_at=span), projection).to_list()
        docs = sorted((d for d in fetched if d["_id"] in wanted), key=lambda d: wanted[d["_id"]])
    more = len(docs) > limit
    docs = docs[:limit]
    return Page(
        docs,
        total,
        encode_cursor(docs[-1], skip + len(docs)) if more and docs else None,
        page=position.page,
        as_of=_b64({"t": _ms(as_of), "n": total}),
    )
