"""Cron arithmetic in a plan's time zone: daylight-saving days, strictness, ranges."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from backup import schedule
from backup.errors import InvalidInput

BERLIN, NEW_YORK = "Europe/Berlin", "America/New_York"


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def fires(frequency: str, tz: str, start: datetime, end: datetime) -> list[datetime]:
    out, at = [], start
    while True:
        at = schedule.next_fire_time(frequency, tz, at)
        if at > end:
            return out
        out.append(at)


def local_dates(times: list[datetime], tz: str) -> Counter[date]:
    return Counter(t.astimezone(ZoneInfo(tz)).date() for t in times)


def test_next_fire_is_utc_strictly_after_and_in_the_plan_zone() -> None:
    at = schedule.next_fire_time("0 3 * * *", BERLIN, utc(2026, 1, 10, 1, 0))
    assert at == utc(2026, 1, 10, 2, 0) and at.tzinfo is UTC  # 03:00 CET
    assert schedule.next_fire_time("0 3 * * *", BERLIN, at) == utc(2026, 1, 11, 2, 0)
    assert schedule.next_fire_time("0 3 * * *", "UTC", utc(2026, 7, 1, 3, 0)) == utc(
        2026, 7, 2, 3, 0
    )
    summer = schedule.next_fire_time("0 3 * * *", BERLIN, utc(2026, 7, 1))
    assert summer == utc(2026, 7, 1, 1, 0)  # 03:00 CEST


def test_a_time_skipped_by_spring_forward_fires_once_right_after_the_gap() -> None:
    # Europe/Berlin 2026-03-29: 02:00 CET -> 03:00 CEST; 02:30 does not exist that day
    got = fires("30 2 * * *", BERLIN, utc(2026, 3, 27), utc(2026, 3, 31))
    assert got == [
        utc(2026, 3, 27, 1, 30),
        utc(2026, 3, 28, 1, 30),
        utc(2026, 3, 29, 1, 0),  # 03:00 CEST, once
        utc(2026, 3, 30, 0, 30),
    ]
    # America/New_York 2026-03-08: 02:00 EST -> 03:00 EDT
    got = fires("30 2 * * *", NEW_YORK, utc(2026, 3, 7, 12), utc(2026, 3, 9, 12))
    assert got == [utc(2026, 3, 8, 7, 0), utc(2026, 3, 9, 6, 30)]


def test_a_time_repeated_by_fall_back_fires_once_in_its_first_pass() -> None:
    # Europe/Berlin 2026-10-25: 03:00 CEST -> 02:00 CET; 02:30 happens twice
    got = fires("30 2 * * *", BERLIN, utc(2026, 10, 23), utc(2026, 10, 27))
    assert got == [
        utc(2026, 10, 23, 0, 30),
        utc(2026, 10, 24, 0, 30),
        utc(2026, 10, 25, 0, 30),  # 02:30 CEST; not again at 02:30 CET (01:30 UTC)
        utc(2026, 10, 26, 1, 30),
    ]
    # America/New_York 2026-11-01: 02:00 EDT -> 01:00 EST; 01:30 happens twice
    got = fires("30 1 * * *", NEW_YORK, utc(2026, 10, 31, 12), utc(2026, 11, 2, 12))
    assert got == [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]


def test_next_fire_from_inside_the_repeated_hour_skips_the_second_pass() -> None:
    # the scheduler asks "what after 02:30 CEST" and also "what after 02:10 CET"
    assert schedule.next_fire_time("30 2 * * *", BERLIN, utc(2026, 10, 25, 0, 30)) == utc(
        2026, 10, 26, 1, 30
    )
    assert schedule.next_fire_time("30 2 * * *", BERLIN, utc(2026, 10, 25, 1, 10)) == utc(
        2026, 10, 26, 1, 30
    )


def test_a_fixed_hour_with_several_minutes_keeps_its_first_pass_only() -> None:
    day = fires("*/15 2 * * *", BERLIN, utc(2026, 10, 24, 12), utc(2026, 10, 25, 12))
    assert day == [utc(2026, 10, 25, 0, m) for m in (0, 15, 30, 45)]
    spring = fires("*/15 2 * * *", BERLIN, utc(2026, 3, 28, 12), utc(2026, 3, 29, 12))
    assert spring == [utc(2026, 3, 29, 1, 0)]  # the whole hour is missing: one fire


def test_wildcard_hours_fire_by_elapsed_time_through_both_changes() -> None:
    # hourly: every real hour, 23 fires on the short day and 25 on the long one
    spring = fires("0 * * * *", BERLIN, utc(2026, 3, 28, 22, 59), utc(2026, 3, 29, 21, 59))
    assert len(spring) == 23 and all(
        b - a == timedelta(hours=1) for a, b in itertools.pairwise(spring)
    )
    autumn = fires("0 * * * *", BERLIN, utc(2026, 10, 24, 21, 59), utc(2026, 10, 25, 22, 59))
    assert len(autumn) == 25 and all(
        b - a == timedelta(hours=1) for a, b in itertools.pairwise(autumn)
    )
    half = fires("30 * * * *", BERLIN, utc(2026, 3, 29, 0, 0), utc(2026, 3, 29, 2, 0))
    assert half == [utc(2026, 3, 29, 0, 30), utc(2026, 3, 29, 1, 30)]  # 01:30 CET, 03:30 CEST


@pytest.mark.parametrize(
    ("tz", "start"),
    [
        (BERLIN, utc(2026, 3, 26)),
        (BERLIN, utc(2026, 10, 22)),
        (NEW_YORK, utc(2026, 3, 5)),
        (NEW_YORK, utc(2026, 10, 29)),
        ("Australia/Sydney", utc(2026, 4, 2)),  # southern hemisphere: April is fall-back
        ("Australia/Sydney", utc(2026, 10, 1)),
        ("Australia/Lord_Howe", utc(2026, 4, 2)),  # a 30-minute shift
        ("Australia/Lord_Howe", utc(2026, 10, 1)),
    ],
)
def test_a_daily_plan_fires_exactly_once_every_local_day_around_each_change(
    tz: str, start: datetime
) -> None:
    end = start + timedelta(days=6)
    for hour in range(4):
        for minute in (0, 15, 30, 59):
            got = fires(f"{minute} {hour} * * *", tz, start, end)
            per_day = local_dates(got, tz)
            inner = [d for d in per_day if start.date() < d < end.date() - timedelta(days=1)]
            assert inner and all(per_day[d] == 1 for d in inner), (hour, minute, per_day)


def test_fires_between_is_inclusive_and_bounded() -> None:
    got, more = schedule.fires_between(
        "*/10 * * * *", "UTC", utc(2026, 1, 1, 0, 0), utc(2026, 1, 1, 1, 0), limit=100
    )
    assert got[0] == utc(2026, 1, 1, 0, 0) and got[-1] == utc(2026, 1, 1, 1, 0)
    assert len(got) == 7 and not more
    got, more = schedule.fires_between(
        "* * * * *", "UTC", utc(2026, 1, 1), utc(2026, 1, 8), limit=1000
    )
    assert len(got) == 1000 and more


def test_last_fire_at_or_before_obeys_the_same_dst_rules() -> None:
    # after both passes of 02:30 on the fall-back day, the last fire is the first pass
    last = schedule.last_fire_at_or_before(
        "30 2 * * *", BERLIN, utc(2026, 10, 25, 2, 0), not_before=utc(2026, 10, 1)
    )
    assert last == utc(2026, 10, 25, 0, 30)
    assert schedule.last_fire_at_or_before(
        "30 2 * * *", BERLIN, utc(2026, 10, 25, 0, 30), not_before=utc(2026, 10, 1)
    ) == utc(2026, 10, 25, 0, 30)  # inclusive
    # a yearly plan, many windows back; and none within the bound
    yearly = schedule.last_fire_at_or_before(
        "0 0 1 1 *", "UTC", utc(2026, 12, 31), not_before=utc(2020, 1, 1)
    )
    assert yearly == utc(2026, 1, 1)
    assert (
        schedule.last_fire_at_or_before(
            "0 0 1 1 *", "UTC", utc(2026, 12, 31), not_before=utc(2026, 1, 2)
        )
        is None
    )
    # dense: a week of minutes
    dense = schedule.last_fire_at_or_before(
        "* * * * *", "UTC", utc(2026, 1, 8, 0, 0, 30), not_before=utc(2026, 1, 1)
    )
    assert dense == utc(2026, 1, 8, 0, 0)


@pytest.mark.parametrize(
    ("frequency", "code"),
    [
        ("0 3 * *", "invalid_frequency"),
        ("0 3 * * * *", "invalid_frequency"),
        ("61 3 * * *", "invalid_frequency"),
        ("0 3 31 2 *", "invalid_frequency"),
        ("*/5 * * * *", "frequency_too_frequent"),
    ],
)
def test_bad_frequencies_are_refused_with_a_stable_code(frequency: str, code: str) -> None:
    with pytest.raises(InvalidInput) as err:
        schedule.validate_frequency(frequency, 3600)
    assert err.value.code == code and err.value.field == "frequency"


def test_an_unknown_zone_is_refused() -> None:
    with pytest.raises(InvalidInput) as err:
        schedule.next_fire_time("0 3 * * *", "Mars/Olympus_Mons", utc(2026, 1, 1))
    assert err.value.code == "invalid_timezone"
