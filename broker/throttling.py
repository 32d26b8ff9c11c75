"""Failed logins held back on every way into the service: HTTP Basic on the OSB endpoints and
the API (broker, operator), binding keys and bearer tokens (see :mod:`webguard.throttle`)."""

from __future__ import annotations

import structlog
from aiohttp import web

from broker.context import AUTH_THROTTLE, SETTINGS
from broker.errors import ApiError
from webguard.throttle import client_address, user_label

log = structlog.get_logger(__name__)


class LoginGuard:
    """One login attempt: ``check()`` before the credentials are looked at, then ``failed()``
    or ``succeeded()``. ``user`` is the HTTP Basic user name (None for keys and tokens, which
    count against the address only); ``accounts`` are the configured user names, logged as
    such (any other name only as a hash)."""

    def __init__(
        self, request: web.Request, user: str | None, accounts: tuple[str, ...] = ()
    ) -> None:
        self.throttle = request.app[AUTH_THROTTLE]
        self.address = client_address(request, request.app[SETTINGS].trusted_proxy_hops or 0)
        self.user, self.accounts = user, accounts

    def check(self, error: str = "too_many_attempts") -> None:
        refusal = self.throttle.check(self.address, self.user)
        if refusal is None:
            return
        if refusal.new:
            log.warning(
                "auth_throttled",
                scope=refusal.scope,
                client=self.address,
                retry_after=refusal.retry_after,
                **(user_label(self.user, self.accounts) if self.user is not None else {}),
            )
        whom = "from this address" if refusal.scope == "address" else "for this user name"
        raise ApiError(
            429,
            error,
            f"Too many failed logins {whom}; retry in {refusal.retry_after} seconds.",
            headers={"Retry-After": str(refusal.retry_after)},
        )

    def failed(self) -> None:
        self.throttle.failed(self.address, self.user)

    def succeeded(self) -> None:
        self.throttle.succeeded(self.address, self.user)
