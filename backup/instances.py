"""Service instances registered for backup through the OSB API: the rules of their
operations and the work of provision and update.

A data-service broker registers one of its instances by provisioning an instance of the
``backup`` service: the parameters (:mod:`backup.registration`) name the agent (URL and Basic
credentials), how the scripts reach the database, and the backup items. The passwords are
sealed with :class:`~backup.secrets.SecretBox` under ``instances/<id>`` plus the field name
and never leave this module in clear except to the job runner.

Operations and where they run:

- provision: asynchronous (``GET /status`` on the agent, retried until
  ``probe_timeout``: an agent deployed with the data service may not answer yet); without
  ``accepts_incomplete`` the request is refused (:class:`~backup.errors.AsynchronousOnly`).
- update: synchronous unless the agent's URL or credentials change, which are checked on the
  agent first (asynchronous; the old settings stay in force until the check passes).
- deprovision: asynchronous (:mod:`backup.deprovision`: plans removed, jobs cancelled and
  waited for, stored files deleted when asked, then the records); synchronous when nothing
  needs waiting for (no running job, no file to delete) and the platform did not accept an
  asynchronous answer.

An identical repeat is answered as the first request was (the same operation, or done); a
different one is :class:`~backup.errors.AlreadyExists`, and a second change while one is in
progress :class:`~backup.errors.ConcurrentOperation` (broker/osb/errors.py says how a platform
is told). The plan-change rule is here too (:meth:`Instances.update`). How an operation lives
in the instance document (compare-and-set start, leases, fenced finish, resumption by another
replica, tombstones) is :mod:`backup.operations`; :class:`Instances` gives it the work to run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, Protocol, TypeVar

import aiohttp
import structlog
from pydantic import SecretStr
from pymongo.errors import DuplicateKeyError

from backup.agent_client import AgentClient, AgentError, AgentInfo, AgentKind, agent_session
from backup.clock import Clock, SystemClock
from backup.database import SCHEMA_VERSION, Database, Document
from backup.deprovision import Deprovision, StoreOpener, nothing_to_wait_for
from backup.errors import (
    AlreadyExists,
    AsynchronousOnly,
    BackupError,
    ConcurrentOperation,
    InstanceGone,
    InvalidRegistration,
    PlanChangeNotAllowed,
    ServiceMismatch,
    UnknownInstance,
)
from backup.operations import (
    InstanceState,
    OperationFailed,
    OperationKind,
    Operations,
    OperationState,
    OperationStatus,
    find_operation,
    history_after,
    human_duration,
)
from backup.registration import (
    Registration,
    merge_registration,
    registration_of,
    secrets_context,
)
from backup.secrets import SecretBox, SecretKeyError
from storage import egress, open_store

log = structlog.get_logger(__name__)

LIVE_STATES = (InstanceState.READY, InstanceState.UPDATING)  # whose backups can be managed


# --------------------------------------------------------------------------- errors


def _asynchronous_only(what: str) -> AsynchronousOnly:
    return AsynchronousOnly(
        f"{what} is asynchronous: repeat the request with accepts_incomplete=true."
    )


def instance_not_found(instance_id: str, why: str = "does not exist") -> UnknownInstance:
    return UnknownInstance(f"Service instance {instance_id!r} {why}.")


def _keeps_changing() -> ConcurrentOperation:
    return ConcurrentOperation("The instance keeps changing under this request; retry it.")


# --------------------------------------------------------------------------- plans


class PlanTerms(Protocol):
    """What an update needs to know of a catalog plan (the OSB layer's catalog has them)."""

    @property
    def name(self) -> str: ...

    @property
    def plan_updateable(self) -> bool: ...  # whether an instance may leave it for another

    @property
    def delete_backups_default(self) -> bool: ...


PlanT = TypeVar("PlanT", bound=PlanTerms)
PlanT_co = TypeVar("PlanT_co", bound=PlanTerms, covariant=True)


class PlanBook(Protocol[PlanT_co]):
    """The plans an update may name."""

    def plan(self, service_id: str, plan_id: str) -> PlanT_co:
        """The plan; raises the book's own error for one it does not offer."""
        ...

    def find(self, service_id: str, plan_id: str) -> PlanT_co | None:
        """The plan, or None when the book does not list it (any more)."""
        ...


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
    plan_id: str | None  # None: the plan stays
    parameters: Document | None  # raw update parameters, checked by the caller's ``admit``
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


def _over_tls(url: str) -> bool:
    return url.lower().startswith("https://")


def _cleartext_warning(url: str) -> str:
    if _over_tls(url):
        return ""
    return (
        " Warning: the agent is reached over plain http://, which carries the agent's and the "
        "database's passwords in the clear; give it an https:// URL (the operator's "
        "AGENT_REQUIRE_TLS refuses http://)."
    )


# --------------------------------------------------------------------------- the service


class Instances:
    """The instance half of the broker: OSB operations on instances, run by this replica's
    :class:`~backup.operations.Operations` (``self.ops``).

    ``start()`` begins the sweep that resumes operations whose lease lapsed (after a restart
    or a crash) and purges expired tombstones; ``close()`` stops this replica's work and
    releases its leases so a restarted replica resumes at once.
    """

    def __init__(
        self,
        store: Database,
        box: SecretBox,
        *,
        clock: Clock | None = None,
        owner: str | None = None,
        probe_timeout: float = 300.0,
        require_agent_tls: bool = False,
        job_wait: float = 600.0,
        lease_seconds: float = 60.0,
        tombstone_seconds: float = 3600.0,
        opener: StoreOpener = open_store,
        agent_request_timeout: float = 10.0,
        max_parallel: int = 16,
    ) -> None:
        self.db, self.box = store, box
        self.clock: Clock = clock or SystemClock()
        self.probe_timeout = probe_timeout
        self.require_agent_tls = require_agent_tls
        self.job_wait = job_wait
        self.opener = opener
        self.agent_request_timeout = agent_request_timeout
        self.storage_attempts = 4  # per restore point, before a deprovision fails
        self.storage_retry_delay = 1.0  # doubled after each attempt
        self.ops = Operations(
            store,
            self._work,
            self._failure,
            housekeeping=self.reseal,
            clock=self.clock,
            owner=owner,
            lease_seconds=lease_seconds,
            tombstone_seconds=tombstone_seconds,
            max_parallel=max_parallel,
        )
        self._http: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"Instances({self.ops!r})"

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._http = agent_session()
        self.ops.start()

    async def close(self, grace: float = 0.5) -> None:
        await self.ops.close(grace)
        if self._http is not None:
            await self._http.close()

    async def idle(self, timeout: float = 60.0) -> None:
        """Wait until this replica works on no operation (for tests and benchmarks)."""
        await self.ops.idle(timeout)

    async def sweep(self) -> int:
        """Resume operations whose lease lapsed, purge expired tombstones, re-seal secrets;
        returns how many operations were taken over (the sweep loop does it regularly)."""
        return await self.ops.sweep()

    # ---------------------------------------------------------------- queries

    async def get_document(self, instance_id: str) -> Document | None:
        return await self.db.instances.find_one({"_id": instance_id})

    async def fetch(self, instance_id: str) -> Document:
        """The instance as ``GET /v2/service_instances/:id`` shows it (OSB semantics)."""
        doc = await self.get_document(instance_id)
        if doc is None or doc.get("state") == InstanceState.DELETED:
            raise instance_not_found(instance_id)
        state = doc.get("state")
        if state == InstanceState.PROVISIONING:
            raise instance_not_found(instance_id, "is still being provisioned")
        if state == InstanceState.FAILED:
            raise instance_not_found(instance_id, "failed to provision; delete it")
        if state == InstanceState.UPDATING:
            raise ConcurrentOperation(
                "The instance is being updated; fetch it again once the update has finished."
            )
        if state == InstanceState.DEPROVISIONING:  # as while updating
            raise ConcurrentOperation(
                "The instance is being deleted; poll last_operation for the outcome."
            )
        return doc

    async def last_operation(self, instance_id: str, operation: str | None) -> OperationStatus:
        """Where the instance's last (or named) operation stands; :class:`InstanceGone` for
        an unknown instance or an expired tombstone. An ``operation`` that is not one of the
        recorded ids (a platform's own word such as ``provision``, or one older than the
        history) is ignored: the answer is then the latest operation's, as without one."""
        doc = await self.db.instances.find_one(
            {"_id": instance_id},
            {"state": 1, "tombstone_expires_at": 1, "last_operation": 1, "previous_operations": 1},
        )
        if doc is None:
            raise InstanceGone(f"Service instance {instance_id!r} does not exist.")
        if doc.get("state") == InstanceState.DELETED:
            expires = doc.get("tombstone_expires_at")
            if expires is None or expires <= self.clock.now():
                raise InstanceGone(f"Service instance {instance_id!r} has been deleted.")
        op = find_operation(doc, operation)
        if op is None and operation is not None:
            op = find_operation(doc, None)
        if op is None:  # registered before operations were recorded
            return OperationStatus(OperationState.SUCCEEDED, "The instance is registered.")
        state = OperationState(op["state"])
        description = op.get("description") or ""
        if state == OperationState.FAILED and op.get("type") == OperationKind.UPDATE:
            # a failed update leaves the old settings in force (_failure)
            return OperationStatus(state, description, instance_usable=True, update_repeatable=True)
        if state == OperationState.FAILED and op.get("type") == OperationKind.DEPROVISION:
            return OperationStatus(state, description, instance_usable=False)
        return OperationStatus(state, description)

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
            "state": InstanceState.PROVISIONING,
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
            stored = registration_of(doc, self.box, doc["_id"])
        except (SecretKeyError, ValueError):
            return False
        return stored.same_as(req.registration)

    def _check_transport(self, reg: Registration) -> None:
        if self.require_agent_tls and not _over_tls(reg.agent.url):
            raise InvalidRegistration(
                "Invalid parameters: parameters.agent.url: must be an https:// URL; this broker "
                "refuses agents reached over plain HTTP (AGENT_REQUIRE_TLS), which would carry "
                "the agent's and the database's passwords in the clear.",
                field="parameters.agent.url",
            )
        if refusal := egress.literal_refusal(reg.agent.url):
            raise InvalidRegistration(
                f"Invalid parameters: parameters.agent.url: {refusal.message}",
                field="parameters.agent.url",
            )

    async def provision(self, req: ProvisionRequest, *, accepts_incomplete: bool) -> Outcome:
        self._check_transport(req.registration)
        for _ in range(5):
            existing = await self.get_document(req.instance_id)
            state = existing.get("state") if existing else None
            if existing is not None and state not in (InstanceState.DELETED, InstanceState.FAILED):
                return self._provision_repeat(existing, req)
            if not accepts_incomplete:
                raise _asynchronous_only("Provisioning checks the agent first; it")
            at = self.clock.now()
            op = self.ops.new(OperationKind.PROVISION, "Checking the agent.", at)
            doc = self._new_document(req, op, at)
            if existing is None:
                try:
                    await self.db.instances.insert_one(doc)
                except DuplicateKeyError:
                    continue  # a concurrent provision won: compare with it
            else:
                # A tombstone or a failed provision is replaced by the new registration.
                doc["version"] = existing["version"] + 1
                doc["previous_operations"] = history_after(existing, OperationKind.PROVISION)
                result = await self.db.instances.replace_one(
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
            self.ops.spawn(req.instance_id, op["id"])
            return Outcome("accepted", doc, op["id"])
        raise _keeps_changing()

    def _provision_repeat(self, doc: Document, req: ProvisionRequest) -> Outcome:
        state = doc["state"]
        if state == InstanceState.DEPROVISIONING:
            raise ConcurrentOperation(
                "An instance with this id is being deleted; provision again once it is gone."
            )
        if not self._identical_provision(doc, req):
            raise AlreadyExists(
                f"Service instance {req.instance_id!r} already exists with different attributes."
            )
        op = doc.get("last_operation") or {}
        if state == InstanceState.PROVISIONING:
            return Outcome("accepted", doc, op.get("id"))
        return Outcome("exists", doc)

    # ---------------------------------------------------------------- update

    async def update(
        self,
        req: UpdateRequest,
        *,
        accepts_incomplete: bool,
        plans: PlanBook[PlanT],
        admit: Callable[[PlanT], None] | None = None,
    ) -> Outcome:
        """Update the instance. ``plans`` are the plans it may be on; ``admit`` checks the
        request against the plan in force after the update (the caller's own rules, such as
        the plan's parameter schema), once the instance and so its plan are known."""
        for _ in range(5):
            doc = await self.get_document(req.instance_id)
            if doc is None or doc.get("state") == InstanceState.DELETED:
                raise instance_not_found(req.instance_id)
            plan = self._plan_after_update(doc, req, plans)
            if admit is not None:
                admit(plan)
            if doc.get("service_id") != req.service_id:
                raise ServiceMismatch(
                    f"service_id {req.service_id!r} is not the service of this instance.",
                    field="service_id",
                )
            state = doc["state"]
            if state == InstanceState.FAILED:
                raise instance_not_found(req.instance_id, "failed to provision; delete it")
            if state in (InstanceState.PROVISIONING, InstanceState.DEPROVISIONING):
                doing = "provisioned" if state == InstanceState.PROVISIONING else "deleted"
                raise ConcurrentOperation(
                    f"The instance is being {doing}; update it once that has finished."
                )
            current = registration_of(doc, self.box, doc["_id"])
            new = merge_registration(current, req.parameters or {})
            if new.agent.url != current.agent.url:
                self._check_transport(new)
            # The same agent, already known to be a Go one: refused now (a new agent is
            # checked once its kind is known, in _update_work).
            if not new.agent_changed(current) and (
                needs := self._go_agent_needs((doc.get("agent") or {}).get("kind"), new)
            ):
                raise InvalidRegistration(
                    f"Invalid parameters: {needs}", field="parameters.database"
                )
            plan_id = req.plan_id or doc["plan_id"]
            if state == InstanceState.UPDATING:
                return self._update_repeat(doc, plan_id, new)
            sets = self._update_fields(req, plan_id, plan.delete_backups_default, new)
            if new.agent_changed(current):
                if not accepts_incomplete:
                    raise _asynchronous_only("Changing the agent is checked on the agent first; it")
                at = self.clock.now()
                op = self.ops.new(OperationKind.UPDATE, "Checking the new agent.", at)
                pending = {
                    **sets,
                    "agent": {"url": new.agent.url, "username": new.agent.username, "kind": None},
                    "secrets": self.box.seal_map(new.secrets(), secrets_context(doc["_id"])),
                }
                started = {
                    "state": InstanceState.UPDATING,
                    "pending_update": pending,
                    "updated_at": at,
                }
                if not await self.ops.begin(doc, op, started, where={"state": InstanceState.READY}):
                    continue
                log.info(
                    "instance_updating",
                    instance_id=doc["_id"],
                    operation=op["id"],
                    acting_user=req.acting_user,
                )
                self.ops.spawn(doc["_id"], op["id"])
                return Outcome("accepted", doc, op["id"])
            at = self.clock.now()
            op = self.ops.completed(OperationKind.UPDATE, "The instance was updated.", at)
            sets["secrets"] = self.box.seal_map(new.secrets(), secrets_context(doc["_id"]))
            sets["updated_at"] = at
            if not await self.ops.begin(doc, op, sets, where={"state": InstanceState.READY}):
                continue
            log.info("instance_updated", instance_id=doc["_id"], acting_user=req.acting_user)
            return Outcome("done", doc)
        raise _keeps_changing()

    @staticmethod
    def _plan_after_update(doc: Document, req: UpdateRequest, plans: PlanBook[PlanT]) -> PlanT:
        """The plan in force after the update, if the instance may move to it: a plan that
        is not ``plan_updateable`` is kept (one the book no longer lists may be left)."""
        plan = plans.plan(req.service_id, req.plan_id or doc["plan_id"])
        if req.plan_id and req.plan_id != doc["plan_id"]:
            old = plans.find(doc["service_id"], doc["plan_id"])
            if old is not None and not old.plan_updateable:
                raise PlanChangeNotAllowed(
                    f"Plan {old.name!r} cannot be changed to another plan.", field="plan_id"
                )
        return plan

    @staticmethod
    def _update_fields(
        req: UpdateRequest, plan_id: str, delete_backups_default: bool, new: Registration
    ) -> Document:
        delete = new.delete_backups_on_deprovision
        sets: Document = {
            "plan_id": plan_id,
            "parameters": new.public(),
            "database": new.public()["database"],
            "items": list(new.items),
            "delete_backups_on_deprovision": (delete_backups_default if delete is None else delete),
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
                same = registration_of(pending, self.box, doc["_id"]).same_as(new)
            except (SecretKeyError, ValueError):
                same = False
        if not same:
            raise ConcurrentOperation(
                "Another update of this instance is in progress; retry once it has finished."
            )
        return Outcome("accepted", doc, (doc.get("last_operation") or {}).get("id"))

    # ---------------------------------------------------------------- deprovision

    async def deprovision(
        self, instance_id: str, *, accepts_incomplete: bool, acting_user: str | None = None
    ) -> Outcome:
        for _ in range(5):
            doc = await self.get_document(instance_id)
            if doc is None or doc.get("state") == InstanceState.DELETED:
                raise InstanceGone(f"Service instance {instance_id!r} does not exist.")
            op_now = doc.get("last_operation") or {}
            if (
                doc["state"] == InstanceState.DEPROVISIONING
                and op_now.get("state") == OperationState.IN_PROGRESS
            ):
                if not accepts_incomplete:
                    raise _asynchronous_only("The deletion under way")
                return Outcome("accepted", doc, op_now.get("id"))
            inline = not accepts_incomplete
            if inline and not await nothing_to_wait_for(self.db, doc):
                raise _asynchronous_only(
                    "Deleting this instance waits for its running jobs or deletes its stored "
                    "backups; it"
                )
            at = self.clock.now()
            op = self.ops.new(OperationKind.DEPROVISION, "Stopping the schedule.", at)
            started = {
                "state": InstanceState.DEPROVISIONING,
                "pending_update": None,
                "updated_at": at,
            }
            if not await self.ops.begin(doc, op, started):
                continue
            log.info(
                "instance_deprovisioning",
                instance_id=instance_id,
                operation=op["id"],
                inline=inline,
                acting_user=acting_user,
            )
            if inline:
                work = functools.partial(self._deprovision, job_wait=min(self.job_wait, 10.0))
                await self.ops.run(instance_id, op["id"], work)
                after = await self.get_document(instance_id)
                last = (after or {}).get("last_operation") or {}
                if after is not None and last.get("state") == OperationState.FAILED:
                    raise BackupError(last.get("description") or "Deprovisioning failed.")
                return Outcome("done", after or doc)
            self.ops.spawn(instance_id, op["id"])
            return Outcome("accepted", doc, op["id"])
        raise _keeps_changing()

    # ---------------------------------------------------------------- the operations' work

    async def _work(self, doc: Document) -> None:
        kind = doc["last_operation"]["type"]
        if kind == OperationKind.PROVISION:
            await self._provision_work(doc)
        elif kind == OperationKind.UPDATE:
            await self._update_work(doc)
        else:
            await self._deprovision(doc, job_wait=self.job_wait)

    @staticmethod
    def _failure(kind: OperationKind) -> Document:
        """What a failed operation leaves: a failed provision a ``failed`` instance, a failed
        update the old settings in force; a failed deprovision stays ``deprovisioning``, so
        that a new DELETE resumes it."""
        if kind == OperationKind.PROVISION:
            return {"state": InstanceState.FAILED}
        if kind == OperationKind.UPDATE:
            return {"state": InstanceState.READY, "pending_update": None}
        return {}

    async def _deprovision(self, doc: Document, *, job_wait: float) -> None:
        await Deprovision(
            self.db,
            self.box,
            self.ops,
            self.clock,
            self.opener,
            job_wait=job_wait,
            storage_attempts=self.storage_attempts,
            storage_retry_delay=self.storage_retry_delay,
        ).run(doc)

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
                if exc.reason == "egress_denied":
                    raise OperationFailed(
                        f"The agent cannot be used: {exc.message} Check agent.url."
                    ) from None
                if exc.reason == "unauthorized":
                    raise OperationFailed(
                        f"The agent at {client.where} refused the registered credentials "
                        "(401); check agent.username and agent.password."
                    ) from None
                if now >= deadline:
                    raise OperationFailed(
                        f"The agent cannot be used: {exc.message}; gave up after "
                        f"{human_duration((now - started).total_seconds())}. Check agent.url "
                        "and that the agent runs, then provision again."
                    ) from None
                await self.ops.heartbeat(doc, f"Waiting for the agent: {exc.message}; retrying.")
                wait = min(delay, (deadline - now).total_seconds())
                delay = min(delay * 2, 15.0)
            await self.clock.sleep(max(wait, 0.0))

    @staticmethod
    def _go_agent_needs(kind: str | None, reg: Registration) -> str | None:
        """What a Go agent lacks in this registration, or None. It answers 400 to every
        backup and restore whose database username or password is empty, which the
        registration allows (our agent accepts both: trust authentication, Redis without
        AUTH), so such an instance could never be backed up."""
        if kind != AgentKind.GO:
            return None
        password = reg.database.password
        missing = [
            name
            for name, value in (
                ("parameters.database.username", reg.database.username),
                ("parameters.database.password", password and password.get_secret_value()),
            )
            if not value
        ]
        if not missing:
            return None
        return (
            "The agent is a Go osb-backup-agent, which refuses every backup and restore "
            "without a database username and password; set "
            + " and ".join(missing)
            + " (for a database without authentication, any non-empty values: the scripts "
            "may ignore them)."
        )

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
        reg = registration_of(doc, self.box, doc["_id"])
        info = await self._probe(
            doc, reg.agent.url, reg.agent.username, reg.agent.password.get_secret_value()
        )
        if needs := self._go_agent_needs(info.kind, reg):
            raise OperationFailed(f"{needs} Then provision again.")
        done = await self.ops.finish(
            doc,
            {
                "state": InstanceState.READY,
                "last_operation.state": OperationState.SUCCEEDED,
                "last_operation.description": (
                    f"Registered for backup; the agent answered ({self._describe_agent(info)})."
                    + _cleartext_warning(reg.agent.url)
                ),
                **self._agent_fields(info, "agent."),
            },
        )
        if done:
            log.info("instance_provisioned", agent_kind=info.kind, agent_version=info.version)

    async def _update_work(self, doc: Document) -> None:
        pending = doc.get("pending_update") or {}
        reg = registration_of(pending, self.box, doc["_id"])
        info = await self._probe(
            doc, reg.agent.url, reg.agent.username, reg.agent.password.get_secret_value()
        )
        if needs := self._go_agent_needs(info.kind, reg):
            raise OperationFailed(f"{needs} Nothing was changed.")
        applied = {k: v for k, v in pending.items() if k != "agent"}
        applied["agent"] = {
            "url": reg.agent.url,
            "username": reg.agent.username,
            **{k.split(".", 1)[1]: v for k, v in self._agent_fields(info, "agent.").items()},
        }
        done = await self.ops.finish(
            doc,
            {
                **applied,
                "state": InstanceState.READY,
                "pending_update": None,
                "last_operation.state": OperationState.SUCCEEDED,
                "last_operation.description": (
                    f"Updated; the new agent answered ({self._describe_agent(info)})."
                    + _cleartext_warning(reg.agent.url)
                ),
            },
        )
        if done:
            log.info("instance_updated", agent_kind=info.kind)

    # ---------------------------------------------------------------- housekeeping

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
        docs = self.db.instances.find(
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
            result = await self.db.instances.update_one(
                {"_id": doc["_id"], "version": doc["version"]}, {"$set": sets}
            )
            done += result.modified_count
        if done:
            log.info("instance_secrets_resealed", count=done, key_id=active)
        return done
