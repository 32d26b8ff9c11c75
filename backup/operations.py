"""Asynchronous OSB operations, kept on the instance document, and the replica's worker.

An operation's whole life is in its instance document (docs/data-model.md, ``instances``):
``last_operation`` holds its id, type, state, description and the *lease* of the replica
working on it, and ``previous_operations`` the last :data:`HISTORY` ones before it. So a
restart loses nothing:

- an operation is started by a compare-and-set on the document's ``version``
  (:meth:`Operations.begin`), never by an in-process lock, so two requests or two replicas
  can never both start one;
- the replica that started it (or took it over) holds the lease and renews it every third of
  ``lease_seconds`` while the work runs; every write the work makes is conditional on still
  holding it (:meth:`Operations.held`), so a replica that lost it stops at its next write,
  and the renewal cancels the work as soon as it finds the lease gone;
- it ends by a fenced compare-and-set, :meth:`Operations.finish` or :meth:`Operations.fail`,
  or, for a deletion, :meth:`Operations.bury`: the document stays as a *tombstone* (state
  ``deleted``) for ``tombstone_seconds`` so that a platform polling late still reads the
  operation's outcome;
- the sweep (every half lease) claims operations whose lease lapsed (their replica crashed or
  stopped) and resumes them here, purges expired tombstones, then runs the owner's
  housekeeping; :meth:`Operations.close` releases this replica's leases so the next replica
  resumes its operations at once.

What an operation *does* is not here: the instance service (:mod:`backup.instances`) gives
the work to run and the instance state a failed operation leaves. It uses this class by
composition rather than by inheriting from it: the worker only needs two callables from the
service, and keeping them apart keeps the lease fencing in one small class whose every write
is visibly conditional, instead of spread among the OSB semantics' own methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

import structlog
from pymongo.errors import PyMongoError

from backup.clock import Clock, SystemClock
from backup.database import Database, Document

log = structlog.get_logger(__name__)

HISTORY = 5  # earlier operations kept for ``last_operation?operation=<id>``


class OperationState(StrEnum):
    """An operation's ``state`` as stored (docs/data-model.md)."""

    IN_PROGRESS = "in progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class OperationKind(StrEnum):
    """An operation's ``type``, also the prefix of its id."""

    PROVISION = "provision"
    UPDATE = "update"
    DEPROVISION = "deprovision"


class InstanceState(StrEnum):
    """An instance document's ``state``; the operations move it from one to the next."""

    PROVISIONING = "provisioning"
    READY = "ready"
    UPDATING = "updating"
    DEPROVISIONING = "deprovisioning"
    FAILED = "failed"
    DELETED = "deleted"  # a tombstone: the document an ended deletion leaves, purged later


Work = Callable[[Document], Awaitable[None]]


@dataclass(frozen=True)
class OperationStatus:
    """Where an instance's or a binding's operation stands, for the platform polling it."""

    state: OperationState
    description: str
    instance_usable: bool | None = None  # after a failure: whether the instance still works
    update_repeatable: bool | None = None  # after a failed update: whether it may be repeated


class OperationFailed(Exception):
    """Ends the operation as failed with ``description`` (for people)."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class LeaseLost(Exception):
    """The operation was superseded or taken over by another replica: stop working on it."""


def new_owner_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def human_duration(seconds: float) -> str:
    """A duration as operation descriptions say it."""
    seconds = round(seconds)
    if seconds < 120:
        return f"{seconds} s"
    return f"{round(seconds / 60)} min"


def history_entry(op: Document | None, superseded_by: OperationKind) -> Document | None:
    """The previous operation as kept in ``previous_operations``; one still in progress is
    recorded as failed: the new operation halted it."""
    if not op:
        return None
    entry = {k: op.get(k) for k in ("id", "type", "state", "description", "updated_at")}
    if entry["state"] == OperationState.IN_PROGRESS:
        entry["state"] = OperationState.FAILED
        entry["description"] = f"Halted: a {superseded_by} of the instance was requested."
    return entry


def history_after(doc: Document, kind: OperationKind) -> list[Document]:
    """``previous_operations`` once an operation of type ``kind`` replaced ``doc``'s last."""
    entry = history_entry(doc.get("last_operation"), kind)
    return [*(doc.get("previous_operations") or []), *([entry] if entry else [])][-HISTORY:]


def find_operation(doc: Document, op_id: str | None) -> Document | None:
    """The last operation, or with ``op_id`` the one of that id among the last and the
    earlier ones kept; None when not known."""
    op = doc.get("last_operation")
    if op_id is None or (op is not None and op.get("id") == op_id):
        return op
    return next((p for p in doc.get("previous_operations") or [] if p.get("id") == op_id), None)


