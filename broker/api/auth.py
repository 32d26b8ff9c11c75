"""Who may do what on the backup-manager API.

- Users: a bearer JWT from UAA or any OIDC issuer, checked against the issuer's published keys
  (JWKS, cached, refetched on an unknown ``kid`` at most every ``jwks_min_refresh_seconds``).
  On Cloud Foundry the Cloud Controller says what the user may do with an instance
  (``read`` for GET, ``manage`` for every change); its answer is cached briefly. A token with
  the operator scope may act on every instance.
- Applications: ``Bearer bmk_...`` binding keys, valid for their own instance only.
- Brokers and operators: HTTP Basic with the broker credentials.

A caller never learns whether an instance it may not see exists: both answer the same 404.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import jwt
import structlog
from aiohttp import web

from backup.database import Database, Document
from backup.instances import LIVE_STATES
from broker.api.settings import ApiSettings
from broker.config import Settings
from broker.errors import ApiError
from broker.throttling import LoginGuard

log = structlog.get_logger(__name__)

_ALGORITHMS = ("RS256", "ES256")
_CHALLENGE = 'Bearer realm="backup-manager", Basic realm="backup-manager"'
_CACHE_MAX = 10_000
_TOKEN_CACHE_SECONDS = 60.0
"""How long a verified bearer token is taken without checking its signature again (never
beyond its expiry): verifying costs about a millisecond of CPU per request."""


@dataclass(frozen=True, slots=True)
class Principal:
    kind: str  # "broker" | "operator" | "user" | "binding"
    subject: str
    token: str | None = None
    instance_id: str | None = None  # bindings: the one instance the key is for


_PRINCIPAL = web.RequestKey("api_principal", Principal)
"""The caller :meth:`Authorizer.authorize` let in, for checks of a second instance."""


def unauthenticated(description: str) -> ApiError:
    return ApiError(401, "unauthorized", description, headers={"WWW-Authenticate": _CHALLENGE})


def instance_not_found(instance_id: str) -> ApiError:
    return ApiError(
        404,
        "instance_not_found",
        f"There is no service instance {instance_id[:100]!r} that you may access.",
    )


def _keys_unavailable() -> ApiError:
    return ApiError(
        503,
        "identity_provider_unavailable",
        "The token issuer's signing keys cannot be fetched; retry later.",
    )


class Jwks:
    """The issuer's signing keys, fetched with aiohttp and cached."""

    def __init__(self, api: ApiSettings, http: aiohttp.ClientSession) -> None:
        self.api, self.http = api, http
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        self._url: str | None = api.oidc_jwks_url

    async def _discover(self) -> str:
        assert self.api.oidc_issuer
        issuer = self.api.oidc_issuer.rstrip("/")
        parts = urlsplit(issuer)
        candidates = [f"{issuer}/.well-known/openid-configuration"]
        root = f"{parts.scheme}://{parts.netloc}/.well-known/openid-configuration"
        if root not in candidates:
            candidates.append(root)  # UAA: issuer .../oauth/token, discovery at the root
        for url in candidates:
            try:
                async with self.http.get(url) as response:
                    if response.status == 200:
                        doc = await response.json(content_type=None)
                        jwks_uri = doc.get("jwks_uri") if isinstance(doc, dict) else None
                        if isinstance(jwks_uri, str):
                            return jwks_uri
            except (aiohttp.ClientError, TimeoutError, ValueError):
                continue
        raise ApiError(
            503,
            "identity_provider_unavailable",
            "The token issuer's keys cannot be found (no OpenID discovery document); retry "
            "later, or configure OIDC_JWKS_URL.",
        )

    async def _fetch(self) -> None:
        if self._url is None:
            self._url = await self._discover()
        try:
            async with self.http.get(self._url) as response:
                response.raise_for_status()
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            log.warning("jwks_fetch_failed", url=self._url)
            if self._keys:
                return  # keep the keys we have until the issuer answers again
            raise _keys_unavailable() from None
        keys: dict[str, jwt.PyJWK] = {}
        for index, data in enumerate(body.get("keys") or [] if isinstance(body, dict) else []):
            try:
                key = jwt.PyJWK(data)
            except (jwt.PyJWKError, jwt.InvalidKeyError, KeyError, TypeError, ValueError):
                continue
            keys[str(data.get("kid") or f"#{index}")] = key
        self._keys = keys
        log.info("jwks_fetched", url=self._url, keys=len(keys))

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The key ``kid`` names. The key set is fetched on first use, again when it is older
        than ``jwks_max_age_seconds`` (keys the issuer retired stop working), and on an unknown
        ``kid`` (the issuer rotated keys) at most every ``jwks_min_refresh_seconds``, so forged
        kids cannot make us hammer the issuer."""
        found = self._lookup(kid)
        if found is not None and not self._stale():
            return found
        async with self._lock:
            found = self._lookup(kid)
            since = time.monotonic() - self._fetched_at
            if self._stale() or (found is None and since >= self.api.jwks_min_refresh_seconds):
                self._fetched_at = time.monotonic()
                await self._fetch()
                found = self._lookup(kid)
            elif found is None and not self._keys:
                raise _keys_unavailable()
        return found

    def still_current(self, kid: str | None, key: jwt.PyJWK) -> bool:
        """Whether ``key`` is still what ``kid`` names in a key set not yet too old (a token
        verified with it earlier may be taken again)."""
        return not self._stale() and self._lookup(kid) is key

    def _stale(self) -> bool:
        return time.monotonic() - self._fetched_at >= self.api.jwks_max_age_seconds

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)


class Authorizer:
    """Authenticates requests and answers what a principal may do with an instance."""

    def __init__(self, settings: Settings, api: ApiSettings, store: Database) -> None:
        self.settings, self.api, self.db = settings, api, store
        self.http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=api.http_timeout_seconds)
        )
        self.jwks = Jwks(api, self.http)
        self._permissions: dict[tuple[str, str], tuple[float, bool, bool]] = {}
        self._verified: dict[bytes, tuple[float, Principal, str | None, jwt.PyJWK]] = {}
        """sha256 of a verified bearer token -> (until when, by the wall clock; its principal;
        the kid and key it was verified with)."""

    async def close(self) -> None:
        await self.http.close()

    # --- who is calling --------------------------------------------------------------------

    async def authenticate(self, request: web.Request) -> Principal:
        """The caller, or 401; 429 once an address (or a Basic user name) has failed too
        often (broker.throttling). A request without credentials is not a failed login."""
        header = request.headers.get("Authorization", "")
        if not header:
            raise unauthenticated("Send credentials: a bearer token or HTTP Basic.")
        guard = LoginGuard(request, _basic_user(header), self._accounts())
        guard.check()
        try:
            principal = await self._authenticate(header)
        except ApiError as err:
            if err.status == 401:
                guard.failed()
            raise
        guard.succeeded()
        return principal

    def _accounts(self) -> tuple[str, ...]:
        names = [self.settings.broker_username]
        if self.api.operator_username:
            names.append(self.api.operator_username)
        return tuple(names)

    async def _authenticate(self, header: str) -> Principal:
        scheme, _, credentials = header.partition(" ")
        credentials = credentials.strip()
        if not header.isascii() or len(header) > 16384:
            raise unauthenticated("The Authorization header is malformed.")
        if scheme.lower() == "basic":
            return self._basic(credentials)
        if scheme.lower() == "bearer" and credentials:
            if credentials.startswith("bmk_"):
                return await self._binding(credentials)
            return await self._jwt(credentials)
        raise unauthenticated("Unsupported Authorization scheme; use Bearer or Basic.")

    def _basic(self, credentials: str) -> Principal:
        try:
            user, sep, password = (
                base64.b64decode(credentials, validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise unauthenticated("Malformed HTTP Basic credentials.") from None
        accounts = [("broker", self.settings.broker_username, self.settings.broker_password)]
        if self.api.operator_username and self.api.operator_password:
            accounts.append(("operator", self.api.operator_username, self.api.operator_password))
        for kind, name, secret in accounts:
            # Compare both in constant time whatever matches, so timing tells nothing.
            ok_user = hmac.compare_digest(user.encode(), name.encode())
            ok_password = secret is not None and hmac.compare_digest(
                password.encode(), secret.get_secret_value().encode()
            )
            if sep and ok_user and ok_password:
                return Principal(kind, user)
        raise unauthenticated("Wrong user name or password.")

    async def _binding(self, key: str) -> Principal:
        digest = hashlib.sha256(key.encode()).hexdigest()
        binding = await self.db.bindings.find_one(
            {"key_hash": digest}, {"instance_id": 1, "state": 1}
        )
        if binding is None or binding.get("state") == "deleted":
            raise unauthenticated("This binding key is not valid (unknown or unbound).")
        return Principal("binding", str(binding["_id"]), instance_id=binding.get("instance_id"))

    async def _jwt(self, token: str) -> Principal:
        if not self.api.oidc_issuer:
            raise unauthenticated("Bearer tokens are not accepted: no token issuer configured.")
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._verified.get(digest)
        if (
            cached is not None
            and cached[0] > time.time()
            and self.jwks.still_current(cached[2], cached[3])
        ):
            return cached[1]
        principal, expires, kid, key = await self._verify_jwt(token)
        if len(self._verified) >= _CACHE_MAX:
            now = time.time()
            self._verified = {k: v for k, v in self._verified.items() if v[0] > now}
            if len(self._verified) >= _CACHE_MAX:
                self._verified.clear()
        until = min(expires + self.api.jwt_leeway_seconds, time.time() + _TOKEN_CACHE_SECONDS)
        self._verified[digest] = (until, principal, kid, key)
        return principal

    async def _verify_jwt(self, token: str) -> tuple[Principal, float, str | None, jwt.PyJWK]:
        """The token's principal, expiry (epoch seconds), and the kid and key that verified
        it, once its signature and claims are checked."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise unauthenticated("The bearer token is malformed.") from None
        alg = header.get("alg")
        if alg not in _ALGORITHMS:
            raise unauthenticated("The bearer token must be signed with RS256 or ES256.")
        kid = header.get("kid") if isinstance(header.get("kid"), str) else None
        key = await self.jwks.key(kid)
        if key is None:
            raise unauthenticated("The bearer token was signed with an unknown key.")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                audience=self.api.oidc_audience,
                issuer=self.api.oidc_issuer,
                leeway=self.api.jwt_leeway_seconds,
                options={
                    "require": ["exp", "iss"],
                    "verify_aud": self.api.oidc_audience is not None,
                },
            )
        except jwt.ExpiredSignatureError:
            raise unauthenticated("The bearer token has expired; get a new one.") from None
        except jwt.InvalidTokenError as exc:
            raise unauthenticated(f"The bearer token is not valid: {exc}.") from None
        subject = str(claims.get("user_id") or claims.get("sub") or claims.get("client_id") or "")
        if not subject:
            raise unauthenticated("The bearer token names no subject.")
        expires = float(claims["exp"])  # required, and checked as a number by PyJWT
        if self.api.operator_scope and self.api.operator_scope in _scopes(claims):
            return Principal("operator", subject, token=token), expires, kid, key
        return Principal("user", subject, token=token), expires, kid, key

    # --- what it may do --------------------------------------------------------------------

    async def permissions(self, principal: Principal, instance_id: str) -> tuple[bool, bool]:
        """(read, manage) of ``principal`` on ``instance_id``."""
        if principal.kind in ("broker", "operator"):
            return True, True
        if principal.kind == "binding":
            ok = principal.instance_id == instance_id
            return ok, ok
        if not self.api.cloud_controller_url or principal.token is None:
            return False, False
        cache_key = (principal.subject, instance_id)
        cached = self._permissions.get(cache_key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1], cached[2]
        read, manage = await self._ask_cloud_controller(principal.token, instance_id)
        if len(self._permissions) >= _CACHE_MAX:
            self._permissions = {k: v for k, v in self._permissions.items() if v[0] > now}
            if len(self._permissions) >= _CACHE_MAX:
                self._permissions.clear()
        self._permissions[cache_key] = (now + self.api.permission_cache_seconds, read, manage)
        return read, manage

    async def _ask_cloud_controller(self, token: str, instance_id: str) -> tuple[bool, bool]:
        assert self.api.cloud_controller_url
        url = (
            f"{self.api.cloud_controller_url.rstrip('/')}/v3/service_instances/"
            f"{quote(instance_id, safe='')}/permissions"
        )
        try:
            headers = {"Authorization": f"Bearer {token}"}
            async with self.http.get(url, headers=headers) as response:
                if response.status == 401:
                    raise unauthenticated("The Cloud Controller refused the bearer token.")
                if response.status in (403, 404):
                    return False, False
                response.raise_for_status()
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            log.warning("cloud_controller_unavailable", instance_id=instance_id)
            raise ApiError(
                503,
                "authorization_unavailable",
                "The Cloud Controller cannot be asked about your permissions; retry later.",
            ) from None
        if not isinstance(body, dict):
            return False, False
        return body.get("read") is True, body.get("manage") is True

    def require_operator(self, principal: Principal) -> None:
        """Platform-wide operations (the fleet's protection, the whole audit trail): only the
        broker's or operator's credentials and tokens with the operator scope; 403 for users
        and binding keys, whatever instances they may see."""
        if principal.kind not in ("broker", "operator"):
            raise ApiError(
                403,
                "forbidden",
                "Only operators may use this platform-wide operation; use your instance's own "
                "endpoints (/v1/service_instances/{id}/...), or ask an operator.",
            )

    async def authorize(self, request: web.Request, instance_id: str, manage: bool) -> Document:
        """The live instance if the caller may act on it, else 401/403/404."""
        principal = await self.authenticate(request)
        request[_PRINCIPAL] = principal
        return await self.instance_for(principal, instance_id, manage)

    async def authorize_also(self, request: web.Request, instance_id: str) -> Document:
        """A second instance the request changes (a restore's target), for the caller that
        :meth:`authorize` already let in: the live instance if it may manage it, the same 404
        as an unknown one if it may not see it, 403 if it may only read it."""
        principal = request.get(_PRINCIPAL)
        if principal is None:
            principal = await self.authenticate(request)
        return await self.instance_for(
            principal,
            instance_id,
            True,
            forbidden="You may read the target instance's backups but not change them, so "
            "you may not restore into it; ask a space developer or manager.",
        )

    async def instance_for(
        self,
        principal: Principal,
        instance_id: str,
        manage: bool,
        *,
        forbidden: str = "You may read this instance's backups but not change them; ask a "
        "space developer or manager.",
    ) -> Document:
        """The live instance if ``principal`` may read it (and manage it, if ``manage``);
        404 when it may not see it or there is none (never telling which), else 403."""
        if len(instance_id) > 256:
            raise instance_not_found(instance_id)
        may_read, may_manage = await self.permissions(principal, instance_id)
        if not may_read:
            raise instance_not_found(instance_id)
        instance = await self.db.instances.find_one(
            {"_id": instance_id, "state": {"$in": list(LIVE_STATES)}}
        )
        if instance is None:
            raise instance_not_found(instance_id)
        if manage and not may_manage:
            raise ApiError(403, "forbidden", forbidden)
        return instance


def _basic_user(header: str) -> str | None:
    """The user name of an HTTP Basic header, if it has a readable one."""
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "basic" or not header.isascii() or len(header) > 16384:
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    user, sep, _ = decoded.partition(":")
    return user[:256] if sep else None


def _scopes(claims: dict[str, Any]) -> set[str]:
    out: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            out.update(value.split())
        elif isinstance(value, list):
            out.update(v for v in value if isinstance(v, str))
    return out


AUTHORIZER = web.AppKey("api_authorizer", Authorizer)
