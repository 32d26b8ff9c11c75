"""The egress policy: which addresses the service may connect to on a tenant's behalf.

Tenants name the hosts of their destinations (S3 endpoints, Swift auth URLs and the storage
URLs their auth service hands out) and of their agents. Without a check they could point the
service at its own loopback, at the cloud's metadata service or at anything else only the
service can reach. :class:`EgressPolicy` says which addresses are allowed (``allow`` networks,
empty meaning all) and which are not (``deny`` networks); the clients below resolve a name
once, keep only allowed addresses and connect to exactly those (a name that resolves to an
allowed address first and a denied one later cannot slip through: there is no second lookup).

- aiohttp (aiobotocore for S3, the agent sessions): :class:`EgressResolver`, a resolver that
  refuses, plus :meth:`EgressPolicy.socket_factory` for hosts written as IP addresses, which
  aiohttp does not resolve.
- requests (swiftclient, keystoneauth1): :func:`guard_session` mounts :class:`EgressAdapter`,
  whose connections resolve, check and connect to the checked address while TLS (SNI and the
  certificate check) still uses the host name.

Nothing in here follows a redirect; the clients are configured not to either. The policy is
process-wide (:func:`install`): the manager installs one from its settings; without one (the
agent, tools) nothing is checked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import aiohttp
import requests
import requests.adapters
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError as Urllib3ConnectTimeout
from urllib3.exceptions import NameResolutionError, NewConnectionError

from storage._clients import AIOHTTPSession
from storage.base import EgressDenied

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DENY_SETTING = "EGRESS_DENY_NETWORKS"
ALLOW_SETTING = "EGRESS_ALLOW_NETWORKS"

DEFAULT_DENY: tuple[str, ...] = (
    "127.0.0.0/8",  # loopback
    "::1/128",
    "169.254.0.0/16",  # link-local, with the cloud metadata service 169.254.169.254
    "fe80::/10",
    "fd00:ec2::254/128",  # the metadata service over IPv6 (AWS)
    "0.0.0.0/8",  # "this host": 0.0.0.0 reaches the loopback on Linux
    "::/128",
    "224.0.0.0/4",  # multicast
    "ff00::/8",
    "255.255.255.255/32",  # broadcast
)

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def normalise(address: str | Address) -> Address:
    """The address as connected to: an IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) is the
    IPv4 address it carries; a zone (``fe80::1%eth0``) is dropped."""
    if isinstance(address, str):
        address = ipaddress.ip_address(address.split("%", 1)[0].strip("[]"))
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            address = ipaddress.IPv6Address(int(address))
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
    return address


def _network(text: str) -> Network:
    net = ipaddress.ip_network(text, strict=False)
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
        # ::ffff:10.0.0.0/104 means 10.0.0.0/8: addresses are compared once normalised.
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


DEFAULT_DENY_NETWORKS: tuple[Network, ...] = tuple(_network(n) for n in DEFAULT_DENY)


def parse_networks(text: str, setting: str = "") -> tuple[Network, ...]:
    """Comma-separated CIDRs (a bare address is one host); ``ValueError`` naming the entry
    (and ``setting``)."""
    nets = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            nets.append(_network(item))
        except ValueError:
            where = f"{setting}: " if setting else ""
            raise ValueError(f"{where}{item!r} is not a network such as 10.0.0.0/8") from None
    return tuple(nets)


def networks_except(base: Iterable[str], *addresses: str) -> list[str]:
    """``base`` networks minus ``addresses``: e.g. the default deny list except 127.0.0.1, for
    a manager whose own agents or storage listen on that one loopback address."""
    nets = [_network(n) for n in base]
    for text in addresses:
        hole = _network(text)
        nets = [part for net in nets for part in _without(net, hole)]
    return [str(n) for n in ipaddress.collapse_addresses(n for n in nets if n.version == 4)] + [
        str(n) for n in ipaddress.collapse_addresses(n for n in nets if n.version == 6)
    ]


def _without(net: Network, hole: Network) -> list[Network]:
    """``net`` less the addresses of ``hole`` (``net`` whole if they are of two families)."""
    if isinstance(net, ipaddress.IPv4Network) and isinstance(hole, ipaddress.IPv4Network):
        return list(_exclude(net, hole))
    if isinstance(net, ipaddress.IPv6Network) and isinstance(hole, ipaddress.IPv6Network):
        return list(_exclude(net, hole))
    return [net]


_SameFamily = TypeVar("_SameFamily", ipaddress.IPv4Network, ipaddress.IPv6Network)


def _exclude(net: _SameFamily, hole: _SameFamily) -> list[_SameFamily]:
    if hole.subnet_of(net):
        return list(net.address_exclude(hole))
    if net.subnet_of(hole):
        return []
    return [net]


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    """Allowed: in ``allow`` (or ``allow`` empty) and in no ``deny`` network."""

    deny: tuple[Network, ...] = DEFAULT_DENY_NETWORKS
    allow: tuple[Network, ...] = ()

    @classmethod
    def from_settings(cls, deny: str | None, allow: str | None) -> EgressPolicy:
        """From the two settings' text: ``deny=None`` is the default list, ``""`` none."""
        return cls(
            deny=DEFAULT_DENY_NETWORKS if deny is None else parse_networks(deny, DENY_SETTING),
            allow=parse_networks(allow or "", ALLOW_SETTING),
        )

    def refused_by(self, address: str | Address) -> str | None:
        """The setting that refuses ``address``, or None when it is allowed."""
        ip = normalise(address)
        if self.allow and not any(ip in net for net in self.allow):
            return ALLOW_SETTING
        if any(ip in net for net in self.deny):
            return DENY_SETTING
        return None

    def allows(self, address: str | Address) -> bool:
        return self.refused_by(address) is None

    def check(self, host: str, address: str | Address) -> None:
        """:class:`EgressDenied` unless ``address`` (that of ``host``) is allowed."""
        setting = self.refused_by(address)
        if setting is not None:
            raise denied(host, setting)

    def filter(self, host: str, addresses: Sequence[str]) -> list[str]:
        """The allowed ones of ``host``'s ``addresses``; :class:`EgressDenied` when none is."""
        kept = [a for a in addresses if self.allows(a)]
        if not kept and addresses:
            raise denied(host, self.refused_by(addresses[0]) or DENY_SETTING)
        return kept

    def resolve(self, host: str, port: int) -> list[tuple[Any, ...]]:
        """``getaddrinfo`` of ``host`` (TCP), allowed addresses only; ``socket.gaierror`` when
        the name does not resolve, :class:`EgressDenied` when none of its addresses is
        allowed."""
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
        kept = set(self.filter(host, [str(i[4][0]) for i in infos]))
        return [i for i in infos if str(i[4][0]) in kept]

    async def check_url(self, url: str) -> None:
        """Resolve the host of ``url`` and refuse it before any connection when none of its
        addresses is allowed (a name that does not resolve is left to the client to report)."""
        parts = urlsplit(url)
        host = parts.hostname
        if not host:
            return
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return  # the client reports the bad port
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return
        self.filter(parts.hostname or host, [str(i[4][0]) for i in infos])

    def socket_factory(self, addr_info: tuple[Any, ...]) -> socket.socket:
        """For aiohttp's ``TCPConnector(socket_factory=...)``: the last word on an address,
        including hosts written as IP addresses, which aiohttp does not hand to a resolver."""
        family, type_, proto, _, sockaddr = addr_info
        self.check(str(sockaddr[0]), str(sockaddr[0]))
        return socket.socket(family=family, type=type_, proto=proto)


