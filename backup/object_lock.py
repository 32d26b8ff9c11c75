"""Restore points on a destination that requires S3 Object Lock (``object_lock``: mode and
margin in days, see :class:`storage.ObjectLock` and docs/storage.md, "Object lock").

Every object of such a point is written locked until its *lock date*: the point's expiry plus
the margin, or, for a retention by count (``FILES``, no expiry known when it is written), its
creation plus the margin. The point records that date as ``locked_until``. Until then nobody,
the manager's own credentials included, can delete its files, so:

- retention leaves it alone (it stays ``available`` and restorable) and deletes it at the
  first sweep after the date;
- a user's ``DELETE`` answers 409 with the date, changing nothing;
- if the storage still refuses (a lock longer than recorded, clocks that disagree), the point
  goes back to ``available`` with the storage's date, never reported as deleted.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from backup.database import Database, Document
from backup.errors import Conflict
from backup.jobs import RestorePointState
from storage import S3Settings, SwiftSettings


def lock_until(settings: S3Settings | SwiftSettings, base: datetime) -> datetime | None:
    """The lock date of objects written now to a destination with ``settings`` for a point
    expiring at ``base`` (its creation if it has no expiry); None: no object lock."""
    lock = settings.object_lock if isinstance(settings, S3Settings) else None
    if lock is None:
        return None
    # Whole seconds (S3 keeps the date to the second), rounded up: never before the expiry.
    base = _aware(base)
    whole = base.replace(microsecond=0) + timedelta(seconds=1 if base.microsecond else 0)
    return whole + timedelta(days=lock.margin_days)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def locked(point: Document, now: datetime) -> datetime | None:
    """The date until which ``point``'s files are locked, if that is still ahead of ``now``."""
    until = point.get("locked_until")
    if isinstance(until, datetime) and _aware(until) > _aware(now):
        return _aware(until)
    return None


def conflict(until: datetime) -> Conflict:
    """The answer to deleting a point whose files are locked."""
    return Conflict(
        f"This restore point's files are locked (S3 Object Lock) until "
        f"{_aware(until).isoformat()}: nobody can delete them before then, so the restore "
        "point is kept; retention deletes it after that date.",
        code="restore_point_locked",
    )


async def keep_locked(store: Database, point_id: str, until: datetime | None) -> None:
    """The storage refused to delete a point's files because of their lock: the point goes
    back to ``available`` (its files are all there) and records until when it is locked."""
    changes: Document = {"state": RestorePointState.AVAILABLE}
    if until is not None:
        changes["locked_until"] = _aware(until)
    await store.restore_points.update_one(
        {"_id": point_id, "state": RestorePointState.DELETING, "shredded_at": {"$exists": False}},
        {"$set": changes},
    )
    if until is not None:
        # A crypto-shredded point (backup/orphans.py) has no key left to restore with: it
        # stays 'deleting', and the sweep deletes its files once the lock lapses.
        await store.restore_points.update_one(
            {"_id": point_id, "shredded_at": {"$exists": True}},
            {"$set": {"locked_until": _aware(until)}},
        )
