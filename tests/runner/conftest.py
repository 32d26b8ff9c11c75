"""The job runner against a real database (SecantusDB), real S3 (SeaweedFS) and agents: the
Go agent's stand-in in-process (``go_agent.py``) or our agent as a real process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from backup import jobs
from backup.clock import Clock, ManualClock
from backup.database import Database, Document
from backup.runner import JobRunner, RunnerSettings
from backup.secrets import SecretBox
from storage import S3Settings, SwiftSettings
from tests.runner.go_agent import PASSWORD as GO_PASSWORD
from tests.runner.go_agent import USER as GO_USER
from tests.runner.go_agent import GoAgentStandIn
from tests.servers import seed

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def runner_settings(**fields: Any) -> RunnerSettings:
    """RunnerSettings by field name (the environment is not read for these)."""
    defaults = {
        "lease_seconds": 30.0,
        "poll_seconds": 5.0,
        "agent_poll_min_seconds": 1.0,
        "agent_poll_max_seconds": 4.0,
        "agent_unreachable_seconds": 60.0,
        "agent_timeout_seconds": 10.0,
        "job_deadline_seconds": 3600.0,
        "storage_timeout_seconds": 60.0,
    }
    defaults.update(fields)
    aliases = {RunnerSettings.model_fields[k].validation_alias: v for k, v in defaults.items()}
    return RunnerSettings(**aliases)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
async def go_agent() -> AsyncIterator[GoAgentStandIn]:
    agent = await GoAgentStandIn().start()
    yield agent
    await agent.stop()


async def seed_instance(
    store: Database,
    box: SecretBox,
    *,
    agent_url: str,
    username: str = GO_USER,
    password: str = GO_PASSWORD,
    **fields: Any,
) -> Document:
    """An instance whose agent (the Go agent's stand-in, unless told otherwise) is at
    ``agent_url``, its passwords sealed as the OSB provision seals them."""
    return await seed.seed_instance(
        store, box, agent_url=agent_url, username=username, password=password, **fields
    )


async def seed_plan(
    store: Database,
    box: SecretBox,
    instance: Document,
    settings: S3Settings | SwiftSettings,
    *,
    encryption: bool = False,
    **fields: Any,
) -> Document:
    """A plan (daily, keeping three files unless told otherwise) backing up to a new
    destination with ``settings``."""
    dest = await seed.seed_destination(store, box, instance["_id"], settings)
    return await seed.seed_plan(
        store, box, instance, dest["_id"], encryption={"enabled": encryption}, **fields
    )


RunnerFactory = Callable[..., JobRunner]


@pytest.fixture
async def make_runner(
    store: Database, box: SecretBox, clock: ManualClock
) -> AsyncIterator[RunnerFactory]:
    """``make_runner(replica="a", clock=..., **settings)``; all are stopped at teardown."""
    made: list[JobRunner] = []

    def make(
        replica: str = "replica-a", *, clock: Clock | None = clock, **settings: Any
    ) -> JobRunner:
        runner = JobRunner(store, box, runner_settings(**settings), replica_id=replica, clock=clock)
        made.append(runner)
        return runner

    yield make
    for runner in made:
        await runner.stop()


@dataclass
class GoRig:
    """A runner test against the Go agent's stand-in: the database, the secret box, the
    manual clock, the agent, settings for a fresh S3 bucket, and runners made on demand."""

    db: Database
    box: SecretBox
    clock: ManualClock
    agent: GoAgentStandIn
    s3: S3Settings
    make_runner: RunnerFactory

    async def backup(
        self, *, agent_url: str | None = None, password: str = GO_PASSWORD, **plan_fields: Any
    ) -> tuple[Document, Document, Document]:
        """(instance, plan, job): a backup queued for a new instance of the agent (or of
        whatever is at ``agent_url``)."""
        instance = await seed_instance(
            self.db, self.box, agent_url=agent_url or self.agent.url, password=password
        )
        plan = await seed_plan(self.db, self.box, instance, self.s3, **plan_fields)
        return instance, plan, await jobs.start_backup(self.db, plan)

    async def final(self, job_id: str, **kw: Any) -> Document:
        """The job once it has ended, the manual clock moving on meanwhile."""
        return await final(self.db, job_id, self.clock, **kw)

    async def started(self, job: Document, item: int = 0) -> None:
        """Wait until the agent has started the job's ``item``."""
        agent_job_id = f"{job['_id']}-{item}"
        await until(lambda: item_started(self.agent, agent_job_id), clock=self.clock)


@pytest.fixture
def go(
    store: Database,
    box: SecretBox,
    clock: ManualClock,
    go_agent: GoAgentStandIn,
    s3_settings: S3Settings,
    make_runner: RunnerFactory,
) -> GoRig:
    return GoRig(store, box, clock, go_agent, s3_settings, make_runner)


async def until(
    check: Callable[[], Awaitable[Any]],
    *,
    clock: ManualClock | None = None,
    step: float = 1.0,
    timeout: float = 90.0,
    what: str = "condition",
) -> Any:
    """Poll ``check`` until it returns something truthy, moving the manual clock by ``step``
    between polls (real time passes too: agents and the database answer in real time)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        if clock is not None:
            await clock.advance(step)
        await asyncio.sleep(0.02)


async def job_in(store: Database, job_id: str, *statuses: str) -> Document | None:
    doc = await store.jobs.find_one({"_id": job_id})
    return doc if doc is not None and doc["status"] in statuses else None


async def final(
    store: Database, job_id: str, clock: ManualClock | None = None, **kw: Any
) -> Document:
    async def check() -> Document | None:
        return await job_in(store, job_id, *jobs.FINAL)

    return await until(check, clock=clock, what=f"job {job_id} to end", **kw)


async def crash(runner: JobRunner) -> None:
    """What ``kill -9`` leaves: the replica stops at once and releases nothing; its leases
    stay in the database until they expire."""
    tasks = [*runner._loops, *(h.task for h in runner._held.values() if h.task)]
    runner._loops = []
    runner._stopping = True
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    runner._held.clear()
    if runner._session is not None:
        await runner._session.close()


async def item_started(agent: GoAgentStandIn, agent_job_id: str) -> bool:
    return agent.starts[agent_job_id] > 0