def literal_refusal(url: str) -> EgressDenied | None:
    """The refusal of ``url`` by the policy in force when its host is written as an IP address
    (known without a lookup, so it can be refused while the request is checked); else None."""
    policy = installed()
    try:
        host = urlsplit(url).hostname
        setting = policy.refused_by(host) if policy is not None and host else None
    except ValueError:
        return None  # a name, or not a URL: left to the connection
    return denied(host, setting) if host and setting else None


def refusal_in(exc: BaseException | None) -> EgressDenied | None:
    """The :class:`EgressDenied` a client wrapped on its way up (aiobotocore wraps what the
    resolver raised in ``HTTPClientError(error=...)``), if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, EgressDenied):
            return exc
        seen.add(id(exc))
        kwargs = getattr(exc, "kwargs", None)
        inner = kwargs.get("error") if isinstance(kwargs, dict) else None
        exc = inner if isinstance(inner, BaseException) else (exc.__cause__ or exc.__context__)
    return None


def denied(host: str, setting: str) -> EgressDenied:
    why = (
        f"its address is in none of the networks of {ALLOW_SETTING}"
        if setting == ALLOW_SETTING
        else f"its address is in a network denied by {DENY_SETTING}"
    )
    return EgressDenied(
        f"The manager does not connect to {host} on a tenant's behalf: {why}. An operator can "
        f"allow it through {setting}.",
        host=host,
        setting=setting,
    )


# ---------------------------------------------------------------------- the process's policy

_installed: EgressPolicy | None = None


def install(policy: EgressPolicy | None) -> EgressPolicy | None:
    """Make ``policy`` the one every store and agent session checks from now on (None: no
    check); returns the one it replaces."""
    global _installed
    previous, _installed = _installed, policy
    return previous


def installed() -> EgressPolicy | None:
    return _installed


# ---------------------------------------------------------------------- aiohttp


class EgressResolver(AbstractResolver):
    """aiohttp's default resolver, keeping only the addresses the policy allows."""

    def __init__(self, policy: EgressPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        kept = set(self.policy.filter(host, [r["host"] for r in results]))
        return [r for r in results if r["host"] in kept]

    async def close(self) -> None:
        await self._inner.close()


def connector_args(policy: EgressPolicy | None) -> dict[str, Any]:
    """Keyword arguments of an ``aiohttp.TCPConnector`` that enforces ``policy``."""
    if policy is None:
        return {}
    return {"resolver": EgressResolver(policy), "socket_factory": policy.socket_factory}


# ---------------------------------------------------------------------- aiobotocore


class _NoRedirects:
    """An aiohttp session whose requests never follow a redirect."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    def request(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["allow_redirects"] = False
        return self._session.request(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


class NoRedirectAIOHTTPSession(AIOHTTPSession):
    """aiobotocore's HTTP session (``AioConfig(http_session_cls=...)``), except that a 3xx
    answer is handed to botocore as it is (an error) instead of being followed with the
    request's signed headers."""

    async def _get_session(self, proxy_url: str | None) -> aiohttp.ClientSession:
        session = await super()._get_session(proxy_url)
        # aiobotocore only sends requests through (and closes) the session it gets here: the
        # wrapper, which passes everything else on, stands in for it.
        return cast(aiohttp.ClientSession, _NoRedirects(session))


def no_region_redirect(context: dict[str, Any], **_: Any) -> None:
    """A ``before-call.s3`` handler: botocore's S3 region redirector sends a request again,
    to an endpoint built from the region a 301/302/307 answer names; marking the request as
    already redirected makes such an answer an error instead."""
    redirect = context.get("s3_redirect")
    if isinstance(redirect, dict):
        redirect["redirected"] = True


# ---------------------------------------------------------------------- requests / urllib3


class _Checked(HTTPConnection):
    """urllib3's connection, except that it resolves once, checks the address against its
    ``policy`` and connects to that address (put before ``HTTPSConnection`` for TLS)."""

    policy: EgressPolicy

    def _new_conn(self) -> socket.socket:
        try:
            infos = self.policy.resolve(self.host, self.port)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        error: OSError | None = None
        for family, type_, proto, _, sockaddr in infos:
            sock = None
            try:
                sock = socket.socket(family, type_, proto)
                for opt in self.socket_options or ():
                    sock.setsockopt(*opt)
                if isinstance(self.timeout, int | float):  # else a default sentinel
                    sock.settimeout(self.timeout)
                if self.source_address:
                    sock.bind(self.source_address)
                sock.connect(sockaddr)
                return sock
            except TimeoutError as exc:
                if sock is not None:
                    sock.close()
                raise Urllib3ConnectTimeout(
                    self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})"
                ) from exc
            except OSError as exc:
                if sock is not None:
                    sock.close()
                error = exc
        raise NewConnectionError(self, f"Failed to establish a new connection: {error}")


