"""Counting failed logins, to hold back password guessing.

A failure counts against the client address and (for HTTP Basic) against the user name. Once
``limit`` failures fall within ``window`` seconds:

- every attempt from that address is held back (429), correct credentials included: an
  answer that told a right password from a wrong one would let the guessing go on;
- attempts for that user name are held back from every address that has not logged in as that
  user successfully in the last day, so that the platform or operator already using the
  account keeps working while an attacker elsewhere guesses its password.

Held-back attempts are not checked and not counted, so the hold lifts ``window`` seconds after
the last counted failure. Memory is bounded: at most ``max_keys`` counters (each at most
``limit`` timestamps) and as many remembered successful logins, the least recently used
forgotten first.

Not the ``limits`` package: its in-memory storage keeps a counter per key until the key's
window expires, with no bound on the number of keys an attacker may create, and the counting
needed here (the last ``limit`` failure times per key) is a few lines.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

KNOWN_FOR_SECONDS = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Refusal:
    """An attempt held back: for how long, why, and whether this hold is new (log it once)."""

    retry_after: int
    scope: str  # "address" | "user"
    new: bool


class _Counter:
    __slots__ = ("failures", "logged_until")

    def __init__(self, limit: int) -> None:
        self.failures: deque[float] = deque(maxlen=limit)
        self.logged_until = float("-inf")


class Throttle:
    def __init__(
        self,
        limit: int,
        window: float,
        *,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit, self.window, self.max_keys, self.clock = limit, window, max_keys, clock
        self._counters: OrderedDict[tuple[str, str], _Counter] = OrderedDict()
        self._known: OrderedDict[tuple[str, str], float] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def check(self, address: str, user: str | None = None) -> Refusal | None:
        """Whether an attempt from ``address`` (as ``user``) must be held back."""
        if not self.enabled:
            return None
        now = self.clock()
        refusal = self._held(("address", address), now)
        if refusal is None and user is not None and not self._is_known(user, address, now):
            refusal = self._held(("user", user), now)
        return refusal

    def failed(self, address: str, user: str | None = None) -> None:
        if not self.enabled:
            return
        now = self.clock()
        self._count(("address", address), now)
        if user is not None:
            self._count(("user", user), now)

    def succeeded(self, address: str, user: str | None = None) -> None:
        if not self.enabled or user is None:
            return
        key = (user, address)
        self._known[key] = self.clock() + KNOWN_FOR_SECONDS
        self._known.move_to_end(key)
        while len(self._known) > self.max_keys:
            self._known.popitem(last=False)

    def _is_known(self, user: str, address: str, now: float) -> bool:
        until = self._known.get((user, address))
        return until is not None and until > now

    def _held(self, key: tuple[str, str], now: float) -> Refusal | None:
        counter = self._counters.get(key)
        if counter is None:
            return None
        failures = counter.failures
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if len(failures) < self.limit:
            return None
        until = failures[0] + self.window
        new = counter.logged_until < now
        if new:
            counter.logged_until = until
        return Refusal(max(1, math.ceil(until - now)), key[0], new)

    def _count(self, key: tuple[str, str], now: float) -> None:
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = _Counter(self.limit)
            while len(self._counters) > self.max_keys:
                self._counters.popitem(last=False)
        else:
            self._counters.move_to_end(key)
        counter.failures.append(now)


def client_address(request: web.BaseRequest, proxy_hops: int = 0) -> str:
    """The address the request came from: the peer, or behind ``proxy_hops`` trusted proxies
    (Cloud Foundry's gorouter: 1), the address the outermost of them saw, which each proxy
    appends to ``X-Forwarded-For`` (entries further left are the client's to choose)."""
    if proxy_hops > 0:
        forwarded = [
            part.strip()
            for header in request.headers.getall("X-Forwarded-For", [])
            for part in header.split(",")
            if part.strip()
        ]
        if forwarded:
            return forwarded[-min(proxy_hops, len(forwarded))][:64]
    return request.remote or "unknown"


def user_label(user: str, known: tuple[str, ...]) -> dict[str, str]:
    """How a user name appears in a log line: as given when it is one of the configured
    accounts, else a short hash (a name typed by mistake may be somebody's password)."""
    if user in known:
        return {"user": user}
    return {"user_sha256": hashlib.sha256(user.encode()).hexdigest()[:16]}
