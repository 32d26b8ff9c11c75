"""Retention's rules (backup/retention.py ``decide``): grandfather-father-son periods in the
plan's time zone across months, ISO weeks and DST, ``min_good``, pins, their combination
with DAYS/HOURS/FILES; and, against the real database and S3, that a preview is exactly what
the next sweep deletes."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from backup.clock import ManualClock
from backup.database import Database
from backup.retention import (
    KeepReason,
    RetentionSweeper,
    decide,
    preview,
    select_expired,
)
from backup.secrets import SecretBox
from storage import S3Settings
from tests.servers.seed import seed_destination

BERLIN = "Europe/Berlin"


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def _points(*times: datetime, pinned: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    return [
        {"_id": f"p{n:03d}", "created_at": t, "pinned": n in pinned} for n, t in enumerate(times)
    ]


def _kept(points: list[dict[str, Any]], retention: dict[str, Any], now: datetime, tz: str) -> dict:
    """{id: reasons} of the points kept."""
    return {d.point["_id"]: set(d.reasons) for d in decide(points, retention, now, tz) if d.kept}


# ------------------------------------------------------------------ calendar periods and DST


def test_daily_days_are_the_plans_local_days_across_the_march_dst_change() -> None:
    # Berlin moves from +01:00 to +02:00 at 2026-03-29 01:00 UTC.
    times = [
        _at("2026-03-27T22:30:00+00:00"),  # 23:30 on the 27th in Berlin
        _at("2026-03-27T23:30:00+00:00"),  # 00:30 on the 28th in Berlin
        _at("2026-03-28T22:30:00+00:00"),  # 23:30 on the 28th in Berlin (CET)
        _at("2026-03-28T23:30:00+00:00"),  # 00:30 on the 29th in Berlin (still CET)
        _at("2026-03-29T01:30:00+00:00"),  # 03:30 CEST on the 29th, after the jump
        _at("2026-03-29T22:30:00+00:00"),  # 00:30 CEST on the 30th
    ]
    points = _points(*times)
    now = times[-1] + timedelta(hours=1)
    berlin = _kept(points, {"daily": 3}, now, BERLIN)
    # the newest point of the 30th, the 29th and the 28th (Berlin days)
    assert set(berlin) == {"p005", "p004", "p002"}
    assert berlin["p004"] == {KeepReason.DAILY}
    # the same points counted in UTC days: the 29th, the 28th, the 27th
    assert set(_kept(points, {"daily": 3}, now, "UTC")) == {"p005", "p003", "p001"}


def test_daily_days_across_the_october_dst_change_and_its_repeated_hour() -> None:
    # Berlin moves from +02:00 back to +01:00 at 2026-10-25 01:00 UTC: 02:00-03:00 twice.
    times = [
        _at("2026-10-24T21:30:00+00:00"),  # 23:30 CEST on the 24th
        _at("2026-10-24T22:30:00+00:00"),  # 00:30 CEST on the 25th
        _at("2026-10-25T00:30:00+00:00"),  # 02:30 CEST on the 25th (first time)
        _at("2026-10-25T01:30:00+00:00"),  # 02:30 CET on the 25th (second time)
        _at("2026-10-25T23:30:00+00:00"),  # 00:30 CET on the 26th
    ]
    points = _points(*times)
    now = times[-1] + timedelta(minutes=5)
    assert set(_kept(points, {"daily": 3}, now, BERLIN)) == {"p004", "p003", "p000"}
    assert set(_kept(points, {"daily": 2}, now, BERLIN)) == {"p004", "p003"}
    # in UTC the 25th's newest is the 23:30 one, the 24th's is 22:30
    assert set(_kept(points, {"daily": 2}, now, "UTC")) == {"p004", "p001"}


def test_weekly_uses_iso_weeks_across_the_new_year() -> None:
    # 2026-12-31 (Thursday) and 2027-01-01 (Friday) are both in ISO week 53 of 2026;
    # 2027-01-04 (Monday) starts week 1 of 2027.
    times = [
        _at("2026-12-27T12:00:00+01:00"),  # Sunday, week 52
        _at("2026-12-31T12:00:00+01:00"),
        _at("2027-01-01T12:00:00+01:00"),
        _at("2027-01-04T12:00:00+01:00"),
    ]
    points = _points(*times)
    now = times[-1] + timedelta(hours=1)
    weekly = _kept(points, {"weekly": 3}, now, BERLIN)
    assert set(weekly) == {"p003", "p002", "p000"}
    # monthly and yearly: January 2027's newest, December 2026's newest
    assert set(_kept(points, {"monthly": 2}, now, BERLIN)) == {"p003", "p001"}
    assert set(_kept(points, {"yearly": 5}, now, BERLIN)) == {"p003", "p001"}


def test_a_month_begins_at_local_midnight() -> None:
    # 2026-04-30 22:30 UTC is already May 1st in Berlin (CEST, +02:00)
    times = [_at("2026-04-30T21:30:00+00:00"), _at("2026-04-30T22:30:00+00:00")]
    points = _points(*times)
    now = times[-1] + timedelta(hours=1)
    assert set(_kept(points, {"monthly": 2}, now, BERLIN)) == {"p000", "p001"}
    assert set(_kept(points, {"monthly": 2}, now, "UTC")) == {"p001"}


def _daily_backups(start: datetime, days: int, hour: int = 3) -> list[datetime]:
    """A nightly backup at ``hour`` o'clock Berlin time for ``days`` days."""
    zone = ZoneInfo(BERLIN)
    first = start.astimezone(zone).replace(hour=hour, minute=0, second=0, microsecond=0)
    return [
        datetime.combine(first.date() + timedelta(days=n), first.timetz().replace(tzinfo=None))
        .replace(tzinfo=zone)
        .astimezone(UTC)
        for n in range(days)
    ]