def _pools(policy: EgressPolicy) -> dict[str, type[HTTPConnectionPool]]:
    http = type("EgressHTTPConnection", (_Checked, HTTPConnection), {"policy": policy})
    https = type("EgressHTTPSConnection", (_Checked, HTTPSConnection), {"policy": policy})
    return {
        "http": type("EgressHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http}),
        "https": type("EgressHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https}),
    }


class EgressAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter whose connections are checked by ``policy`` (see :class:`_Checked`)."""

    def __init__(self, policy: EgressPolicy, **kwargs: Any) -> None:
        self.policy = policy
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _pools(self.policy)

    def __setstate__(self, state: dict[str, Any]) -> None:  # pragma: no cover - pickling
        self.policy = state.pop("policy", installed() or EgressPolicy())
        # types-requests does not declare HTTPAdapter.__setstate__, which requests defines.
        super().__setstate__(state)  # type: ignore[misc]


def guard_session(session: requests.Session, policy: EgressPolicy | None) -> requests.Session:
    """``session`` made to follow no redirect, ignore proxies and credentials from the
    environment (``.netrc`` would hand them to a tenant's host), and connect only where
    ``policy`` allows (when given)."""
    session.max_redirects = 0
    session.trust_env = False
    if policy is not None:
        for prefix in ("http://", "https://"):
            session.mount(prefix, EgressAdapter(policy))
    return session


def _main(argv: list[str]) -> int:
    """``python -m storage.egress except 127.0.0.1``: the default deny list without those
    addresses, as a value of EGRESS_DENY_NETWORKS."""
    if argv[:1] != ["except"]:
        print(__doc__.split("\n\n", 1)[0], "\nusage: python -m storage.egress except ADDRESS...")
        return 2
    print(",".join(networks_except(DEFAULT_DENY, *argv[1:])))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))

__all__ = [
    "ALLOW_SETTING",
    "DEFAULT_DENY",
    "DENY_SETTING",
    "EgressAdapter",
    "EgressDenied",
    "EgressPolicy",
    "EgressResolver",
    "connector_args",
    "guard_session",
    "install",
    "installed",
    "networks_except",
    "normalise",
    "parse_networks",
]
