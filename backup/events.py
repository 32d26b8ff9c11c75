"""Notifications between the domain and a replica's background loops.

The domain fires them after a committed write (a plan created, changed or deleted; a job
queued) so that this replica's scheduler and job runner react at once instead of on their next
poll. They are hints only: other replicas learn of the same changes from the database, and a
missed notification costs latency, never correctness.

They belong to one database handle (:attr:`backup.database.Database.events`), as a session's
events do in an ORM: the writes made through a handle wake the loops that read through it,
and two applications in one process (the tests run several) never wake each other.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


class Signal:
    """A set of callbacks, each called with no argument. A failing callback is logged and
    skipped: the write that fired it has been committed and must not be reported as failed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._listeners: list[Callable[[], None]] = []

    def connect(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def disconnect(self, listener: Callable[[], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def fire(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                log.exception("event_listener_failed", signal=self.name)


class Events:
    """The signals of one application."""

    def __init__(self) -> None:
        self.plans_changed = Signal("plans_changed")
        """A plan was created, changed (frequency, time zone, paused...) or deleted."""
        self.jobs_queued = Signal("jobs_queued")
        """A job was queued (manually, by the scheduler) or asked to cancel."""
        self.jobs_ended = Signal("jobs_ended")
        """A job of this replica's runner ended (its final state is written)."""
