"""Lists read in bounded windows of created_at (backup/pagination.py): whatever the spread of
the documents in time (a burst within one millisecond, years between two, a list that grows
or shrinks between requests, so that the windows remembered from the last request are wrong),
every page holds exactly what sorting the whole list would put there, through the API."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from backup import jobs
from tests.api.conftest import Api, add_instance


def _at(base: datetime, offset: timedelta) -> datetime:
    moment = base - offset
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


async def _insert(api: Api, instance: str, moments: list[datetime]) -> None:
    docs = []
    for n, at in enumerate(moments):
        doc = jobs.new_job(
            instance_id=instance,
            type="BACKUP",
            plan_id=f"p{n % 3}",
            destination_id="d",
            trigger="SCHEDULE",
            items=[jobs.new_item("db1")],
            compression=True,
            encryption={"enabled": False},
            status="FAILED" if n % 4 == 0 else "SUCCEEDED",
        )
        doc["created_at"] = at
        docs.append(doc)
    await api.db.jobs.insert_many(docs)


async def _truth(
    api: Api, instance: str, *, until: datetime | None = None, **where: Any
) -> list[str]:
    """The list's ids newest first, sorted here; numbered pages leave out what was created
    after their as_of (``until``)."""
    query: dict[str, Any] = {"instance_id": instance, **where}
    if until is not None:
        query["created_at"] = {"$lte": until}
    raw = await api.db.jobs.find(query, {"created_at": 1}).to_list()
    ordered = sorted(raw, key=lambda d: (d["created_at"], d["_id"]), reverse=True)
    return [d["_id"] for d in ordered]


async def _by_cursor(api: Api, instance: str, limit: int, query: str = "") -> list[str]:
    seen: list[str] = []
    cursor = None
    while True:
        q = f"?limit={limit}{query}" + (f"&cursor={cursor}" if cursor else "")
        status, page = await api.call("GET", "/jobs" + q, instance=instance)
        assert status == 200, page
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            assert page["total"] == len(seen), page  # the last page knows the total
            return seen
        assert page["total"] is None and len(page["items"]) == limit, page
        assert len(seen) <= 10_000


async def _by_number(api: Api, instance: str, size: int, query: str = "") -> list[str]:
    status, first = await api.call("GET", f"/jobs?page=1&size={size}{query}", instance=instance)
    assert status == 200, first
    seen = [j["id"] for j in first["items"]]
    total = first["total"]
    number = 2
    while len(seen) < total:
        path = f"/jobs?page={number}&size={size}&as_of={first['as_of']}{query}"
        status, page = await api.call("GET", path, instance=instance)
        assert status == 200 and page["total"] == total, page
        assert page["items"], page
        seen += [j["id"] for j in page["items"]]
        number += 1
    # a deep page asked straight, without as_of, counts and lands where it should
    if number > 3:
        status, deep = await api.call(
            "GET", f"/jobs?page={number - 1}&size={size}{query}", instance=instance
        )
        assert status == 200 and deep["total"] == total, deep
        assert [j["id"] for j in deep["items"]] == seen[(number - 2) * size :]
    return seen


async def _check(api: Api, instance: str) -> None:
    truth = await _truth(api, instance)
    failed = await _truth(api, instance, status="FAILED")
    now = datetime.now(UTC)
    truth_now = await _truth(api, instance, until=now)
    failed_now = await _truth(api, instance, until=now, status="FAILED")
    for _ in range(2):  # the second time with the windows the first one taught
        assert await _by_cursor(api, instance, 7) == truth
        assert await _by_number(api, instance, 9) == truth_now
        assert await _by_cursor(api, instance, 5, "&status=FAILED") == failed
        assert await _by_number(api, instance, 4, "&status=FAILED") == failed_now


async def test_every_spread_in_time_pages_exactly(api: Api, instance: str) -> None:
    base = datetime.now(UTC)
    # neighbours in the database that must never leak into the list
    other = await add_instance(api.db)
    await _insert(api, other, [_at(base, timedelta(seconds=s)) for s in range(30)])
    # hourly history over two months, a burst of 30 in one millisecond, a few stragglers
    # years old, and one a day in the future (another replica's clock)
    moments = [_at(base, timedelta(hours=h, seconds=1)) for h in range(1, 1400, 13)]
    moments += [_at(base, timedelta(minutes=30))] * 30
    moments += [_at(base, timedelta(days=365 * y)) for y in (2, 3, 3, 9)]
    moments.append(_at(base, -timedelta(days=1)))
    await _insert(api, instance, moments)
    await _check(api, instance)
    # the list changes under the remembered windows: a burst of new documents just now,
    # then most of the recent ones deleted (a sparse head over a long tail)
    await _insert(api, instance, [_at(base, timedelta(milliseconds=ms)) for ms in range(60)])
    await _check(api, instance)
    recent = await api.db.jobs.find(
        {"instance_id": instance, "created_at": {"$gte": base - timedelta(days=40)}}, {"_id": 1}
    ).to_list()
    await api.db.jobs.delete_many({"_id": {"$in": [d["_id"] for d in recent[:-3]]}})
    await _check(api, instance)


async def test_short_lists_and_empty_ones(api: Api, instance: str) -> None:
    status, page = await api.call("GET", "/jobs", instance=instance)
    assert status == 200 and page == {
        "items": [],
        "total": 0,
        "next_cursor": None,
        "page": None,
        "as_of": None,
    }
    await _insert(api, instance, [_at(datetime.now(UTC), timedelta(days=d)) for d in range(3)])
    await _check(api, instance)
    # a short list that grows long, then empties
    await _insert(api, instance, [_at(datetime.now(UTC), timedelta(seconds=s)) for s in range(50)])
    await _check(api, instance)
    await api.db.jobs.delete_many({"instance_id": instance})
    status, page = await api.call("GET", "/jobs?limit=5", instance=instance)
    assert status == 200 and page["items"] == [] and page["total"] == 0
