"""Cron arithmetic in a plan's IANA time zone (croniter), with the daylight-saving rules a
user of cron expects.

A plan's frequency is read as wall-clock time in its zone. Two moments a year that wall clock
misbehaves, and the rules here (those of Vixie cron, which DBAs know):

- **Spring forward** (02:00 -> 03:00 in Europe/Berlin): a fire whose wall time does not exist
  that day runs once, at the first instant after the gap (a 02:30 plan fires at 03:00 local).
  A schedule whose hour field is a wildcard (``30 * * * *``, ``*/20 * * * *``) simply has no
  fire in the missing hour. croniter already does both.
- **Fall back** (03:00 -> 02:00): a wall time that happens twice fires once, in its first pass,
  when the hour field names hours (``30 2 * * *``, ``*/15 2 * * *``); croniter would fire it in
  both passes, so :func:`next_fire_time` skips the second. A schedule whose hour field is a
  wildcard runs by elapsed time and fires in both passes (an hourly plan still fires every
  real hour).

Every time returned is an aware UTC datetime; the database stores UTC only.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from croniter import CroniterBadCronError, CroniterBadDateError, croniter

from backup.errors import InvalidInput

# Enough to step over any repeated hour (every minute of it, twice over) and then some.
_MAX_SKIPS = 256


def zone(name: str) -> ZoneInfo:
    if name not in _ZONES:
        raise InvalidInput(
            f"{name!r} is not an IANA time zone name (for example 'Europe/Berlin' or 'UTC').",
            code="invalid_timezone",
            field="timezone",
        )
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:  # pragma: no cover - listed but broken
        raise InvalidInput(f"time zone {name!r} cannot be loaded", field="timezone") from exc


_ZONES = available_timezones() | {"UTC"}


def validate_frequency(frequency: str, min_interval_seconds: int = 0) -> None:
    """A five-field cron expression whose fires are at least ``min_interval_seconds`` apart."""
    if len(frequency.split()) != 5:
        raise InvalidInput(
            f"frequency {frequency!r} must be a cron expression of five fields "
            "(minute hour day-of-month month day-of-week), for example '0 3 * * *'.",
            code="invalid_frequency",
            field="frequency",
        )
    try:
        it = croniter(frequency, datetime(2026, 1, 1, tzinfo=UTC))
        fires = [it.get_next(datetime) for _ in range(50)]
    except (CroniterBadCronError, CroniterBadDateError, ValueError, KeyError) as exc:
        raise InvalidInput(
            f"frequency {frequency!r} is not a valid cron expression: {exc}.",
            code="invalid_frequency",
            field="frequency",
        ) from None
    if min_interval_seconds:
        gap = min(b - a for a, b in itertools.pairwise(fires))
        if gap < timedelta(seconds=min_interval_seconds):
            raise InvalidInput(
                f"frequency {frequency!r} fires every {int(gap.total_seconds())} s; "
                f"the minimum interval is {min_interval_seconds} s.",
                code="frequency_too_frequent",
                field="frequency",
            )


def _fixed_hour(frequency: str) -> bool:
    """Whether the hour field names hours (``2``, ``1-3``, ``2,14``) rather than every hour
    (``*``, ``*/2``)."""
    fields = frequency.split()
    return len(fields) > 1 and not fields[1].startswith("*")


def _second_pass(at: datetime, tz: ZoneInfo) -> bool:
    """Whether ``at`` falls in the second pass of a wall time that happens twice (the hour
    repeated when the clocks go back)."""
    local = at.astimezone(tz)
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


def next_fire_time(frequency: str, timezone: str, after: datetime) -> datetime:
    """The first fire strictly after ``after``, as an aware UTC datetime (DST rules above)."""
    tz = zone(timezone)
    skip_repeats = _fixed_hour(frequency)
    at = after
    for _ in range(_MAX_SKIPS):
        nxt = croniter(frequency, at.astimezone(tz)).get_next(datetime).astimezone(UTC)
        if not (skip_repeats and _second_pass(nxt, tz)):
            return nxt
        at = nxt
    raise InvalidInput(  # pragma: no cover - would need a zone repeating hundreds of fires
        f"frequency {frequency!r} has no fire after {after.isoformat()} in {timezone}.",
        code="invalid_frequency",
        field="frequency",
    )


def fires_between(
    frequency: str, timezone: str, start: datetime, end: datetime, *, limit: int
) -> tuple[list[datetime], bool]:
    """The fires ``start <= t <= end`` in order, at most ``limit`` of them, and whether there
    were more (the list is then cut short)."""
    out: list[datetime] = []
    at = start - timedelta(microseconds=1)
    while True:
        at = next_fire_time(frequency, timezone, at)
        if at > end:
            return out, False
        if len(out) >= limit:
            return out, True
        out.append(at)


def last_fire_at_or_before(
    frequency: str, timezone: str, at: datetime, *, not_before: datetime
) -> datetime | None:
    """The latest fire ``not_before <= t <= at`` (None if there is none), found by walking
    forward from ever earlier starting points, so that it obeys the same DST rules as
    :func:`next_fire_time` (croniter's backward stepping does not)."""
    window = timedelta(hours=1)
    while True:
        start = max(not_before, at - window)
        fires, more = fires_between(frequency, timezone, start, at, limit=10_000)
        while more:  # a dense schedule over a long window: keep walking from the last one
            fires, more = fires_between(frequency, timezone, fires[-1], at, limit=10_000)
        if fires:
            return fires[-1]
        if start == not_before:
            return None
        window *= 4