async def test_a_year_of_nightly_backups_with_the_sweep_run_every_night() -> None:
    """A ManualClock walks through 2026 (both DST changes); after each night's backup the
    sweep deletes what ``select_expired`` says. What is left is the GFS set, and the same set
    a single sweep would keep from every point ever made."""
    clock = ManualClock(_at("2026-01-01T00:00:00+00:00"))
    retention = {"daily": 7, "weekly": 4, "monthly": 6, "yearly": 2}
    made: list[dict[str, Any]] = []
    alive: list[dict[str, Any]] = []
    for at in _daily_backups(clock.now(), 365):
        await clock.advance(to=at)
        point = {"_id": f"p{len(made):03d}", "created_at": clock.now()}
        made.append(point)
        alive.append(point)
        gone = {p["_id"] for p in select_expired(alive, retention, clock.now(), BERLIN)}
        alive = [p for p in alive if p["_id"] not in gone]
    zone = ZoneInfo(BERLIN)
    local = sorted((p["created_at"].astimezone(zone) for p in alive), reverse=True)
    # all made at 03:00 Berlin time, whatever the offset of the day
    assert {t.hour for t in local} == {3}
    days = [t.date() for t in local]
    last = days[0]
    assert last == datetime(2026, 12, 31).date()
    assert [last - timedelta(days=n) for n in range(7)] == days[:7]
    # the weekly points: the newest of this ISO week and of each of the three before, Sundays
    weeks = {t.isocalendar()[:2] for t in local}
    assert {(2026, 53), (2026, 52), (2026, 51), (2026, 50)} <= weeks
    assert datetime(2026, 12, 27).date() in days and datetime(2026, 12, 20).date() in days
    # monthly: each month's last day, for the six newest months
    for month_end in ("2026-07-31", "2026-08-31", "2026-09-30", "2026-10-31", "2026-11-30"):
        assert datetime.fromisoformat(month_end).date() in days
    assert datetime(2026, 6, 30).date() not in days
    # yearly: only 2026 has points
    expected = {d.point["_id"] for d in decide(made, retention, clock.now(), BERLIN) if d.kept}
    assert {p["_id"] for p in alive} == expected
    assert len(alive) == len(set(days)) == 7 + 2 + 5  # overlaps counted once


# ------------------------------------------------------------------ combinations


NOW = _at("2026-06-15T12:00:00+00:00")


