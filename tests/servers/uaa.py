"""A UAA / OIDC stand-in: serves a test key pair's public half the way UAA does
(``/token_keys`` and ``/.well-known/openid-configuration``) and signs tokens with it; exchanges
refresh tokens for access tokens at ``POST /oauth/token`` as UAA does for the ``cf`` CLI; and
signs a user of the test's choice in through the authorization code flow (``GET
/oauth/authorize``, then ``POST /oauth/token``) for the dashboard's registered client."""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import ec, rsa


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        jwk.update(alg="RS256", use="sig", kid=kid)
    else:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        jwk.update(alg="ES256", use="sig", kid=kid)
    return jwk


class Uaa:
    """Keys by kid; ``token()`` signs claims like UAA's (user_id, scope list, aud list)."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {"key-1": rsa_key()}
        self.server: TestServer | None = None
        self.jwks_requests = 0
        self.refresh_tokens: dict[str, dict[str, Any]] = {}
        """Opaque refresh tokens UAA issued, with the claims of the access tokens they buy."""
        self.refresh_requests = 0
        self.access_token_seconds = 600
        self.clients: dict[str, tuple[str, str]] = {}
        """Confidential clients (the dashboard's) by id: their secret and redirect URI."""
        self.browser_user: dict[str, Any] | None = None
        """Whom ``/oauth/authorize`` signs in (a test chooses with :meth:`sign_in_as`)."""
        self.codes: dict[str, dict[str, Any]] = {}
        """Authorization codes not yet exchanged: the client, redirect URI and user."""

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    @property
    def issuer(self) -> str:
        return self.url + "/oauth/token"

    def app(self) -> web.Application:
        async def token_keys(request: web.Request) -> web.Response:
            self.jwks_requests += 1
            return web.json_response({"keys": [public_jwk(k, kid) for kid, k in self.keys.items()]})

        async def discovery(request: web.Request) -> web.Response:
            return web.json_response(
                {
                    "issuer": self.issuer,
                    "jwks_uri": self.url + "/token_keys",
                    "id_token_signing_alg_values_supported": ["RS256"],
                }
            )

        async def oauth_token(request: web.Request) -> web.Response:
            form = await request.post()
            if form.get("grant_type") == "authorization_code":
                return await self._code_grant(request)
            return await self._grant(request)

        async def authorize(request: web.Request) -> web.Response:
            return self._authorize(request)

        app = web.Application()
        app.router.add_post("/oauth/token", oauth_token)
        app.router.add_get("/oauth/authorize", authorize)
        app.router.add_get("/token_keys", token_keys)
        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_get("/oauth/token/.well-known/openid-configuration", discovery)
        return app

    def token(
        self,
        user: str = "user-1",
        *,
        scope: list[str] | None = None,
        aud: list[str] | str | None = None,
        expires_in: int = 600,
        kid: str = "key-1",
        key: Any = None,
        issuer: str | None = None,
        nbf: int | None = None,
        **extra: Any,
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "jti": uuid.uuid4().hex,
            "sub": user,
            "user_id": user,
            "user_name": f"{user}@example.com",
            "scope": scope if scope is not None else ["openid", "cloud_controller.read"],
            "aud": aud if aud is not None else ["cloud_controller", "backup_manager"],
            "iss": issuer or self.issuer,
            "iat": now,
            "exp": now + expires_in,
            **extra,
        }
        if nbf is not None:
            claims["nbf"] = nbf
        signer = key if key is not None else self.keys[kid]
        alg = "RS256" if isinstance(signer, rsa.RSAPrivateKey) else "ES256"
        return jwt.encode(claims, signer, algorithm=alg, headers={"kid": kid})

    def refresh_token(self, user: str = "user-1", **claims: Any) -> str:
        """An opaque refresh token (UAA's default format) for ``user``; ``claims`` are passed to
        :meth:`token` for each access token it buys (``scope=...``)."""
        value = secrets.token_hex(16) + "-r"
        self.refresh_tokens[value] = {"user": user, **claims}
        return value

    async def _grant(self, request: web.Request) -> web.Response:
        """``grant_type=refresh_token`` for a public client: the ``cf`` CLI sends HTTP Basic
        ``cf:`` (empty secret) and a form body. UAA answers errors in OAuth2's shape; its
        refresh tokens are not rotated (the same one comes back)."""
        self.refresh_requests += 1
        client = _basic_client(request.headers.get("Authorization", ""))
        form = await request.post()
        if client is None:
            client = (str(form.get("client_id", "")), str(form.get("client_secret", "")))
        if client != ("cf", ""):
            return _oauth_error(401, "invalid_client", "Bad credentials")
        if form.get("grant_type") != "refresh_token":
            return _oauth_error(400, "unsupported_grant_type", "Unsupported grant type")
        refresh = str(form.get("refresh_token", ""))
        claims = self.refresh_tokens.get(refresh)
        if claims is None:
            return _oauth_error(401, "invalid_token", "Invalid refresh token (expired).")
        claims = dict(claims)
        user = claims.pop("user")
        access = self.token(user, expires_in=self.access_token_seconds, **claims)
        scope = claims.get("scope") or ["openid", "cloud_controller.read"]
        return web.json_response(
            {
                "access_token": access,
                "token_type": "bearer",
                "refresh_token": refresh,
                "expires_in": self.access_token_seconds - 1,
                "scope": " ".join(scope),
                "jti": uuid.uuid4().hex,
            },
            headers={"Cache-Control": "no-store"},
        )

    def register_client(self, client_id: str, secret: str, redirect_uri: str) -> None:
        self.clients[client_id] = (secret, redirect_uri)

    def sign_in_as(self, user: str | None, **claims: Any) -> None:
        """The user ``/oauth/authorize`` signs in from now on (None: nobody; the page then
        answers 401 like a login form left unanswered); ``claims`` go to :meth:`token`."""
        self.browser_user = None if user is None else {"user": user, **claims}

    def _authorize(self, request: web.Request) -> web.Response:
        """The authorization code flow's first step: UAA checks the client and that the
        redirect URI is the one registered, signs the user in, and sends the browser back with
        a one-time code and the client's ``state``."""
        query = request.query
        client = self.clients.get(query.get("client_id", ""))
        if client is None or query.get("redirect_uri") != client[1]:
            return web.Response(status=400, text="Unknown client or redirect URI.")
        if query.get("response_type") != "code":
            return web.Response(status=400, text="Unsupported response type.")
        if self.browser_user is None:
            return web.Response(status=401, text="Nobody signs in.")
        code = secrets.token_urlsafe(16)
        self.codes[code] = {
            "client_id": query["client_id"],
            "redirect_uri": client[1],
            **self.browser_user,
        }
        target = client[1] + "?" + urlencode({"code": code, "state": query.get("state", "")})
        raise web.HTTPFound(target)

    async def _code_grant(self, request: web.Request) -> web.Response:
        """``grant_type=authorization_code``: the client's id and secret (HTTP Basic or the
        form), a code issued to it (once), and the redirect URI the code was issued for."""
        form = await request.post()
        client = _basic_client(request.headers.get("Authorization", ""))
        if client is None:
            client = (str(form.get("client_id", "")), str(form.get("client_secret", "")))
        known = self.clients.get(client[0])
        if known is None or not secrets.compare_digest(known[0], client[1]):
            return _oauth_error(401, "invalid_client", "Bad credentials")
        grant = self.codes.pop(str(form.get("code", "")), None)
        if grant is None or grant["client_id"] != client[0]:
            return _oauth_error(400, "invalid_grant", "Invalid authorization code")
        if form.get("redirect_uri") != grant["redirect_uri"]:
            return _oauth_error(400, "invalid_grant", "Redirect mismatch")
        claims = {k: v for k, v in grant.items() if k not in ("client_id", "redirect_uri")}
        user = claims.pop("user")
        access = self.token(user, expires_in=self.access_token_seconds, **claims)
        return web.json_response(
            {"access_token": access, "token_type": "bearer", "expires_in": 599},
            headers={"Cache-Control": "no-store"},
        )

    def add_ec_key(self, kid: str) -> None:
        self.keys[kid] = ec.generate_private_key(ec.SECP256R1())


def _basic_client(header: str) -> tuple[str, str] | None:
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        client, _, secret = base64.b64decode(credentials, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return client, secret


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


@pytest.fixture
async def uaa() -> AsyncIterator[Uaa]:
    stand_in = Uaa()
    stand_in.server = TestServer(stand_in.app(), host="127.0.0.1")
    await stand_in.server.start_server()
    yield stand_in
    await stand_in.server.close()
