"""In-process notifications between the domain and a replica's background loops.

The domain fires them after a committed write (a plan created, changed or deleted; a job
queued) so that this replica's scheduler and job runner react at once instead of on their next
poll. They are hints only: other replicas learn of the same changes from the database, and a
missed notification costs latency, never correctness.
"""

from __future__ import annotations

from collections.abc import Callable


class Signal:
    """A set of callbacks, each called with no argument; a failing callback is not the
    writer's problem, so errors are swallowed after being counted."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._listeners: list[Callable[[], None]] = []
        self.errors = 0

    def connect(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def disconnect(self, listener: Callable[[], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def fire(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # a listener must never break a committed write
                self.errors += 1


plans_changed = Signal("plans_changed")
"""A plan was created, changed (frequency, time zone, paused...) or deleted."""

jobs_queued = Signal("jobs_queued")
"""A job was queued (manually, by the scheduler) or asked to cancel."""
