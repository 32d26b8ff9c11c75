"""MongoDB persistence: the one store, reached through PyMongo's native async API.

Collections and their indexes are declared here, in one place, and created idempotently at
start-up. Every document carries ``schema_version``. Writes are acknowledged by the majority
(journaled) so that an acknowledged registration, job or restore point survives a fail-over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog
from pydantic import SecretStr
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern

from backup.events import Events

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1

Document = dict[str, Any]

# collection name -> indexes; each module's queries are served by an index declared here.
INDEXES: dict[str, list[IndexModel]] = {
    "instances": [
        # the OSB sweep: expired tombstones, and operations whose replica stopped renewing
        IndexModel([("state", ASCENDING), ("tombstone_expires_at", ASCENDING)]),
        IndexModel(
            [("last_operation.state", ASCENDING), ("last_operation.lease_expires_at", ASCENDING)]
        ),
    ],
    "bindings": [
        IndexModel([("instance_id", ASCENDING)]),
        IndexModel([("key_hash", ASCENDING)], unique=True, sparse=True),
    ],
    "destinations": [
        IndexModel([("instance_id", ASCENDING), ("created_at", ASCENDING)]),
        IndexModel([("instance_id", ASCENDING), ("name", ASCENDING)], unique=True),
    ],
    "plans": [
        IndexModel([("instance_id", ASCENDING), ("name", ASCENDING)], unique=True),
        # an instance's plans newest first, a page at a time (GET /plans)
        IndexModel([("instance_id", ASCENDING), ("created_at", DESCENDING), ("_id", DESCENDING)]),
        IndexModel([("destination_id", ASCENDING)]),
        IndexModel([("paused", ASCENDING), ("next_run_at", ASCENDING)]),
        IndexModel([("drill_next_run_at", ASCENDING)], sparse=True),  # drill fires (drill.py)
    ],
    "jobs": [
        IndexModel([("instance_id", ASCENDING), ("created_at", DESCENDING), ("_id", DESCENDING)]),
        # an instance's jobs of one status (GET /jobs?status=FAILED), newest first
        IndexModel(
            [
                ("instance_id", ASCENDING),
                ("status", ASCENDING),
                ("created_at", DESCENDING),
                ("_id", DESCENDING),
            ]
        ),
        IndexModel(
            [("plan_id", ASCENDING), ("scheduled_for", ASCENDING)],
            unique=True,
            partialFilterExpression={"scheduled_for": {"$type": "date"}},
            name="one_job_per_fire",
        ),
        IndexModel([("status", ASCENDING), ("lease_expires_at", ASCENDING)]),
        # The runner: queued jobs oldest first; at most one RUNNING job per instance (the
        # database refuses a second claim, whatever the number of replicas); failed jobs
        # whose uploaded files still wait to be deleted.
        IndexModel([("status", ASCENDING), ("created_at", ASCENDING)]),
        IndexModel(
            [("instance_id", ASCENDING)],
            unique=True,
            partialFilterExpression={"status": "RUNNING"},
            name="one_running_job_per_instance",
        ),
        IndexModel([("pending_deletes.destination_id", ASCENDING)], sparse=True),
        # ended jobs whose webhook event is not yet queued (backup/webhooks.py)
        IndexModel([("events_pending", ASCENDING)], sparse=True),
    ],
    "leases": [],  # _id is the lease's name (scheduler/leadership.py)
    "restore_points": [
        IndexModel([("instance_id", ASCENDING), ("created_at", DESCENDING), ("_id", DESCENDING)]),
        IndexModel([("plan_id", ASCENDING), ("created_at", DESCENDING)]),
        IndexModel([("expires_at", ASCENDING)]),
        IndexModel([("state", ASCENDING)]),  # retention retries 'deleting' ones
        IndexModel([("destination_id", ASCENDING), ("items.key", ASCENDING)]),
    ],
    "audit": [
        # one instance's trail and the operator's view, newest first; the retention sweep
        IndexModel([("instance_id", ASCENDING), ("created_at", DESCENDING), ("_id", DESCENDING)]),
        IndexModel([("created_at", DESCENDING), ("_id", DESCENDING)]),
    ],
    "protection": [
        # backup/protection.py: the fleet view by state, newest instance first; the metrics
        IndexModel([("state", ASCENDING), ("created_at", DESCENDING), ("_id", DESCENDING)]),
        IndexModel([("created_at", DESCENDING), ("_id", DESCENDING)]),
    ],
    "protection_summary": [],  # one document: the fleet's counts and per-plan rows (/metrics)
    "webhooks": [
        # an instance's list, and emit(): its enabled webhooks that want an event
        IndexModel([("instance_id", ASCENDING), ("created_at", DESCENDING), ("_id", DESCENDING)]),
    ],
    "webhook_deliveries": [
        # the outbox: due deliveries and expired claims; a webhook's delivery log, newest first
        IndexModel([("state", ASCENDING), ("next_attempt_at", ASCENDING)]),
        IndexModel([("state", ASCENDING), ("lease_expires_at", ASCENDING)]),
        IndexModel([("webhook_id", ASCENDING), ("created_at", DESCENDING), ("_id", DESCENDING)]),
        IndexModel([("instance_id", ASCENDING)]),
    ],
}


@dataclass
class Database:
    """The database handle shared by the domain; collections are attributes by name."""

    client: AsyncMongoClient[Document]
    mongo: AsyncDatabase[Document]

    def __getattr__(self, name: str) -> AsyncCollection[Document]:
        if name in INDEXES:
            return self.mongo[name]
        raise AttributeError(name)

    instances: AsyncCollection[Document]
    bindings: AsyncCollection[Document]
    destinations: AsyncCollection[Document]
    plans: AsyncCollection[Document]
    jobs: AsyncCollection[Document]
    restore_points: AsyncCollection[Document]
    leases: AsyncCollection[Document]
    events: Events = field(default_factory=Events, repr=False)
    _url: SecretStr = field(default=SecretStr(""), repr=False)  # holds the password, if any
    _timeout_ms: int = 10_000

    async def ping(self) -> bool:
        try:
            await self.client.admin.command("ping")
        except PyMongoError:
            return False
        return True

    async def ensure_indexes(self) -> None:
        for name, indexes in INDEXES.items():
            if indexes:
                await self.mongo[name].create_indexes(indexes)

    async def close(self) -> None:
        await self.client.close()

    def pool(self, max_size: int) -> Database:
        """The same database through a client of its own with at most ``max_size``
        connections, so at most that many operations at once (the caller closes it).

        The job runner uses one: however many jobs run, its operations then cannot crowd
        out the scheduler's and the API's on a database that serves its requests by
        turns (the embedded one shares one core among all its connections)."""
        handle = connect(
            self._url.get_secret_value(),
            self.mongo.name,
            timeout_ms=self._timeout_ms,
            max_pool_size=max_size,
        )
        handle.events = self.events  # the same application: its writes wake the same loops
        return handle


def connect(
    url: str, database: str, *, timeout_ms: int = 10_000, max_pool_size: int = 100
) -> Database:
    """A store on ``database`` with the product's write and read concerns (majority,
    journaled); ``max_pool_size`` bounds the operations in flight (pymongo's default: 100)."""
    client: AsyncMongoClient[Document] = AsyncMongoClient(
        url,
        tz_aware=True,
        serverSelectionTimeoutMS=timeout_ms,
        connectTimeoutMS=timeout_ms,
        maxPoolSize=max_pool_size,
        appname="osb-backup-manager",
    )
    db = client.get_database(
        database,
        write_concern=WriteConcern(w="majority", j=True),
        read_concern=ReadConcern("majority"),
    )
    handle = Database.__new__(Database)
    handle.client, handle.mongo = client, db
    handle._url, handle._timeout_ms = SecretStr(url), timeout_ms  # for pool()
    handle.events = Events()
    return handle
