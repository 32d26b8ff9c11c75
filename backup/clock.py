"""Time as the scheduler and the job runner see it: the system clock in production, a manual
clock in tests so that cron, time zones, DST, leases, deadlines and retention can be checked
without waiting.

Loops never call ``asyncio.sleep`` or ``datetime.now`` directly; they ask their clock, so a test
can move time forward and every sleeper whose deadline has passed wakes at once.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, aware, in UTC."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...

    async def wait(self, event: asyncio.Event, timeout: float | None) -> bool:
        """Wait until ``event`` is set (True) or ``timeout`` seconds of this clock's time pass
        (False). ``None`` waits for the event only."""
        ...


class SystemClock:
    """Wall-clock time for ``now`` and the event loop's monotonic clock for waiting."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def wait(self, event: asyncio.Event, timeout: float | None) -> bool:
        if event.is_set():
            return True
        try:
            await asyncio.wait_for(event.wait(), None if timeout is None else max(0.0, timeout))
        except TimeoutError:
            return event.is_set()
        return True


class ManualClock:
    """A clock that moves only when told to. ``advance`` wakes every sleeper whose deadline
    has been reached, in deadline order, and lets them run before returning."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        if self._now.tzinfo is None:
            raise ValueError("ManualClock needs an aware start time")
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> datetime:
        return self._now

    def _deadline_future(self, seconds: float) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        deadline = self._now + timedelta(seconds=max(0.0, seconds))
        if deadline <= self._now:
            fut.set_result(None)
        else:
            heapq.heappush(self._sleepers, (deadline, next(self._seq), fut))
        return fut

    async def sleep(self, seconds: float) -> None:
        await self._deadline_future(seconds)

    async def wait(self, event: asyncio.Event, timeout: float | None) -> bool:
        if event.is_set():
            return True
        waiter = asyncio.ensure_future(event.wait())
        timer = self._deadline_future(timeout) if timeout is not None else None
        try:
            pending = {waiter} | ({timer} if timer is not None else set())
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if timer is not None and not timer.done():
                timer.cancel()
        return event.is_set()

    @property
    def sleepers(self) -> int:
        """How many waits are pending (cancelled ones excluded)."""
        return sum(1 for _, _, fut in self._sleepers if not fut.done())

    async def advance(self, seconds: float = 0.0, *, to: datetime | None = None) -> None:
        """Move time forward by ``seconds`` (or to ``to``), waking due sleepers one deadline at
        a time so that work scheduled in between happens in order."""
        target = to if to is not None else self._now + timedelta(seconds=seconds)
        if target < self._now:
            raise ValueError("a clock does not go backwards")
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            if not fut.done():
                fut.set_result(None)
                await settle()
        self._now = target
        await settle()


async def settle(rounds: int = 20) -> None:
    """Let ready tasks run: a few passes of the event loop with no real waiting."""
    for _ in range(rounds):
        await asyncio.sleep(0)
