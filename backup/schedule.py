"""Cron arithmetic in a plan's IANA time zone (croniter)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from croniter import CroniterBadCronError, CroniterBadDateError, croniter

from backup.errors import InvalidInput


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


def next_fire_time(frequency: str, timezone: str, after: datetime) -> datetime:
    """The first fire strictly after ``after``, as an aware UTC datetime."""
    local = after.astimezone(zone(timezone))
    nxt = croniter(frequency, local).get_next(datetime)
    return nxt.astimezone(UTC)
