"""The dashboard's sign-in: OAuth2's authorization code flow against the platform's UAA or
OIDC issuer (OSB's dashboard single sign-on), with the catalog's ``dashboard_client``."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

import aiohttp

SCOPES = "openid cloud_controller_service_permissions.read"


class SignInFailed(Exception):
    """The identity provider did not give us a token; the message is for the user."""


@dataclass(frozen=True, slots=True)
class Endpoints:
    authorize: str
    token: str


async def discover(http: aiohttp.ClientSession, issuer: str) -> Endpoints:
    """The issuer's authorization and token endpoints from its OpenID discovery document; a
    UAA (whose issuer is ``.../oauth/token``) that does not list them has them at its root."""
    issuer = issuer.rstrip("/")
    parts = urlsplit(issuer)
    root = f"{parts.scheme}://{parts.netloc}"
    document: dict[str, object] = {}
    for url in (
        f"{issuer}/.well-known/openid-configuration",
        f"{root}/.well-known/openid-configuration",
    ):
        try:
            async with http.get(url) as response:
                if response.status == 200:
                    body = await response.json(content_type=None)
                    if isinstance(body, dict):
                        document = body
                        break
        except (aiohttp.ClientError, TimeoutError, ValueError):
            continue
    authorize = document.get("authorization_endpoint")
    token = document.get("token_endpoint")
    return Endpoints(
        authorize=authorize if isinstance(authorize, str) else f"{root}/oauth/authorize",
        token=token if isinstance(token, str) else f"{root}/oauth/token",
    )


def authorize_url(endpoints: Endpoints, client_id: str, redirect_uri: str, state: str) -> str:
    query = urlencode(
        {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "scope": SCOPES,
            "state": state,
        }
    )
    separator = "&" if "?" in endpoints.authorize else "?"
    return f"{endpoints.authorize}{separator}{query}"


async def exchange(
    http: aiohttp.ClientSession,
    endpoints: Endpoints,
    *,
    client_id: str,
    client_secret: str,
    code: str,
    redirect_uri: str,
) -> str:
    """The access token the identity provider gives for ``code``."""
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
    try:
        async with http.post(
            endpoints.token,
            data=form,
            headers={
                "Accept": "application/json",
                "Authorization": aiohttp.encode_basic_auth(client_id, client_secret),
            },
        ) as response:
            body = await response.json(content_type=None)
            status = response.status
    except (aiohttp.ClientError, TimeoutError, ValueError):
        raise SignInFailed("The identity provider cannot be reached; try again later.") from None
    token = body.get("access_token") if isinstance(body, dict) else None
    if status != 200 or not isinstance(token, str):
        raise SignInFailed("The identity provider refused the sign-in; try again.")
    return token
