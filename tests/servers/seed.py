"""Instances, destinations and plans as the OSB provision and the backup-manager API write
them (docs/data-model.md), put straight into the store: for tests of what reads them (the
API, the scheduler, the runner) that need not go through the broker to get them.

A pytest plugin (``tests/conftest.py``) for its fixtures: ``store``, a fresh database on the
session's server, and ``box``, a secret box with keys of its own."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest

from backup import destinations, plans
from backup.database import Database, Document, connect
from backup.pagination import now
from backup.secrets import SecretBox, generate_master_key_spec, parse_master_keys
from storage import S3Settings, SwiftSettings

ITEMS = ["orders", "customers"]
# Fixed secrets: the log audit knows them (tests/servers/log_audit.py).
DB_PASSWORD = "db-PASSWORD-31337"
AGENT_USER, AGENT_PASSWORD = "agent", "agent-PASSWORD-2718"
NO_AGENT = "http://127.0.0.1:1"
"""Where nothing listens: the agent of an instance whose agent the test never calls."""


async def seed_instance(
    store: Database,
    box: SecretBox | None = None,
    *,
    instance_id: str | None = None,
    state: str = "ready",
    agent_url: str = NO_AGENT,
    username: str = AGENT_USER,
    password: str = AGENT_PASSWORD,
    items: list[str] = ITEMS,
    port: int | None = 5432,
) -> Document:
    """An instance as the OSB provision writes it. With ``box``, the agent's ``password`` and
    :data:`DB_PASSWORD` are sealed as the provision seals them; without, the instance has no
    secrets (enough for tests that never reach its agent)."""
    instance_id = instance_id or str(uuid.uuid4())
    secrets: dict[str, Any] = {}
    if box is not None:
        secrets = box.seal_map(
            {"agent_password": password, "database_password": DB_PASSWORD},
            f"instances/{instance_id}",
        )
    at = now()
    doc = {
        "_id": instance_id,
        "service_id": "backup-service",
        "plan_id": "standard",
        "context": {"platform": "cloudfoundry", "organization_guid": "org", "space_guid": "space"},
        "organization_guid": "org",
        "space_guid": "space",
        "maintenance_info": None,
        "parameters": {},
        "agent": {"url": agent_url, "username": username},
        "database": {"host": "127.0.0.1", "port": port, "username": "dbuser", "parameters": {}},
        "items": list(items),
        "secrets": secrets,
        "delete_backups_on_deprovision": False,
        "state": state,
        "last_operation": None,
        "tombstone_expires_at": None,
        "created_at": at,
        "updated_at": at,
        "version": 1,
        "schema_version": 1,
    }
    await store.instances.insert_one(doc)
    return doc


@pytest.fixture
async def store(mongo_url: str) -> AsyncIterator[Database]:
    """A database of this test's own with the product's indexes, dropped at teardown."""
    s = connect(mongo_url, f"t_{uuid.uuid4().hex[:12]}")
    await s.ensure_indexes()
    yield s
    await s.client.drop_database(s.mongo.name)
    await s.close()


@pytest.fixture
def box() -> SecretBox:
    return SecretBox(parse_master_keys(generate_master_key_spec()))


def destination_body(settings: S3Settings | SwiftSettings, **over: Any) -> dict[str, Any]:
    """What a user sends to create (or validate) a destination with ``settings``: its public
    settings and its secret, named after its type unless ``over`` says otherwise; fields that
    are None are left out, so that the API's defaults apply."""
    body = {
        "name": settings.type.lower(),
        **destinations.public_settings(settings),
        **destinations.sealed_secret(settings),
        **over,
    }
    return {k: v for k, v in body.items() if v is not None}


async def seed_destination(
    store: Database,
    box: SecretBox,
    instance_id: str,
    settings: S3Settings | SwiftSettings,
    *,
    name: str | None = None,
) -> Document:
    """A destination as the API writes it: the public settings at top level, the secret
    sealed under ``destinations/<id>``."""
    dest_id = uuid.uuid4().hex
    at = now()
    doc = {
        "_id": dest_id,
        "instance_id": instance_id,
        "name": name or f"dest-{dest_id[:6]}",
        **destinations.public_settings(settings),
        "secrets": box.seal_map(destinations.sealed_secret(settings), f"destinations/{dest_id}"),
        "created_at": at,
        "updated_at": at,
        "version": 1,
        "schema_version": 1,
    }
    await store.destinations.insert_one(doc)
    return doc


async def seed_plan(
    store: Database,
    box: SecretBox,
    instance: Document,
    destination_id: str,
    *,
    at: datetime | None = None,
    **fields: Any,
) -> Document:
    """A plan created through the domain, as the API creates it, its first fire computed
    from ``at`` (default: now). ``fields`` are the plan's as a user sends them; unless given,
    a daily backup at 03:00 UTC of every item, keeping three."""
    spec = plans.PlanSpec.model_validate(
        {
            "name": f"plan-{uuid.uuid4().hex[:8]}",
            "destination_id": destination_id,
            "frequency": "0 3 * * *",
            "retention": {"style": "FILES", "period": 3},
            **fields,
        }
    )
    return await plans.create(store, box, instance, spec, 0, schedule_from=at)
