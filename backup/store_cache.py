"""Object stores kept open across jobs, for the runner's checks of uploaded objects."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass

from backup import destinations
from backup.restore_points import StoreOpener
from storage import ObjectStore


@dataclass
class _OpenStore:
    store: ObjectStore
    users: int = 0
    broken: bool = False


class StoreCache:
    """Object stores kept open across jobs, one per distinct destination settings
    (credentials included, in memory only), for the runner's checks of uploaded objects.

    Opening a store builds a storage client: on S3 that costs milliseconds of CPU (botocore
    reads its service models), spent on the event loop that the replica's scheduler shares,
    once per backup. Reused, it costs one request. Bounded: beyond ``size`` the least
    recently used store not in use is closed. A store whose use raised is closed once free
    and never handed out again, so a broken connection is not kept."""

    def __init__(self, opener: StoreOpener, size: int = 16) -> None:
        self.opener = opener
        self.size = size
        self._open: OrderedDict[str, _OpenStore] = OrderedDict()
        self.opened = 0  # stores opened since start (for tests and benchmarks)

    @staticmethod
    def key(settings: destinations.AnySettings) -> str:
        fields = settings.model_dump(mode="json")
        fields.update(destinations.sealed_secret(settings))  # a Swift application credential's too
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    @contextlib.asynccontextmanager
    async def use(self, settings: destinations.AnySettings) -> AsyncIterator[ObjectStore]:
        key = self.key(settings)
        entry = self._open.get(key)
        if entry is None:
            entry = self._open[key] = _OpenStore(self.opener(settings))
            self.opened += 1
        self._open.move_to_end(key)
        entry.users += 1
        try:
            yield entry.store
        except BaseException:
            entry.broken = True
            raise
        finally:
            entry.users -= 1
            if entry.broken:
                if self._open.get(key) is entry:
                    del self._open[key]  # never handed out again
                if entry.users == 0:
                    await _close_store(entry.store)
            await self._trim()

    async def _trim(self) -> None:
        for key, entry in list(self._open.items()):  # least recently used first
            if len(self._open) <= self.size:
                return
            if entry.users == 0 and self._open.get(key) is entry:
                del self._open[key]
                await _close_store(entry.store)

    async def close(self) -> None:
        entries = list(self._open.values())
        self._open.clear()
        for entry in entries:
            await _close_store(entry.store)


async def _close_store(store: ObjectStore) -> None:
    with contextlib.suppress(Exception):
        await store.aclose()
