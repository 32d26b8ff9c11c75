"""The scheduler goes first: while it is behind, the job runners start nothing new.

Recording each fire on time is a promise the scheduler makes (fire lag under a second); a
backup that starts a few seconds later breaks none. But when the database is what limits
(the embedded one serves every connection from one core), the runners of every replica ask
it for as much as their running jobs need, and the scheduler's writes wait in line behind
theirs, and the fires fall behind (docs/scheduling.md has the figures).

So a scheduler that finds fires due for longer than ``BEHIND_SECONDS`` says so in the
database: one document, ``leases/scheduler_behind``, whose ``until`` is ``HOLD_SECONDS``
ahead, renewed while the scheduler stays behind. Every runner reads it (by ``_id``) before
each claim pass and claims nothing until then: the jobs running go on, none starts, and the
database's load falls within a job's length. The notice lapses by itself, so a scheduler
that dies holds no runner back for longer than ``HOLD_SECONDS``; and while it lasts, a
runner starts one job every ``MAX_YIELD_SECONDS`` (a database too slow for the fires alone
must not stop every backup, and a burst of claims each time would deepen the backlog).

Holding new claims leaves the jobs already running, and they are the load: three replicas
each claiming its whole ``RUNNER_CONCURRENCY`` the moment the notice lapses put the scheduler
behind again at once. So each runner also keeps a :class:`ClaimWindow`, how many jobs it
drives at most right now: it starts at ``START_JOBS``, opens by ``GROWTH_PER_SECOND`` while
it is full and no scheduler is behind, and halves each time one is (additive increase,
multiplicative decrease, as TCP shares a link): the replicas together settle near what the
database can take beside the scheduler, whatever their number, instead of each swinging
between nothing and everything.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from backup.database import Database

DOC_ID = "scheduler_behind"
BEHIND_SECONDS = 0.5  # a due fire older than this: the scheduler is behind
HOLD_SECONDS = 2.0  # how long one notice holds the runners back
MAX_YIELD_SECONDS = 10.0  # while held back, a runner starts one job this often
START_JOBS = 4  # a runner's window at first (the default concurrency: no slower by default)
GROWTH_PER_SECOND = 1.0  # a full window opens by this many jobs a second


async def announce_behind(store: Database, *, at: datetime, replica: str) -> datetime:
    """The scheduler of ``replica`` is behind at ``at``: runners wait until the time returned."""
    until = at + timedelta(seconds=HOLD_SECONDS)
    await store.leases.update_one(
        {"_id": DOC_ID}, {"$set": {"until": until, "by": replica}}, upsert=True
    )
    return until


async def yield_until(store: Database, at: datetime) -> datetime | None:
    """Until when runners should claim nothing (a scheduler is behind), or None."""
    doc = await store.leases.find_one({"_id": DOC_ID}, {"until": 1})
    until = doc.get("until") if doc else None
    return until if until is not None and until > at else None


class ClaimWindow:
    """How many jobs one runner may drive at once right now, at most ``limit``
    (``RUNNER_CONCURRENCY``). See the module's notes."""

    def __init__(self, limit: int, *, start: float = START_JOBS) -> None:
        self.limit = limit
        self.size = float(max(1, min(limit, start)))
        self._since: datetime | None = None  # when it was last opened or halved
        self._full = False  # a claim pass since then had less room than jobs to claim

    @property
    def jobs(self) -> int:
        """Jobs the runner may drive at once now."""
        return int(self.size)

    def filled(self) -> None:
        """A claim pass found less room in the window than jobs to claim (or none)."""
        self._full = True

    def open(self, at: datetime) -> None:
        """No scheduler is behind at ``at``: open the window for the time since the last
        call if it was full meanwhile (a window not in use has shown nothing about the
        database, so it does not grow while idle)."""
        if self._full and self._since is not None and at > self._since:
            grown = GROWTH_PER_SECOND * (at - self._since).total_seconds()
            self.size = min(float(self.limit), self.size + grown)
        self._since, self._full = at, False

    def halve(self, at: datetime) -> None:
        """A scheduler is behind at ``at``: half as many jobs from now on (at least one)."""
        self.size = max(1.0, self.size / 2)
        self._since, self._full = at, False
