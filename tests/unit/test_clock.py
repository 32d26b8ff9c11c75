"""The manual clock wakes sleepers in deadline order and only when time reaches them."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from backup.clock import ManualClock, SystemClock, settle


async def test_sleepers_wake_in_deadline_order_only_when_due() -> None:
    clock = ManualClock(datetime(2026, 3, 1, tzinfo=UTC))
    woke: list[tuple[str, datetime]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.now()))

    tasks = [asyncio.create_task(sleeper("late", 10)), asyncio.create_task(sleeper("early", 5))]
    await settle()
    assert clock.sleepers == 2
    await clock.advance(4)
    assert woke == []
    await clock.advance(7)
    start = datetime(2026, 3, 1, tzinfo=UTC)
    assert woke == [
        ("early", start + timedelta(seconds=5)),
        ("late", start + timedelta(seconds=10)),
    ]
    assert clock.now() == start + timedelta(seconds=11)
    await asyncio.gather(*tasks)


async def test_wait_returns_on_event_or_timeout() -> None:
    clock = ManualClock()
    event = asyncio.Event()
    waiting = asyncio.create_task(clock.wait(event, 60))
    await settle()
    event.set()
    assert await waiting is True

    event.clear()
    waiting = asyncio.create_task(clock.wait(event, 60))
    await settle()
    await clock.advance(59)
    assert not waiting.done()
    await clock.advance(1)
    assert await waiting is False
    assert clock.sleepers == 0


async def test_system_clock_wait_times_out() -> None:
    assert await SystemClock().wait(asyncio.Event(), 0.01) is False
    assert SystemClock().now().tzinfo is UTC
