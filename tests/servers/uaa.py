"""A UAA / OIDC stand-in: serves a test key pair's public half the way UAA does
(``/token_keys`` and ``/.well-known/openid-configuration``) and signs tokens with it."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

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

        app = web.Application()
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

    def add_ec_key(self, kid: str) -> None:
        self.keys[kid] = ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
async def uaa() -> AsyncIterator[Uaa]:
    stand_in = Uaa()
    stand_in.server = TestServer(stand_in.app(), host="127.0.0.1")
    await stand_in.server.start_server()
    yield stand_in
    await stand_in.server.close()
