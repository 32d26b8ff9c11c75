"""Service instances registered for backup through the OSB API, and their operations.

A data-service broker registers one of its instances by provisioning an instance of the
``backup`` service: the parameters name the agent (URL and Basic credentials), how the
scripts reach the database, and the backup items. The passwords are sealed with
:class:`~backup.secrets.SecretBox` under ``instances/<id>`` plus the field name and never
leave this module in clear except to the job runner.

Operations and where they run:

- provision: asynchronous (``GET /status`` on the agent, retried until
  ``probe_timeout``: an agent deployed with the data service may not answer yet); without
  ``accepts_incomplete`` the request is refused with ``AsyncRequired``.
- update: synchronous unless the agent's URL or credentials change, which are checked on the
  agent first (asynchronous; the old settings stay in force until the check passes).
- deprovision: asynchronous (plans removed, jobs cancelled and waited for, stored files
  deleted when asked, then the records); synchronous when nothing needs waiting for (no
  running job, no file to delete) and the platform did not accept an asynchronous answer.

Each operation's life is in the instance document (``last_operation``: id, type, state,
description, and the lease of the replica working on it), so a restart resumes it: a replica
claims work with a compare-and-set on the document and renews its lease while it works; a
replica that stops renewing loses the operation to the next one whose sweep finds the lease
expired. A second change while one is in progress is refused (``ConcurrencyError``) by a
compare-and-set on ``version``, never by an in-process lock.

After a deprovision the document stays as a tombstone (state ``deleted``, secrets removed)
for ``tombstone_seconds``, so that platforms polling ``last_operation`` late still read
``succeeded``; the sweep purges expired tombstones.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import re
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

import aiohttp
import structlog
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pymongo.errors import DuplicateKeyError, PyMongoError

from backup import events, restore_points
from backup.agent_client import AgentClient, AgentError, AgentInfo
from backup.clock import Clock, SystemClock
from backup.errors import BackupError, Conflict, Gone, InvalidInput, NotFound, Unprocessable
from backup.retention import RetentionSweeper
from backup.secrets import SecretBox, SecretKeyError
from backup.store import SCHEMA_VERSION, Document, Store
from storage import ObjectStore, open_store

log = structlog.get_logger(__name__)

PROVISIONING, READY, UPDATING, DEPROVISIONING, FAILED, DELETED = (
    "provisioning",
    "ready",
    "updating",
    "deprovisioning",
    "failed",
    "deleted",
)
LIVE_STATES = (READY, UPDATING)
PROVISION, UPDATE, DEPROVISION = "provision", "update", "deprovision"
IN_PROGRESS, SUCCEEDED, OP_FAILED = "in progress", "succeeded", "failed"
HISTORY = 5  # earlier operations kept for ``last_operation?operation=<id>``

_URL = re.compile(r"^https?://[^/@\s]+(/\S*)?$", re.IGNORECASE)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
ItemName = Annotated[str, Field(min_length=1, max_length=256)]


# --------------------------------------------------------------------------- errors


def async_required(what: str) -> Unprocessable:
    return Unprocessable(
        f"{what} is asynchronous: repeat the request with accepts_incomplete=true.",
        code="AsyncRequired",
    )


def concurrency_error(description: str) -> Unprocessable:
    return Unprocessable(description, code="ConcurrencyError")


def instance_not_found(instance_id: str, why: str = "does not exist") -> NotFound:
    return NotFound(f"Service instance {instance_id!r} {why}.", code="InstanceNotFound")


# --------------------------------------------------------------------------- parameters


class AgentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, hide_input_in_errors=True)

    url: str = Field(max_length=2048)
    username: str = Field(min_length=1, max_length=256)
    password: SecretStr = Field(min_length=1, max_length=1024)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not _URL.match(v):
            raise ValueError(
                "must be an http:// or https:// URL without user info (credentials go in "
                "username and password)"
            )
        return v.rstrip("/")


class DatabaseSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, hide_input_in_errors=True)

    host: str = Field(min_length=1, max_length=255)
    port: int | None = Field(default=None, ge=1, le=65535)
    username: str = Field(default="", max_length=256)
    password: SecretStr | None = Field(default=None, max_length=1024)
    parameters: dict[str, Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=dict, max_length=100
    )

    @field_validator("parameters")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = next((k for k in v if not _ENV_NAME.match(k)), None)
        if bad is not None:
            raise ValueError(f"{bad[:64]!r} is not an environment variable name")
        return v


class Registration(BaseModel):
    """What a provision registers: the agent, the database connection, the items."""

    model_config = ConfigDict(extra="forbid", strict=True, hide_input_in_errors=True)

    agent: AgentSpec
    database: DatabaseSpec
    items: list[ItemName] = Field(min_length=1, max_length=1000)
    delete_backups_on_deprovision: bool | None = None

    @field_validator("items")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("lists an item twice")
        return v

    def public(self) -> Document:
        """The parameters without their secrets: what is stored in clear and shown."""
        out: Document = {
            "agent": {"url": self.agent.url, "username": self.agent.username},
            "database": self.database.model_dump(exclude={"password"}),
            "items": list(self.items),
        }
        if self.delete_backups_on_deprovision is not None:
            out["delete_backups_on_deprovision"] = self.delete_backups_on_deprovision
        return out

    def secrets(self) -> dict[str, str | None]:
        db = self.database.password
        return {
            "agent_password": self.agent.password.get_secret_value(),
            "database_password": db.get_secret_value() if db is not None else None,
        }

    def same_as(self, other: Registration) -> bool:
        """Equal, secrets compared in constant time."""
        if self.public() != other.public():
            return False
        mine, theirs = self.secrets(), other.secrets()
        return all(
            hmac.compare_digest((mine[k] or "").encode(), (theirs[k] or "").encode()) for k in mine
        )

    def agent_changed(self, other: Registration) -> bool:
        return (
            self.agent.url != other.agent.url
            or self.agent.username != other.agent.username
            or not hmac.compare_digest(
                self.agent.password.get_secret_value().encode(),
                other.agent.password.get_secret_value().encode(),
            )
        )


def secrets_context(instance_id: str) -> str:
    return f"instances/{instance_id}"


def _registration_of(part: Document, box: SecretBox, instance_id: str) -> Registration:
    """The registration stored in ``part`` (an instance or its pending update)."""
    opened = box.open_map(part.get("secrets") or {}, secrets_context(instance_id))
    agent = part.get("agent") or {}
    db = dict(part.get("database") or {})
    data: Document = {
        "agent": {
            "url": agent.get("url", ""),
            "username": agent.get("username", ""),
            "password": opened.get("agent_password", ""),
        },
        "database": {**db, "password": opened.get("database_password")},
        "items": list(part.get("items") or []),
    }
    explicit = (part.get("parameters") or {}).get("delete_backups_on_deprovision")
    if explicit is not None:
        data["delete_backups_on_deprovision"] = explicit
    return Registration.model_validate(data)


def merge_registration(current: Registration, patch: Document) -> Registration:
    """Apply update parameters: ``agent`` and ``database`` fields are merged one by one,
    ``items`` and ``delete_backups_on_deprovision`` replaced. Raises ``ValidationError``."""
    data: Document = {
        "agent": {**current.agent.model_dump(), "password": current.agent.password},
        "database": current.database.model_dump(),
        "items": list(current.items),
        "delete_backups_on_deprovision": current.delete_backups_on_deprovision,
    }
    data["database"]["password"] = current.database.password
    for key in ("agent", "database"):
        if key in patch:
            if not isinstance(patch[key], dict):
                data[key] = patch[key]  # let validation name the wrong type
            else:
                data[key] = {**data[key], **patch[key]}
    for key in ("items", "delete_backups_on_deprovision"):
        if key in patch:
            data[key] = patch[key]
    extra = set(patch) - {"agent", "database", "items", "delete_backups_on_deprovision"}
    data.update({k: patch[k] for k in extra})  # unknown keys: validation refuses them
    return Registration.model_validate(data)


# --------------------------------------------------------------------------- requests


@dataclass
class ProvisionRequest:
    instance_id: str
    service_id: str
    plan_id: str
    registration: Registration
    delete_backups_default: bool  # the plan's default
    context: Document = field(default_factory=dict)
    organization_guid: str | None = None
    space_guid: str | None = None
    maintenance_info: Document | None = None
    acting_user: str | None = None


@dataclass
class UpdateRequest:
    instance_id: str
    service_id: str
    plan_id: str | None
    parameters: Document | None  # raw update parameters, already schema-checked
    delete_backups_default: bool  # of the plan in force after the update
    context: Document | None = None
    maintenance_info: Document | None = None
    acting_user: str | None = None


@dataclass
class Outcome:
    """``accepted``: 202 with ``operation``; ``done``: finished now (200); ``exists``: an
    identical repeat of something already done (200)."""

    status: Literal["accepted", "done", "exists"]
    instance: Document
    operation: str | None = None


class _OpFailed(Exception):
    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class _LeaseLost(Exception):
    pass


class _StorageRetry(Exception):
    """A storage failure worth retrying; its message says what failed, in words."""


def _describe(exc: Exception) -> str:
    return exc.description if isinstance(exc, BackupError) else str(exc)


def new_owner_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _operation(kind: str, owner: str, at: datetime, lease: float, description: str) -> Document:
    return {
        "id": f"{kind}-{uuid.uuid4().hex}",
        "type": kind,
        "state": IN_PROGRESS,
        "description": description,
        "started_at": at,
        "updated_at": at,
        "lease_owner": owner,
        "lease_expires_at": at + timedelta(seconds=lease),
    }


def _history_entry(op: Document | None, superseded_by: str) -> Document | None:
    """The previous operation as kept in ``previous_operations``; one still in progress is
    recorded as failed: the new operation halted it."""
    if not op:
        return None
    entry = {k: op.get(k) for k in ("id", "type", "state", "description", "updated_at")}
    if entry["state"] == IN_PROGRESS:
        entry["state"] = OP_FAILED
        entry["description"] = f"Halted: a {superseded_by} of the instance was requested."
    return entry


def _start_operation_update(doc: Document, op: Document, sets: Document) -> Document:
    update: Document = {"$set": {**sets, "last_operation": op}, "$inc": {"version": 1}}
    entry = _history_entry(doc.get("last_operation"), op["type"])
    if entry is not None:
        update["$push"] = {"previous_operations": {"$each": [entry], "$slice": -HISTORY}}
    return update


def _human(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 120:
        return f"{seconds} s"
    return f"{round(seconds / 60)} min"


# --------------------------------------------------------------------------- the service


StoreOpener = Callable[[Any], ObjectStore]


class Instances:
    """The instance half of the broker: OSB operations and the replica's operation worker.

    ``start()`` begins the sweep that resumes operations whose lease lapsed (after a restart
    or a crash) and purges expired tombstones; ``close()`` stops this replica's work and
    releases its leases so a restarted replica resumes at once.
    """

    def __init__(
        self,
        store: Store,
        box: SecretBox,
        *,
        clock: Clock | None = None,
        owner: str | None = None,
        probe_timeout: float = 300.0,
        job_wait: float = 600.0,
        lease_seconds: float = 60.0,
        tombstone_seconds: float = 3600.0,
        opener: StoreOpener = open_store,
        agent_request_timeout: float = 10.0,
        max_parallel: int = 16,
    ) -> None:
        self.store, self.box = store, box
        self.clock: Clock = clock or SystemClock()
        self.owner = owner or new_owner_id()
        self.probe_timeout = probe_timeout
        self.job_wait = job_wait
        self.lease = lease_seconds
        self.tombstone = tombstone_seconds
        self.opener = opener
        self.agent_request_timeout = agent_request_timeout
        self.storage_attempts = 4  # per restore point, before a deprovision fails
        self.storage_retry_delay = 1.0  # doubled after each attempt
        self._sem = asyncio.Semaphore(max_parallel)
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: set[str] = set()  # operation ids this replica works on
        self._sweeper: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._closing = False

    def __repr__(self) -> str:
        return f"Instances(owner={self.owner!r}, running={len(self._tasks)})"

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._http = aiohttp.ClientSession()
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="osb-operations-sweep")

    async def close(self, grace: float = 0.5) -> None:
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(PyMongoError):
            await self.store.instances.update_many(
                {"last_operation.lease_owner": self.owner, "last_operation.state": IN_PROGRESS},
                {"$set": {"last_operation.lease_expires_at": self.clock.now()}},
            )
        if self._http is not None:
            await self._http.close()

    async def idle(self, timeout: float = 60.0) -> None:
        """Wait until this replica works on no operation (for tests and benchmarks)."""
        async with asyncio.timeout(timeout):
            while self._tasks:
                await asyncio.wait(set(self._tasks))

    # ---------------------------------------------------------------- queries

    async def get_document(self, instance_id: str) -> Document | None:
        return await self.store.instances.find_one({"_id": instance_id})

    async def fetch(self, instance_id: str) -> Document:
        """The instance as ``GET /v2/service_instances/:id`` shows it (OSB semantics)."""
        doc = await self.get_document(instance_id)
        if doc is None or doc.get("state") == DELETED:
            raise instance_not_found(instance_id)
        state = doc.get("state")
        if state == PROVISIONING:
            raise instance_not_found(instance_id, "is still being provisioned")
        if state == FAILED:
            raise instance_not_found(instance_id, "failed to provision; delete it")
        if state == UPDATING:
            raise concurrency_error(
                "The instance is being updated; fetch it again once the update has finished."
            )
        return doc

    async def last_operation(self, instance_id: str, operation: str | None) -> Document:
        """``{state, description, ...}`` of the instance's last (or named) operation; Gone for
        an unknown instance or an expired tombstone."""
        doc = await self.store.instances.find_one(
            {"_id": instance_id},
            {"state": 1, "tombstone_expires_at": 1, "last_operation": 1, "previous_operations": 1},
        )
        if doc is None:
            raise Gone(f"Service instance {instance_id!r} does not exist.", code="Gone")
        if doc.get("state") == DELETED:
            expires = doc.get("tombstone_expires_at")
            if expires is None or expires <= self.clock.now():
                raise Gone(f"Service instance {instance_id!r} has been deleted.", code="Gone")
        op = doc.get("last_operation")
        if operation is not None and (op is None or op.get("id") != operation):
            op = next(
                (p for p in doc.get("previous_operations") or [] if p.get("id") == operation),
                None,
            )
            if op is None:
                raise InvalidInput(
                    f"Operation {operation[:200]!r} is not known for this instance.",
                    code="UnknownOperation",
                    field="operation",
                )
        if op is None:  # registered before operations were recorded
            return {"state": SUCCEEDED, "description": "The instance is registered."}
        out: Document = {"state": op["state"], "description": op.get("description") or ""}
        if op["state"] == OP_FAILED and op.get("type") == UPDATE:
            out["instance_usable"] = True
            out["update_repeatable"] = True
        elif op["state"] == OP_FAILED and op.get("type") == DEPROVISION:
            out["instance_usable"] = False
        return out

    # ---------------------------------------------------------------- provision

    def _new_document(self, req: ProvisionRequest, op: Document, at: datetime) -> Document:
        reg = req.registration
        context = req.context or {}
        delete = reg.delete_backups_on_deprovision
        return {
            "_id": req.instance_id,
            "service_id": req.service_id,
            "plan_id": req.plan_id,
            "context": context,
            "organization_guid": req.organization_guid or context.get("organization_guid"),
            "space_guid": req.space_guid or context.get("space_guid"),
            "maintenance_info": req.maintenance_info,
            "parameters": reg.public(),
            "agent": {"url": reg.agent.url, "username": reg.agent.username, "kind": None},
            "database": reg.public()["database"],
            "items": list(reg.items),
            "secrets": self.box.seal_map(reg.secrets(), secrets_context(req.instance_id)),
            "delete_backups_on_deprovision": (
                req.delete_backups_default if delete is None else delete
            ),
            "state": PROVISIONING,
            "last_operation": op,
            "previous_operations": [],
            "pending_update": None,
            "tombstone_expires_at": None,
            "created_by": req.acting_user,
            "created_at": at,
            "updated_at": at,
            "version": 1,
            "schema_version": SCHEMA_VERSION,
        }

    def _identical_provision(self, doc: Document, req: ProvisionRequest) -> bool:
        if doc.get("service_id") != req.service_id or doc.get("plan_id") != req.plan_id:
            return False
        try:
            stored = _registration_of(doc, self.box, doc["_id"])
        except (SecretKeyError, ValueError):
            return False
        return stored.same_as(req.registration)

    async def provision(self, req: ProvisionRequest, *, accepts_incomplete: bool) -> Outcome:
        for _ in range(5):
            existing = await self.get_document(req.instance_id)
            state = existing.get("state") if existing else None
            if existing is not None and state not in (DELETED, FAILED):
                return self._provision_repeat(existing, req)
            if not accepts_incomplete:
                raise async_required("Provisioning checks the agent first; it")
            at = self.clock.now()
            op = _operation(PROVISION, self.owner, at, self.lease, "Checking the agent.")
            doc = self._new_document(req, op, at)
            if existing is None:
                try:
                    await self.store.instances.insert_one(doc)
                except DuplicateKeyError:
                    continue  # a concurrent provision won: compare with it
            else:
                # A tombstone or a failed provision is replaced by the new registration.
                doc["version"] = existing["version"] + 1
                entry = _history_entry(existing.get("last_operation"), PROVISION)
                doc["previous_operations"] = [
                    *(existing.get("previous_operations") or []),
                    *([entry] if entry else []),
                ][-HISTORY:]
                result = await self.store.instances.replace_one(
                    {"_id": req.instance_id, "version": existing["version"]}, doc
                )
                if result.matched_count != 1:
                    continue
            log.info(
                "instance_provisioning",
                instance_id=req.instance_id,
                operation=op["id"],
                plan_id=req.plan_id,
                acting_user=req.acting_user,
            )
            self._spawn(req.instance_id, op["id"])
            return Outcome("accepted", doc, op["id"])
        raise concurrency_error("The instance keeps changing under this request; retry it.")

    def _provision_repeat(self, doc: Document, req: ProvisionRequest) -> Outcome:
        state = doc["state"]
        if state == DEPROVISIONING:
            raise concurrency_error(
                "An instance with this id is being deleted; provision again once it is gone."
            )
        if not self._identical_provision(doc, req):
            raise Conflict(
                f"Service instance {req.instance_id!r} already exists with different attributes.",
                code="Conflict",
            )
        op = doc.get("last_operation") or {}
        if state == PROVISIONING:
            return Outcome("accepted", doc, op.get("id"))
        return Outcome("exists", doc)

    # ---------------------------------------------------------------- update

    async def update(self, req: UpdateRequest, *, accepts_incomplete: bool) -> Outcome:
        for _ in range(5):
            doc = await self.get_document(req.instance_id)
            if doc is None or doc.get("state") == DELETED:
                raise instance_not_found(req.instance_id)
            if doc.get("service_id") != req.service_id:
                raise InvalidInput(
                    f"service_id {req.service_id!r} is not the service of this instance.",
                    code="BadRequest",
                    field="service_id",
                )
            state = doc["state"]
            if state == FAILED:
                raise instance_not_found(req.instance_id, "failed to provision; delete it")
            if state in (PROVISIONING, DEPROVISIONING):
                raise concurrency_error(
                    f"The instance is being {'provisioned' if state == PROVISIONING else 'deleted'}"
                    "; update it once that has finished."
                )
            current = _registration_of(doc, self.box, doc["_id"])
            new = merge_registration(current, req.parameters or {})
            plan_id = req.plan_id or doc["plan_id"]
            if state == UPDATING:
                return self._update_repeat(doc, plan_id, new)
            sets = self._update_fields(doc, req, plan_id, new)
            if new.agent_changed(current):
                if not accepts_incomplete:
                    raise async_required("Changing the agent is checked on the agent first; it")
                at = self.clock.now()
                op = _operation(UPDATE, self.owner, at, self.lease, "Checking the new agent.")
                pending = {
                    **sets,
                    "agent": {"url": new.agent.url, "username": new.agent.username, "kind": None},
                    "secrets": self.box.seal_map(new.secrets(), secrets_context(doc["_id"])),
                }
                update = _start_operation_update(
                    doc, op, {"state": UPDATING, "pending_update": pending, "updated_at": at}
                )
                result = await self.store.instances.update_one(
                    {"_id": doc["_id"], "version": doc["version"], "state": READY}, update
                )
                if result.matched_count != 1:
                    continue
                log.info(
                    "instance_updating",
                    instance_id=doc["_id"],
                    operation=op["id"],
                    acting_user=req.acting_user,
                )
                self._spawn(doc["_id"], op["id"])
                return Outcome("accepted", doc, op["id"])
            at = self.clock.now()
            op = {
                **_operation(UPDATE, self.owner, at, 0, "The instance was updated."),
                "state": SUCCEEDED,
                "lease_owner": None,
                "lease_expires_at": None,
            }
            sets["secrets"] = self.box.seal_map(new.secrets(), secrets_context(doc["_id"]))
            update = _start_operation_update(doc, op, {**sets, "updated_at": at})
            result = await self.store.instances.update_one(
                {"_id": doc["_id"], "version": doc["version"], "state": READY}, update
            )
            if result.matched_count != 1:
                continue
            log.info("instance_updated", instance_id=doc["_id"], acting_user=req.acting_user)
            return Outcome("done", doc)
        raise concurrency_error("The instance keeps changing under this request; retry it.")

    def _update_fields(
        self, doc: Document, req: UpdateRequest, plan_id: str, new: Registration
    ) -> Document:
        delete = new.delete_backups_on_deprovision
        sets: Document = {
            "plan_id": plan_id,
            "parameters": new.public(),
            "database": new.public()["database"],
            "items": list(new.items),
            "delete_backups_on_deprovision": (
                req.delete_backups_default if delete is None else delete
            ),
        }
        if req.context is not None:
            sets["context"] = req.context
        if req.maintenance_info is not None:
            sets["maintenance_info"] = req.maintenance_info
        return sets

    def _update_repeat(self, doc: Document, plan_id: str, new: Registration) -> Outcome:
        pending = doc.get("pending_update") or {}
        same = False
        if pending.get("plan_id") == plan_id:
            try:
                same = _registration_of(pending, self.box, doc["_id"]).same_as(new)
            except (SecretKeyError, ValueError):
                same = False
        if not same:
            raise concurrency_error(
                "Another update of this instance is in progress; retry once it has finished."
            )
        return Outcome("accepted", doc, (doc.get("last_operation") or {}).get("id"))

    # ---------------------------------------------------------------- deprovision

    async def deprovision(
        self, instance_id: str, *, accepts_incomplete: bool, acting_user: str | None = None
    ) -> Outcome:
        for _ in range(5):
            doc = await self.get_document(instance_id)
            if doc is None or doc.get("state") == DELETED:
                raise Gone(f"Service instance {instance_id!r} does not exist.", code="Gone")
            op_now = doc.get("last_operation") or {}
            if doc["state"] == DEPROVISIONING and op_now.get("state") == IN_PROGRESS:
                if not accepts_incomplete:
                    raise async_required("The deletion under way")
                return Outcome("accepted", doc, op_now.get("id"))
            inline = not accepts_incomplete
            if inline and not await self._can_deprovision_now(doc):
                raise async_required(
                    "Deleting this instance waits for its running jobs or deletes its stored "
                    "backups; it"
                )
            at = self.clock.now()
            op = _operation(DEPROVISION, self.owner, at, self.lease, "Stopping the schedule.")
            update = _start_operation_update(
                doc, op, {"state": DEPROVISIONING, "pending_update": None, "updated_at": at}
            )
            result = await self.store.instances.update_one(
                {"_id": instance_id, "version": doc["version"]}, update
            )
            if result.matched_count != 1:
                continue
            log.info(
                "instance_deprovisioning",
                instance_id=instance_id,
                operation=op["id"],
                inline=inline,
                acting_user=acting_user,
            )
            if inline:
                await self._run(instance_id, op["id"], job_wait=min(self.job_wait, 10.0))
                after = await self.get_document(instance_id)
                last = (after or {}).get("last_operation") or {}
                if after is not None and last.get("state") == OP_FAILED:
                    raise BackupError(last.get("description") or "Deprovisioning failed.")
                return Outcome("done", after or doc)
            self._spawn(instance_id, op["id"])
            return Outcome("accepted", doc, op["id"])
        raise concurrency_error("The instance keeps changing under this request; retry it.")

    async def _can_deprovision_now(self, doc: Document) -> bool:
        running = await self.store.jobs.find_one(
            {"instance_id": doc["_id"], "status": "RUNNING"}, {"_id": 1}
        )
        if running is not None:
            return False
        leftovers = await self.store.jobs.find_one(
            {"instance_id": doc["_id"], "pending_deletes.0": {"$exists": True}}, {"_id": 1}
        )
        if leftovers is not None:
            return False
        if doc.get("delete_backups_on_deprovision"):
            point = await self.store.restore_points.find_one(
                {"instance_id": doc["_id"]}, {"_id": 1}
            )
            return point is None
        return True

    # ---------------------------------------------------------------- the worker

    def _spawn(self, instance_id: str, op_id: str) -> None:
        if self._closing or op_id in self._running:
            return  # closing: the lease lapses and the next replica resumes it
        self._running.add(op_id)
        task = asyncio.create_task(self._run(instance_id, op_id), name=f"osb-{op_id}")
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._running.discard(op_id)

        task.add_done_callback(done)

    def _mine(self, instance_id: str, op_id: str) -> Document:
        return {
            "_id": instance_id,
            "last_operation.id": op_id,
            "last_operation.state": IN_PROGRESS,
            "last_operation.lease_owner": self.owner,
        }

    async def _heartbeat(self, doc: Document, description: str | None = None) -> None:
        """Renew this replica's lease on the operation (and say where it is); raises
        :class:`_LeaseLost` when the operation was superseded or taken over."""
        op = doc["last_operation"]
        now = self.clock.now()
        sets: Document = {
            "last_operation.lease_expires_at": now + timedelta(seconds=self.lease),
            "last_operation.updated_at": now,
        }
        if description is not None:
            sets["last_operation.description"] = description
        result = await self.store.instances.update_one(
            self._mine(doc["_id"], op["id"]), {"$set": sets}
        )
        if result.matched_count != 1:
            raise _LeaseLost()

    async def _finish(self, doc: Document, sets: Document, unset: Document | None = None) -> bool:
        op = doc["last_operation"]
        update: Document = {
            "$set": {
                **sets,
                "last_operation.lease_owner": None,
                "last_operation.lease_expires_at": None,
                "last_operation.updated_at": self.clock.now(),
                "updated_at": self.clock.now(),
            },
            "$inc": {"version": 1},
        }
        if unset:
            update["$unset"] = unset
        result = await self.store.instances.update_one(self._mine(doc["_id"], op["id"]), update)
        return result.matched_count == 1

    async def _fail(self, doc: Document, description: str) -> None:
        kind = doc["last_operation"]["type"]
        sets: Document = {
            "last_operation.state": OP_FAILED,
            "last_operation.description": description,
        }
        if kind == PROVISION:
            sets["state"] = FAILED
        elif kind == UPDATE:
            sets["state"] = READY
            sets["pending_update"] = None
        # a failed deprovision stays 'deprovisioning': a new DELETE resumes it
        if await self._finish(doc, sets):
            log.warning(
                "operation_failed",
                instance_id=doc["_id"],
                operation=doc["last_operation"]["id"],
                type=kind,
                description=description,
            )

    async def _run(self, instance_id: str, op_id: str, *, job_wait: float | None = None) -> None:
        async with self._sem:
            doc = await self.store.instances.find_one(self._mine(instance_id, op_id))
            if doc is None:
                return
            kind = doc["last_operation"]["type"]
            with structlog.contextvars.bound_contextvars(instance_id=instance_id, operation=op_id):
                work = asyncio.create_task(self._work(doc, kind, job_wait))
                lost = asyncio.Event()
                keeper = asyncio.create_task(self._keep_lease(doc, work, lost))
                try:
                    await work
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if not lost.is_set() or (task is not None and task.cancelling()):
                        raise
                    log.info("operation_lease_lost", type=kind)
                finally:
                    keeper.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await keeper

    async def _keep_lease(
        self, doc: Document, work: asyncio.Task[None], lost: asyncio.Event
    ) -> None:
        """Renew the lease every third of it while ``work`` runs (a long storage call must not
        let it lapse); stop the work if another replica took the operation over."""
        while not work.done():
            await self.clock.sleep(self.lease / 3)
            try:
                await self._heartbeat(doc)
            except _LeaseLost:
                lost.set()
                work.cancel()
                return
            except PyMongoError as exc:
                log.warning("operation_lease_renewal_failed", error=type(exc).__name__)

    async def _work(self, doc: Document, kind: str, job_wait: float | None) -> None:
        try:
            if kind == PROVISION:
                await self._provision_work(doc)
            elif kind == UPDATE:
                await self._update_work(doc)
            else:
                await self._deprovision_work(doc, self.job_wait if job_wait is None else job_wait)
        except _OpFailed as exc:
            await self._fail(doc, exc.description)
        except _LeaseLost:
            log.info("operation_superseded", type=kind)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("operation_error", type=kind)
            with contextlib.suppress(Exception):
                await self._fail(
                    doc,
                    "The broker failed while working on this operation (logged with id "
                    f"{doc['last_operation']['id']}); repeat the request.",
                )

    async def _probe(self, doc: Document, url: str, username: str, password: str) -> AgentInfo:
        """The agent's ``GET /status``, retried until ``probe_timeout`` after the operation
        began (so a resumed operation keeps its deadline); a refusal fails at once."""
        assert self._http is not None
        client = AgentClient(
            url,
            username,
            SecretStr(password),
            session=self._http,
            timeout=self.agent_request_timeout,
        )
        started: datetime = doc["last_operation"]["started_at"]
        deadline = started + timedelta(seconds=self.probe_timeout)
        delay = 0.5
        while True:
            try:
                return await client.status()
            except AgentError as exc:
                now = self.clock.now()
                if exc.reason == "unauthorized":
                    raise _OpFailed(
                        f"The agent at {client.where} refused the registered credentials "
                        "(401); check agent.username and agent.password."
                    ) from None
                if now >= deadline:
                    raise _OpFailed(
                        f"The agent cannot be used: {exc.message}; gave up after "
                        f"{_human((now - started).total_seconds())}. Check agent.url and that "
                        "the agent runs, then provision again."
                    ) from None
                await self._heartbeat(doc, f"Waiting for the agent: {exc.message}; retrying.")
                wait = min(delay, (deadline - now).total_seconds())
                delay = min(delay * 2, 15.0)
            await self.clock.sleep(max(wait, 0.0))

    def _agent_fields(self, info: AgentInfo, prefix: str) -> Document:
        return {
            f"{prefix}kind": info.kind,
            f"{prefix}version": info.version,
            f"{prefix}capabilities": sorted(info.capabilities),
            f"{prefix}checked_at": self.clock.now(),
        }

    @staticmethod
    def _describe_agent(info: AgentInfo) -> str:
        if info.kind == "go":
            return "a Go osb-backup-agent"
        return f"our agent {info.version or ''}".rstrip()

    async def _provision_work(self, doc: Document) -> None:
        reg = _registration_of(doc, self.box, doc["_id"])
        info = await self._probe(
            doc, reg.agent.url, reg.agent.username, reg.agent.password.get_secret_value()
        )
        done = await self._finish(
            doc,
            {
                "state": READY,
                "last_operation.state": SUCCEEDED,
                "last_operation.description": (
                    f"Registered for backup; the agent answered ({self._describe_agent(info)})."
                ),
                **self._agent_fields(info, "agent."),
            },
        )
        if done:
            log.info("instance_provisioned", agent_kind=info.kind, agent_version=info.version)

    async def _update_work(self, doc: Document) -> None:
        pending = doc.get("pending_update") or {}
        reg = _registration_of(pending, self.box, doc["_id"])
        info = await self._probe(
            doc, reg.agent.url, reg.agent.username, reg.agent.password.get_secret_value()
        )
        applied = {k: v for k, v in pending.items() if k != "agent"}
        applied["agent"] = {
            "url": reg.agent.url,
            "username": reg.agent.username,
            **{k.split(".", 1)[1]: v for k, v in self._agent_fields(info, "agent.").items()},
        }
        done = await self._finish(
            doc,
            {
                **applied,
                "state": READY,
                "pending_update": None,
                "last_operation.state": SUCCEEDED,
                "last_operation.description": (
                    f"Updated; the new agent answered ({self._describe_agent(info)})."
                ),
            },
        )
        if done:
            log.info("instance_updated", agent_kind=info.kind)

    async def _deprovision_work(self, doc: Document, job_wait: float) -> None:
        iid = doc["_id"]
        store = self.store
        removed = await store.plans.delete_many({"instance_id": iid})
        if removed.deleted_count:
            events.plans_changed.fire()
        await self._heartbeat(doc, "Cancelling the instance's jobs.")
        started: datetime = doc["last_operation"]["started_at"]
        deadline = started + timedelta(seconds=job_wait)
        abandoned = 0
        while True:
            now = self.clock.now()
            await store.jobs.update_many(
                {"instance_id": iid, "status": "QUEUED"},
                {
                    "$set": {
                        "status": "CANCELLED",
                        "cancel_requested": True,
                        "reason": "Cancelled: the service instance is being deleted.",
                        "ended_at": now,
                    },
                    "$inc": {"version": 1},
                },
            )
            asked = await store.jobs.update_many(
                {"instance_id": iid, "status": "RUNNING", "cancel_requested": {"$ne": True}},
                {"$set": {"cancel_requested": True}, "$inc": {"version": 1}},
            )
            if asked.modified_count:
                events.jobs_queued.fire()  # wakes this replica's runner to act on it
            running = await store.jobs.count_documents({"instance_id": iid, "status": "RUNNING"})
            if not running:
                break
            if now >= deadline:
                gave_up = await store.jobs.update_many(
                    {"instance_id": iid, "status": "RUNNING"},
                    {
                        "$set": {
                            "status": "CANCELLED",
                            "reason": (
                                "Abandoned: the service instance was deleted while this job "
                                f"ran and it did not stop within {_human(job_wait)}; the agent "
                                "may still finish it on its own."
                            ),
                            "ended_at": now,
                        },
                        "$inc": {"version": 1},
                    },
                )
                abandoned = gave_up.modified_count
                break
            await self._heartbeat(doc, f"Waiting for {running} running job(s) to stop.")
            await self.clock.sleep(min(1.0, max((deadline - now).total_seconds(), 0.0)))

        await self._delete_failed_uploads(doc)
        kept_files = 0
        if doc.get("delete_backups_on_deprovision"):
            await self._delete_stored_backups(doc)
        else:
            kept_files = await store.restore_points.count_documents({"instance_id": iid})

        await self._heartbeat(doc, "Removing the instance's records.")
        for coll in ("restore_points", "jobs", "plans", "destinations", "bindings"):
            await getattr(store, coll).delete_many({"instance_id": iid})
        description = "Deleted."
        if kept_files:
            description += (
                f" The files of {kept_files} restore point(s) were kept in their storage."
            )
        if abandoned:
            description += f" {abandoned} running job(s) were abandoned."
        now = self.clock.now()
        if self.tombstone <= 0:
            await store.instances.delete_one(self._mine(iid, doc["last_operation"]["id"]))
            log.info("instance_deprovisioned", kept_files=kept_files)
            return
        done = await self._finish(
            doc,
            {
                "state": DELETED,
                "last_operation.state": SUCCEEDED,
                "last_operation.description": description,
                "tombstone_expires_at": now + timedelta(seconds=self.tombstone),
                "pending_update": None,
            },
            unset={"secrets": ""},
        )
        if done:
            log.info("instance_deprovisioned", kept_files=kept_files, abandoned=abandoned)

    async def _delete_stored_backups(self, doc: Document) -> None:
        iid = doc["_id"]
        points = await self.store.restore_points.find({"instance_id": iid}, {"_id": 1}).to_list()
        total = len(points)
        for n, point in enumerate(points, 1):
            progress = f"Deleting stored backups ({n} of {total})"

            async def delete(point_id: str = point["_id"]) -> None:
                try:
                    await restore_points.delete(
                        self.store, self.box, iid, point_id, opener=self.opener
                    )
                except NotFound:
                    pass
                except Conflict as exc:
                    # Its destination is gone: nothing can reach those files any more.
                    log.warning("restore_point_files_unreachable", point=point_id, code=exc.code)

            await self._with_storage_retries(
                doc,
                progress,
                delete,
                f"Stored backups could not be deleted: {{error}} {total - n + 1} restore "
                "point(s) remain; delete the instance again to retry.",
            )

    async def _delete_failed_uploads(self, doc: Document) -> None:
        """Files that failed or cancelled backups uploaded are not backups: whatever was chosen
        for the backups, they go with the instance, because the job records about to be deleted
        are the only trace of them (see backup/retention.py, ``pending_deletes``)."""
        iid = doc["_id"]
        sweeper = RetentionSweeper(self.store, self.box, clock=self.clock, opener=self.opener)
        jobs = await self.store.jobs.find(
            {"instance_id": iid, "pending_deletes.0": {"$exists": True}}, {"pending_deletes": 1}
        ).to_list()
        for n, job in enumerate(jobs, 1):

            async def delete(job_id: str = job["_id"]) -> None:
                current = await self.store.jobs.find_one({"_id": job_id}, {"pending_deletes": 1})
                result = await sweeper.delete_job_files(
                    job_id, (current or {}).get("pending_deletes") or []
                )
                if result.errors:
                    raise _StorageRetry(result.errors[0])

            await self._with_storage_retries(
                doc,
                f"Deleting files of failed backups ({n} of {len(jobs)})",
                delete,
                "Files left by failed backups could not be deleted: {error}; delete the "
                "instance again to retry.",
            )

    async def _with_storage_retries(
        self,
        doc: Document,
        progress: str,
        attempt: Callable[[], Awaitable[None]],
        failure: str,
    ) -> None:
        """Run ``attempt`` until it succeeds, retrying a storage failure with a doubling delay
        up to ``storage_attempts``; then fail the operation with ``failure`` (``{error}`` is
        the last failure, in words)."""
        attempts, delay = 0, self.storage_retry_delay
        await self._heartbeat(doc, progress + ".")
        while True:
            try:
                await attempt()
                return
            except (BackupError, _StorageRetry) as exc:
                attempts += 1
                if attempts >= self.storage_attempts:
                    raise _OpFailed(failure.format(error=_describe(exc))) from None
                await self._heartbeat(doc, f"{progress}: retrying.")
                await self.clock.sleep(delay)
                delay *= 2

    # ---------------------------------------------------------------- the sweep

    async def _sweep_loop(self) -> None:
        interval = max(1.0, self.lease / 2)
        while True:
            try:
                await self.sweep()
            except PyMongoError as exc:
                log.warning("operations_sweep_failed", error=type(exc).__name__)
            await self.clock.sleep(interval)

    async def sweep(self) -> int:
        """Claim and resume operations whose lease lapsed; purge expired tombstones.
        Returns how many operations were taken over."""
        now = self.clock.now()
        taken = 0
        lapsed = self.store.instances.find(
            {"last_operation.state": IN_PROGRESS, "last_operation.lease_expires_at": {"$lt": now}},
            {"last_operation": 1},
        ).limit(100)
        async for doc in lapsed:
            op = doc["last_operation"]
            if op["id"] in self._running:
                continue  # still ours: its worker renews the lease or finds it lost
            result = await self.store.instances.update_one(
                {
                    "_id": doc["_id"],
                    "last_operation.id": op["id"],
                    "last_operation.state": IN_PROGRESS,
                    "last_operation.lease_expires_at": op.get("lease_expires_at"),
                },
                {
                    "$set": {
                        "last_operation.lease_owner": self.owner,
                        "last_operation.lease_expires_at": now + timedelta(seconds=self.lease),
                    }
                },
            )
            if result.matched_count == 1:
                taken += 1
                log.info(
                    "operation_resumed",
                    instance_id=doc["_id"],
                    operation=op["id"],
                    previous_owner=op.get("lease_owner"),
                )
                self._spawn(doc["_id"], op["id"])
        await self.store.instances.delete_many(
            {"state": DELETED, "tombstone_expires_at": {"$lt": now}}
        )
        await self.reseal()
        return taken

    async def reseal(self, limit: int = 100) -> int:
        """Re-seal instance secrets sealed with a key other than the active one (after a key
        rotation), so that the old key can be removed once nothing uses it. Conditional on the
        document's version: a concurrent change wins and the next sweep tries again."""
        active = self.box.active_key_id
        stale = [
            {f"{where}.{field}.kid": {"$exists": True, "$ne": active}}
            for where in ("secrets", "pending_update.secrets")
            for field in ("agent_password", "database_password")
        ]
        docs = self.store.instances.find(
            {"$or": stale}, {"secrets": 1, "pending_update": 1, "version": 1}
        ).limit(limit)
        done = 0
        async for doc in docs:
            context = secrets_context(doc["_id"])
            try:
                sets: Document = {
                    "secrets": {
                        k: self.box.reseal(v, f"{context}/{k}")
                        for k, v in (doc.get("secrets") or {}).items()
                    }
                }
                pending = doc.get("pending_update")
                if pending and pending.get("secrets"):
                    sets["pending_update.secrets"] = {
                        k: self.box.reseal(v, f"{context}/{k}")
                        for k, v in pending["secrets"].items()
                    }
            except SecretKeyError:
                log.error("instance_secrets_unreadable", instance_id=doc["_id"])
                continue
            result = await self.store.instances.update_one(
                {"_id": doc["_id"], "version": doc["version"]}, {"$set": sets}
            )
            done += result.modified_count
        if done:
            log.info("instance_secrets_resealed", count=done, key_id=active)
        return done