class Operations:
    """The operations of one replica on the instance documents of ``store``.

    ``work`` runs an operation given its document (as read when the worker claimed it);
    ``failure`` gives the fields a failed operation of a type sets besides its own state;
    ``housekeeping`` runs at the end of every sweep.
    """

    def __init__(
        self,
        store: Database,
        work: Work,
        failure: Callable[[OperationKind], Document],
        *,
        housekeeping: Callable[[], Awaitable[object]] | None = None,
        clock: Clock | None = None,
        owner: str | None = None,
        lease_seconds: float = 60.0,
        tombstone_seconds: float = 3600.0,
        max_parallel: int = 16,
    ) -> None:
        self.db = store
        self.clock: Clock = clock or SystemClock()
        self.owner = owner or new_owner_id()
        self.lease = lease_seconds
        self.tombstone = tombstone_seconds
        self._work = work
        self._failure = failure
        self._housekeeping = housekeeping
        self._sem = asyncio.Semaphore(max_parallel)
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: set[str] = set()  # operation ids this replica works on
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False

    def __repr__(self) -> str:
        return f"Operations(owner={self.owner!r}, running={len(self._tasks)})"

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="osb-operations-sweep")

    async def close(self, grace: float = 0.5) -> None:
        """Stop the sweep, give running operations ``grace`` seconds then cancel them, and
        release this replica's leases so that the next replica resumes them at once."""
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
            await self.db.instances.update_many(
                {
                    "last_operation.lease_owner": self.owner,
                    "last_operation.state": OperationState.IN_PROGRESS,
                },
                {"$set": {"last_operation.lease_expires_at": self.clock.now()}},
            )

    async def idle(self, timeout: float = 60.0) -> None:
        """Wait until this replica works on no operation (for tests and benchmarks)."""
        async with asyncio.timeout(timeout):
            while self._tasks:
                await asyncio.wait(set(self._tasks))

    # ---------------------------------------------------------------- starting one

    def new(self, kind: OperationKind, description: str, at: datetime) -> Document:
        """A new operation of type ``kind``, in progress under this replica's lease."""
        return {
            "id": f"{kind}-{uuid.uuid4().hex}",
            "type": kind,
            "state": OperationState.IN_PROGRESS,
            "description": description,
            "started_at": at,
            "updated_at": at,
            "lease_owner": self.owner,
            "lease_expires_at": at + timedelta(seconds=self.lease),
        }

    def completed(self, kind: OperationKind, description: str, at: datetime) -> Document:
        """An operation done in the request itself: recorded as succeeded, without lease."""
        return {
            **self.new(kind, description, at),
            "state": OperationState.SUCCEEDED,
            "lease_owner": None,
            "lease_expires_at": None,
        }

    async def begin(
        self, doc: Document, op: Document, sets: Document, *, where: Document | None = None
    ) -> bool:
        """Make ``op`` the last operation of ``doc`` (the one before goes to the history) and
        apply ``sets``, if the document is still at ``doc``'s version (and matches ``where``).
        False: it changed meanwhile; read it again and decide again."""
        update: Document = {"$set": {**sets, "last_operation": op}, "$inc": {"version": 1}}
        entry = history_entry(doc.get("last_operation"), OperationKind(op["type"]))
        if entry is not None:
            update["$push"] = {"previous_operations": {"$each": [entry], "$slice": -HISTORY}}
        result = await self.db.instances.update_one(
            {**(where or {}), "_id": doc["_id"], "version": doc["version"]}, update
        )
        return result.matched_count == 1

    # ---------------------------------------------------------------- while it runs

    def held(self, instance_id: str, op_id: str) -> Document:
        """The filter of every write an operation makes: still in progress, still ours."""
        return {
            "_id": instance_id,
            "last_operation.id": op_id,
            "last_operation.state": OperationState.IN_PROGRESS,
            "last_operation.lease_owner": self.owner,
        }

    async def heartbeat(self, doc: Document, description: str | None = None) -> None:
        """Renew this replica's lease on the operation (and say where it is); raises
        :class:`LeaseLost` when the operation was superseded or taken over."""
        op = doc["last_operation"]
        now = self.clock.now()
        sets: Document = {
            "last_operation.lease_expires_at": now + timedelta(seconds=self.lease),
            "last_operation.updated_at": now,
        }
        if description is not None:
            sets["last_operation.description"] = description
        result = await self.db.instances.update_one(self.held(doc["_id"], op["id"]), {"$set": sets})
        if result.matched_count != 1:
            raise LeaseLost()

    # ---------------------------------------------------------------- ending it

    async def finish(self, doc: Document, sets: Document, unset: Document | None = None) -> bool:
        """End the operation with ``sets`` (its state and description among them), if this
        replica still holds it; False when it does not (nothing was written)."""
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
        result = await self.db.instances.update_one(self.held(doc["_id"], op["id"]), update)
        return result.matched_count == 1

    async def fail(self, doc: Document, description: str) -> None:
        kind = OperationKind(doc["last_operation"]["type"])
        sets: Document = {
            "last_operation.state": OperationState.FAILED,
            "last_operation.description": description,
            **self._failure(kind),
        }
        if await self.finish(doc, sets):
            log.warning(
                "operation_failed",
                instance_id=doc["_id"],
                operation=doc["last_operation"]["id"],
                type=kind,
                description=description,
            )

    async def bury(self, doc: Document, description: str, unset: Document) -> bool:
        """End a deletion as succeeded: the document becomes a tombstone for
        ``tombstone_seconds`` (``unset`` removed, e.g. its secrets), or is removed at once
        when tombstones are off. False when this replica no longer holds the operation."""
        if self.tombstone <= 0:
            removed = await self.db.instances.delete_one(
                self.held(doc["_id"], doc["last_operation"]["id"])
            )
            return removed.deleted_count == 1
        return await self.finish(
            doc,
            {
                "state": InstanceState.DELETED,
                "last_operation.state": OperationState.SUCCEEDED,
                "last_operation.description": description,
                "tombstone_expires_at": self.clock.now() + timedelta(seconds=self.tombstone),
                "pending_update": None,
            },
            unset=unset,
        )

    # ---------------------------------------------------------------- the worker

    def spawn(self, instance_id: str, op_id: str) -> None:
        """Work on the operation in the background, unless this replica already does."""
        if self._closing or op_id in self._running:
            return  # closing: the lease lapses and the next replica resumes it
        self._running.add(op_id)
        task = asyncio.create_task(self.run(instance_id, op_id), name=f"osb-{op_id}")
        self._tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            self._running.discard(op_id)

        task.add_done_callback(done)

    async def run(self, instance_id: str, op_id: str, work: Work | None = None) -> None:
        """Run the operation (with ``work`` instead of the service's, if given) while
        renewing its lease, if this replica holds it; returns when it ended or was lost."""
        async with self._sem:
            doc = await self.db.instances.find_one(self.held(instance_id, op_id))
            if doc is None:
                return
            kind = doc["last_operation"]["type"]
            with structlog.contextvars.bound_contextvars(instance_id=instance_id, operation=op_id):
                task = asyncio.create_task(self._guarded(doc, kind, work or self._work))
                lost = asyncio.Event()
                keeper = asyncio.create_task(self._keep_lease(doc, task, lost))
                try:
                    await task
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if not lost.is_set() or (current is not None and current.cancelling()):
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
                await self.heartbeat(doc)
            except LeaseLost:
                lost.set()
                work.cancel()
                return
            except PyMongoError as exc:
                log.warning("operation_lease_renewal_failed", error=type(exc).__name__)

    async def _guarded(self, doc: Document, kind: str, work: Work) -> None:
        try:
            await work(doc)
        except OperationFailed as exc:
            await self.fail(doc, exc.description)
        except LeaseLost:
            log.info("operation_superseded", type=kind)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("operation_error", type=kind)
            with contextlib.suppress(Exception):
                await self.fail(
                    doc,
                    "The broker failed while working on this operation (logged with id "
                    f"{doc['last_operation']['id']}); repeat the request.",
                )

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
        """Claim and resume operations whose lease lapsed; purge expired tombstones; then
        the housekeeping. Returns how many operations were taken over."""
        now = self.clock.now()
        taken = 0
        lapsed = self.db.instances.find(
            {
                "last_operation.state": OperationState.IN_PROGRESS,
                "last_operation.lease_expires_at": {"$lt": now},
            },
            {"last_operation": 1},
        ).limit(100)
        async for doc in lapsed:
            op = doc["last_operation"]
            if op["id"] in self._running:
                continue  # still ours: its worker renews the lease or finds it lost
            result = await self.db.instances.update_one(
                {
                    "_id": doc["_id"],
                    "last_operation.id": op["id"],
                    "last_operation.state": OperationState.IN_PROGRESS,
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
                self.spawn(doc["_id"], op["id"])
        await self.db.instances.delete_many(
            {"state": InstanceState.DELETED, "tombstone_expires_at": {"$lt": now}}
        )
        if self._housekeeping is not None:
            await self._housekeeping()
        return taken
