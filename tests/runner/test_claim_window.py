"""The runner's claim window (backup.backpressure.ClaimWindow): additive increase while full and
no scheduler is behind, multiplicative decrease each time one is."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from backup import backpressure
from backup.backpressure import ClaimWindow
from backup.runner import JobRunner
from tests.runner.conftest import GoRig, until

T0 = datetime(2026, 3, 1, 4, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_a_window_starts_small_and_opens_only_while_full() -> None:
    window = ClaimWindow(50)
    assert window.jobs == backpressure.START_JOBS
    window.filled()
    window.open(at(0))  # the first call only starts the clock
    assert window.jobs == backpressure.START_JOBS
    window.filled()
    window.open(at(3))
    assert window.jobs == backpressure.START_JOBS + 3 * backpressure.GROWTH_PER_SECOND
    window.open(at(60))  # idle for a minute: it showed nothing, so no growth
    window.filled()
    window.open(at(61.5))
    assert window.jobs == int(backpressure.START_JOBS + 4.5 * backpressure.GROWTH_PER_SECOND)
    window.filled()
    window.open(at(3600))
    assert window.jobs == 50  # never beyond RUNNER_CONCURRENCY


def test_a_window_halves_when_the_scheduler_is_behind_down_to_one_job() -> None:
    window = ClaimWindow(50, start=40)
    window.halve(at(0))
    assert window.jobs == 20
    window.filled()
    window.open(at(2))  # grows from the halving on, not from before it
    assert window.jobs == 22
    for i in range(10):
        window.halve(at(3 + i))
    assert window.jobs == 1
    window.filled()
    window.open(at(20))  # 8 s after the last halving
    assert window.jobs == 1 + 8 * backpressure.GROWTH_PER_SECOND


def test_a_small_concurrency_is_not_slowed() -> None:
    assert ClaimWindow(2).jobs == 2
    assert ClaimWindow(backpressure.START_JOBS).jobs == backpressure.START_JOBS
    assert ClaimWindow(1, start=10).jobs == 1


async def test_a_runner_claims_within_its_window_and_halves_it_for_the_scheduler(
    go: GoRig,
) -> None:
    go.agent.hold()
    ids = [(await go.backup())[2]["_id"] for _ in range(backpressure.START_JOBS + 3)]
    runner = go.make_runner("replica-a", concurrency=20, poll_seconds=1)

    async def running() -> int:
        return await go.db.jobs.count_documents({"_id": {"$in": ids}, "status": "RUNNING"})

    await runner.start()
    await until(lambda: _at_least(running, backpressure.START_JOBS), what="the first claims")
    await asyncio.sleep(0.3)
    assert await running() == backpressure.START_JOBS  # not all seven at once
    # the window was full: it opens by a job a second, the runner's polls claim the rest
    await until(
        lambda: _at_least(running, len(ids)), clock=go.clock, step=1, what="the window opening"
    )
    assert runner.window.jobs >= len(ids)

    before = runner.window.jobs
    await backpressure.announce_behind(go.db, at=go.clock.now(), replica="leader")
    await until(lambda: _smaller(runner, before), clock=go.clock, step=0.5, what="the halving")
    assert runner.window.jobs == before // 2
    go.agent.let_go()


async def _at_least(count: Callable[[], Awaitable[int]], n: int) -> bool:
    return await count() >= n


async def _smaller(runner: JobRunner, size: int) -> bool:
    return runner.window.jobs < size
