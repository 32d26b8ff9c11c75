"""The scheduler against the real database (SecantusDB), driven by a manual clock."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from backup import events, plans
from backup.clock import Clock, ManualClock
from backup.secrets import SecretBox, generate_master_key_spec, parse_master_keys
from backup.store import Document, Store, connect
from scheduler import Scheduler, SchedulerSettings
from tests.api.conftest import api, destination, instance  # noqa: F401 - fixtures (HTTP tests)
from tests.servers.cloud_controller import cloud_controller  # noqa: F401
from tests.servers.uaa import uaa  # noqa: F401

START = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)
ITEMS = ["orders", "customers"]


def scheduler_settings(**fields: Any) -> SchedulerSettings:
    """SchedulerSettings by field name (the environment is not read for these)."""
    defaults: dict[str, Any] = {"poll_seconds": 5.0}
    defaults.update(fields)
    aliases = {SchedulerSettings.model_fields[k].validation_alias: v for k, v in defaults.items()}
    return SchedulerSettings(**aliases)  # type: ignore[arg-type]


@pytest.fixture
async def store(mongo_url: str) -> AsyncIterator[Store]:
    s = connect(mongo_url, f"sched_{uuid.uuid4().hex[:12]}")
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


class Queued:
    """Counts ``events.jobs_queued`` (what wakes the runner)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def queued_signal() -> Any:
    listener = Queued()
    events.jobs_queued.connect(listener)
    yield listener
    events.jobs_queued.disconnect(listener)


SchedulerFactory = Callable[..., Scheduler]


@pytest.fixture
async def make_scheduler(store: Store, clock: ManualClock) -> AsyncIterator[SchedulerFactory]:
    """``make_scheduler(replica="a", clock=..., **settings)``; all are stopped at teardown."""
    made: list[Scheduler] = []

    def make(replica: str = "replica-a", *, clock: Clock = clock, **settings: Any) -> Scheduler:
        s = Scheduler(store, scheduler_settings(**settings), replica_id=replica, clock=clock)
        made.append(s)
        return s

    yield make
    for s in made:
        await s.stop()


async def seed_instance(store: Store, *, items: list[str] = ITEMS) -> Document:
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
        "agent": {"url": "http://127.0.0.1:1", "username": "agent"},
        "database": {"host": "127.0.0.1", "port": 5432, "username": "u", "parameters": {}},
        "items": list(items),
        "secrets": {},
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
    dest = {
        "_id": uuid.uuid4().hex,
        "instance_id": instance_id,
        "name": "primary",
        "type": "S3",
        "endpoint": "127.0.0.1:9",
        "bucket": "backups",
        "secrets": {},
        "created_at": at,
        "updated_at": at,
        "version": 1,
        "schema_version": 1,
    }
    await store.destinations.insert_one(dest)
    doc["destination_id"] = dest["_id"]
    return doc


async def seed_plan(
    store: Store,
    box: SecretBox,
    instance: Document,  # noqa: F811 - a document here, not the HTTP fixture
    *,
    frequency: str,
    timezone: str = "UTC",
    at: datetime,
    paused: bool = False,
    name: str | None = None,
) -> Document:
    """A plan created through the domain, scheduled from ``at`` (the manual clock's now)."""
    spec = plans.PlanSpec.model_validate(
        {
            "name": name or f"plan-{uuid.uuid4().hex[:8]}",
            "destination_id": instance["destination_id"],
            "frequency": frequency,
            "timezone": timezone,
            "retention": {"style": "FILES", "period": 3},
            "paused": paused,
        }
    )
    return await plans.create(store, box, instance, spec, 0, schedule_from=at)


async def jobs_of(store: Store, plan_id: str) -> list[Document]:
    return await store.jobs.find({"plan_id": plan_id}).sort([("scheduled_for", 1)]).to_list()
