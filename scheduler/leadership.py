"""Which replica's scheduler reads and writes the due plans: one leader, held by a lease in
the database, the other replicas standing by.

Why: correctness does not need a leader (the unique index on plan and fire time gives every
fire exactly one job, whoever writes it), but without one every replica reads the same due
plans and tries to write the same jobs, and all but one of those writes are refused. On the
embedded database that more than doubled the database's CPU per fire with three replicas and
pushed a steady 167 fires/s past what it could take (benchmarks/scheduler_fire_lag.py). With
a leader, three replicas cost what one does.

The lease is one document, ``leases/{name}``: ``owner`` and ``expires_at``. A replica takes
it when it is free or expired, with one conditional upsert (the unique ``_id`` refuses the
second taker), and renews it every third of its length. A replica that dies stops renewing,
and another takes over at most ``seconds`` later: the fires due meanwhile are recorded a few
seconds late, as ordinary SCHEDULE jobs (well within the misfire threshold). A replica that
stops cleanly gives the lease up at once. Two replicas may briefly both believe they lead
(a paused process, clocks apart); that costs refused writes, never a second job.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import timedelta

import structlog
from pymongo.errors import DuplicateKeyError, PyMongoError

from backup.clock import Clock
from backup.database import Database

log = structlog.get_logger(__name__)


class Leadership:
    """The lease ``name`` for ``owner``: ``start`` keeps trying to take or renew it, ``held``
    says whether this replica leads, ``on_gain`` is called each time it starts leading."""

    def __init__(
        self,
        store: Database,
        *,
        name: str,
        owner: str,
        seconds: float,
        clock: Clock,
        on_gain: Callable[[], None] | None = None,
    ) -> None:
        self.db = store
        self.name = name
        self.owner = owner
        self.seconds = seconds
        self.clock = clock
        self.on_gain = on_gain
        self.held = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None or self._task.done():
            await self.hold()
            self._task = asyncio.create_task(self._loop(), name=f"lease:{self.name}")

    async def stop(self) -> None:
        """Stop renewing and give the lease up, so that another replica leads at once."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.held:
            self.held = False
            with contextlib.suppress(PyMongoError):
                await self.db.leases.update_one(
                    {"_id": self.name, "owner": self.owner},
                    {"$set": {"expires_at": self.clock.now()}},
                )
            log.info("leadership_released", lease=self.name, replica=self.owner)

    async def _loop(self) -> None:
        while True:
            await self.clock.sleep(self.seconds / 3)
            await self.hold()

    async def hold(self) -> bool:
        """Take the lease if it is free or expired, renew it if this replica holds it;
        returns whether this replica leads now."""
        now = self.clock.now()
        until = now + timedelta(seconds=self.seconds)
        try:
            await self.db.leases.update_one(
                {"_id": self.name, "$or": [{"owner": self.owner}, {"expires_at": {"$lte": now}}]},
                {"$set": {"owner": self.owner, "expires_at": until}},
                upsert=True,
            )
            held = True
        except DuplicateKeyError:  # another replica holds it
            held = False
        except PyMongoError as exc:
            # Unknown: keep what we believed. If our lease runs out meanwhile another replica
            # may lead too, which the unique index makes harmless.
            log.warning("leadership_renewal_failed", lease=self.name, error=type(exc).__name__)
            return self.held
        if held and not self.held:
            log.info("leadership_acquired", lease=self.name, replica=self.owner)
            self.held = True
            if self.on_gain is not None:
                self.on_gain()
        elif not held and self.held:
            log.warning("leadership_lost", lease=self.name, replica=self.owner)
        self.held = held
        return held
