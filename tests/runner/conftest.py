"""The job runner against a real database (SecantusDB), real S3 (SeaweedFS) and agents: the
Go agent's stand-in in-process (``go_agent.py``) or our agent as a real process."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from backup import destinations, jobs, plans
from backup.clock import Clock, ManualClock
from backup.runner import JobRunner, RunnerSettings
from backup.secrets import SecretBox, generate_master_key_spec, parse_master_keys
from backup.store import Document, Store, connect
from storage import S3Settings, SwiftSettings
from tests.runner.go_agent import PASSWORD as GO_PASSWORD
from tests.runner.go_agent import USER as GO_USER
from tests.runner.go_agent import GoAgentStandIn

ITEMS = ["orders", "customers"]
DB_PASSWORD = "db-PASSWORD-31337"
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
async def store(mongo_url: str) -> AsyncIterator[Store]:
    s = connect(mongo_url, f"runner_{uuid.uuid4().hex[:12]}")
    await s.ensure_indexes()
    yield s
    await s.client.drop_database(s.db.name)
    await s.close()


@pytest.fixture
def box() -> SecretBox:
    return SecretBox(parse_master_keys(generate_master_key_spec()))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
async def go_agent() -> AsyncIterator[GoAgentStandIn]:
    agent = await GoAgentStandIn().start()
    yield agent
    await agent.stop()


async def seed_instance(
    store: Store,
    box: SecretBox,
    *,
    agent_url: str,
    username: str = GO_USER,
    password: str = GO_PASSWORD,
    items: list[str] = ITEMS,
    port: int | None = 5432,
) -> Document:
    """An instance document as the OSB provision writes it (docs/data-model.md)."""
    instance_id = str(uuid.uuid4())
    at = datetime.now(UTC)
    doc = {
        "_id": instance_id,
        "service_id": "backup-service",
        "plan_id": "standard",
        "context": {"platform": "cloudfoundry"},
        "organization_guid": "org",
        "space_guid": "space",
        "maintenance_info": None,
        "parameters": {},
        "agent": {"url": agent_url, "username": username},
        "database": {"host": "127.0.0.1", "port": port, "username": "dbuser", "parameters": {}},
        "items": list(items),
        "secrets": box.seal_map(
            {"agent_password": password, "database_password": DB_PASSWORD},
            f"instances/{instance_id}",
        ),
        "delete_backups_on_deprovision": False,
        "state": "ready",
        "last_operation": None,
        "tombstone_expires_at": None,
        "created_at": at,
        "updated_at": at,
        "version": 1,
        "schema_version": 1,
    }
    await store.instances.insert_one(doc)
    return doc


async def seed_destination(
    store: Store, box: SecretBox, instance_id: str, settings: S3Settings | SwiftSettings
) -> Document:
    """A destination document as docs/data-model.md describes it (public settings at top
    level, the secret sealed under ``destinations/<id>``)."""
    dest_id = uuid.uuid4().hex
    secret = destinations.SECRET_FIELD[settings.type]
    at = datetime.now(UTC)
    doc = {
        "_id": dest_id,
        "instance_id": instance_id,
        "name": f"dest-{dest_id[:6]}",
        **destinations.public_settings(settings),
        "secrets": box.seal_map(
            {secret: getattr(settings, secret).get_secret_value()}, f"destinations/{dest_id}"
        ),
        "created_at": at,
        "updated_at": at,
        "version": 1,
        "schema_version": 1,
    }
    await store.destinations.insert_one(doc)
    return doc


async def seed_plan(
    store: Store,
    box: SecretBox,
    instance: Document,
    s3: S3Settings | SwiftSettings,
    *,
    retention: dict[str, Any] | None = None,
    encryption: bool = False,
    compression: bool = True,
    items: list[str] | None = None,
) -> Document:
    dest = await seed_destination(store, box, instance["_id"], s3)
    spec = plans.PlanSpec.model_validate(
        {
            "name": f"nightly-{uuid.uuid4().hex[:6]}",
            "destination_id": dest["_id"],
            "frequency": "0 3 * * *",
            "timezone": "UTC",
            "items": items,
            "retention": retention or {"style": "FILES", "period": 3},
            "compression": compression,
            "encryption": {"enabled": encryption},
        }
    )
    return await plans.create(store, box, instance, spec, 0)


RunnerFactory = Callable[..., JobRunner]


@pytest.fixture
async def make_runner(
    store: Store, box: SecretBox, clock: ManualClock
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


async def job_in(store: Store, job_id: str, *statuses: str) -> Document | None:
    doc = await store.jobs.find_one({"_id": job_id})
    return doc if doc is not None and doc["status"] in statuses else None


async def final(store: Store, job_id: str, clock: ManualClock | None = None, **kw: Any) -> Document:
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
