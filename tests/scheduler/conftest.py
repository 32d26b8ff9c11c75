"""The scheduler against the real database (SecantusDB), driven by a manual clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from backup.clock import Clock, ManualClock
from backup.database import Database, Document
from backup.secrets import SecretBox
from scheduler import Scheduler, SchedulerSettings
from storage import S3Settings
from tests.api.conftest import (  # noqa: F401 - fixtures (HTTP tests)
    api,
    destination,
    instance,
    make_api,
    plan,
)
from tests.servers import seed
from tests.servers.cloud_controller import cloud_controller  # noqa: F401
from tests.servers.uaa import uaa  # noqa: F401

START = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)


def scheduler_settings(**fields: Any) -> SchedulerSettings:
    """SchedulerSettings by field name (the environment is not read for these)."""
    defaults: dict[str, Any] = {"poll_seconds": 5.0}
    defaults.update(fields)
    aliases = {SchedulerSettings.model_fields[k].validation_alias: v for k, v in defaults.items()}
    return SchedulerSettings(**aliases)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


class Queued:
    """Counts the database handle's ``jobs_queued`` event (what wakes the runner)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def queued_signal(store: Database) -> Any:
    listener = Queued()
    store.events.jobs_queued.connect(listener)
    yield listener
    store.events.jobs_queued.disconnect(listener)


SchedulerFactory = Callable[..., Scheduler]


@pytest.fixture
async def make_scheduler(store: Database, clock: ManualClock) -> AsyncIterator[SchedulerFactory]:
    """``make_scheduler(replica="a", clock=..., **settings)``; all are stopped at teardown."""
    made: list[Scheduler] = []

    def make(replica: str = "replica-a", *, clock: Clock = clock, **settings: Any) -> Scheduler:
        s = Scheduler(store, scheduler_settings(**settings), replica_id=replica, clock=clock)
        made.append(s)
        return s

    yield make
    for s in made:
        await s.stop()


async def seed_instance(store: Database, box: SecretBox) -> Document:
    """An instance with one S3 destination (``destination_id``), as the OSB provision and
    the API write them; nothing a scheduler test reaches listens at their addresses."""
    doc = await seed.seed_instance(store, box)
    settings = S3Settings(
        endpoint="http://127.0.0.1:9",
        bucket="backups",
        access_key_id="AKIA-sched",
        secret_access_key="s",
    )
    dest = await seed.seed_destination(store, box, doc["_id"], settings, name="primary")
    return doc | {"destination_id": dest["_id"]}


async def seed_plan(
    store: Database, box: SecretBox, *, frequency: str, at: datetime, **fields: Any
) -> tuple[Document, Document]:
    """(instance, plan): a plan of a new instance, created through the domain, its first
    fire computed from ``at`` (the manual clock's now)."""
    owner = await seed_instance(store, box)
    created = await seed.seed_plan(
        store, box, owner, owner["destination_id"], at=at, frequency=frequency, **fields
    )
    return owner, created


async def jobs_of(store: Database, plan_id: str) -> list[Document]:
    return await store.jobs.find({"plan_id": plan_id}).sort([("scheduled_for", 1)]).to_list()