def _ages(*days: float, pinned: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    return _points(*(NOW - timedelta(days=d) for d in days), pinned=pinned)


def test_a_point_is_kept_if_any_rule_keeps_it() -> None:
    points = _ages(0.1, 1, 2, 3, 10, 40, 70)
    kept = _kept(points, {"style": "DAYS", "period": 3, "monthly": 3}, NOW, "UTC")
    assert kept == {
        "p000": {KeepReason.NEWEST, KeepReason.AGE, KeepReason.MONTHLY},  # June
        "p001": {KeepReason.AGE},
        "p002": {KeepReason.AGE},
        "p005": {KeepReason.MONTHLY},  # May 6th: May's newest
        "p006": {KeepReason.MONTHLY},  # April 6th
    }
    # FILES and weekly (NOW is a Monday: the 14th ends the week before)
    kept = _kept(points, {"style": "FILES", "period": 2, "weekly": 3}, NOW, "UTC")
    assert set(kept) == {"p000", "p001", "p004"}


def test_gfs_alone_deletes_what_no_period_keeps_but_never_the_newest() -> None:
    points = _ages(5, 5.5, 6)
    assert [p["_id"] for p in select_expired(points, {"daily": 1}, NOW, "UTC")] == [
        "p001",
        "p002",
    ]


def test_min_good_keeps_the_newest_of_what_the_rules_delete() -> None:
    points = _ages(10, 11, 12, 13, 14, 15)
    assert set(_kept(points, {"style": "DAYS", "period": 1}, NOW, "UTC")) == {"p000"}
    kept = _kept(points, {"style": "DAYS", "period": 1, "min_good": 4}, NOW, "UTC")
    assert kept == {
        "p000": {KeepReason.NEWEST},
        "p001": {KeepReason.MIN_GOOD},
        "p002": {KeepReason.MIN_GOOD},
        "p003": {KeepReason.MIN_GOOD},
    }
    # points the rules keep count towards min_good: nothing more is kept
    assert set(_kept(points, {"style": "FILES", "period": 4, "min_good": 3}, NOW, "UTC")) == {
        "p000",
        "p001",
        "p002",
        "p003",
    }
    # fewer points than min_good: all stay
    assert select_expired(points, {"style": "HOURS", "period": 1, "min_good": 10}, NOW) == []


def test_pinned_points_are_kept_and_count_towards_min_good() -> None:
    points = _ages(1, 2, 3, 400, pinned=(3,))
    kept = _kept(points, {"style": "FILES", "period": 1}, NOW, "UTC")
    assert kept == {"p000": {KeepReason.NEWEST, KeepReason.COUNT}, "p003": {KeepReason.PINNED}}
    kept = _kept(points, {"style": "FILES", "period": 1, "min_good": 3}, NOW, "UTC")
    assert kept["p001"] == {KeepReason.MIN_GOOD} and "p002" not in kept


def test_points_locked_in_storage_are_kept_until_their_lock_lapses() -> None:
    points = _ages(1, 2, 3)
    points[2]["locked_until"] = NOW + timedelta(hours=1)
    points[1]["locked_until"] = NOW - timedelta(seconds=1)  # lapsed
    kept = _kept(points, {"style": "FILES", "period": 1}, NOW, "UTC")
    assert kept == {"p000": {KeepReason.NEWEST, KeepReason.COUNT}, "p002": {KeepReason.LOCKED}}
    later = NOW + timedelta(hours=1)
    assert [p["_id"] for p in select_expired(points, {"style": "FILES", "period": 1}, later)] == [
        "p001",
        "p002",
    ]


def test_no_retention_keeps_everything_and_an_unknown_zone_counts_in_utc() -> None:
    points = _ages(1, 500)
    assert all(d.reasons == (KeepReason.NO_RETENTION,) for d in decide(points, None, NOW))
    assert _kept(points, {"daily": 1}, NOW, "Nowhere/Else") == _kept(
        points, {"daily": 1}, NOW, "UTC"
    )


@pytest.mark.parametrize(
    "retention",
    [
        {"style": "DAYS", "period": 7},
        {"style": "HOURS", "period": 30},
        {"style": "FILES", "period": 3},
        {"daily": 3, "weekly": 2},
        {"style": "DAYS", "period": 2, "monthly": 2, "min_good": 5},
    ],
)
def test_decisions_cover_every_point_once_newest_first(retention: dict[str, Any]) -> None:
    rng = random.Random(7)
    points = _ages(*(rng.uniform(0, 90) for _ in range(40)), pinned=(3, 17))
    decisions = decide(points, retention, NOW, BERLIN)
    assert sorted(d.point["_id"] for d in decisions) == sorted(p["_id"] for p in points)
    created = [d.point["created_at"] for d in decisions]
    assert created == sorted(created, reverse=True)
    assert decisions[0].kept and all(d.kept for d in decisions if d.point["pinned"])
    assert {p["_id"] for p in select_expired(points, retention, NOW, BERLIN)} == {
        d.point["_id"] for d in decisions if not d.kept
    }


# ------------------------------------------------------------------ preview == sweep


def _random_retention(rng: random.Random) -> dict[str, Any]:
    retention: dict[str, Any] = {}
    if rng.random() < 0.6:
        style = rng.choice(["DAYS", "HOURS", "FILES"])
        retention.update(style=style, period=rng.randint(1, 40 if style == "HOURS" else 12))
    for name in ("daily", "weekly", "monthly", "yearly"):
        if rng.random() < 0.4 or (name == "yearly" and not retention):
            retention[name] = rng.randint(1, 6)
    if rng.random() < 0.3:
        retention["min_good"] = rng.randint(0, 8)
    return retention


async def _ids_of(store: Database, plan_id: str) -> set[str]:
    return {p["_id"] for p in await store.restore_points.find({"plan_id": plan_id}).to_list()}


async def test_the_preview_is_what_the_next_sweep_deletes(
    store: Database, box: SecretBox, s3_settings: S3Settings
) -> None:
    rng = random.Random(20261202)
    clock = ManualClock(_at("2026-10-25T02:30:00+00:00"))  # just after Berlin's clocks went back
    instance_id = uuid.uuid4().hex
    dest = await seed_destination(store, box, instance_id, s3_settings)
    for case in range(8):
        retention = _random_retention(rng)
        plan = {
            "_id": f"plan-{case}-{uuid.uuid4().hex[:6]}",
            "instance_id": instance_id,
            "name": f"plan {case}",
            "retention": retention,
            "timezone": rng.choice([BERLIN, "UTC", "America/New_York"]),
        }
        await store.plans.insert_one(plan)
        for n in range(rng.randint(1, 16)):
            age = timedelta(hours=rng.uniform(0, 24 * 120))
            await store.restore_points.insert_one(
                {
                    "_id": f"{plan['_id']}-{n}",
                    "instance_id": instance_id,
                    "plan_id": plan["_id"],
                    "destination_id": dest["_id"],
                    "created_at": (clock.now() - age).replace(microsecond=0),
                    "retention": retention,
                    "items": [{"name": "orders", "key": f"{plan['_id']}/{n}.dump", "size": 1}],
                    "state": "available",
                    "pinned": rng.random() < 0.1,
                    "locked_until": (
                        clock.now() + timedelta(hours=rng.uniform(-48, 48))
                        if rng.random() < 0.15
                        else None
                    ),
                    "secrets": {},
                }
            )
        decisions = await preview(store, plan, clock.now())
        predicted = {d.point["_id"] for d in decisions if not d.kept}
        before = await _ids_of(store, plan["_id"])
        result = await RetentionSweeper(store, box, clock=clock).sweep_plan(plan["_id"])
        after = await _ids_of(store, plan["_id"])
        assert before - after == predicted, (case, retention)
        assert result.deleted == len(predicted) and result.failed == 0, result
        # a proposed retention previews what the sweep does once it is saved
        proposed = _random_retention(rng)
        decisions = await preview(store, plan, clock.now(), retention=proposed)
        predicted = {d.point["_id"] for d in decisions if not d.kept}
        await store.plans.update_one({"_id": plan["_id"]}, {"$set": {"retention": proposed}})
        await RetentionSweeper(store, box, clock=clock).sweep_plan(plan["_id"])
        left = await _ids_of(store, plan["_id"])
        assert after - left == predicted, (case, proposed)
        await clock.advance(3600 * rng.uniform(1, 200))
