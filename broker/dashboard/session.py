"""The dashboard's cookies: a signed-in session and a sign-in in progress, each sealed with the
manager's master keys (``backup.secrets.SecretBox``: encrypted and authenticated, so a browser
can neither read the access token nor forge a session), and the CSRF token of a session.

Nothing is kept on the server, so every replica reads a session any other one wrote."""

from __future__ import annotations

import base64
import hmac
import json
import secrets
import time
from dataclasses import asdict, dataclass

from aiohttp import web

from backup.secrets import SecretBox, SecretKeyError
from broker.dashboard.links import PREFIX

SESSION_COOKIE = "bm_session"
SIGN_IN_COOKIE = "bm_sign_in"
COOKIE_PATH = PREFIX
SIGN_IN_SECONDS = 600
_SESSION_CONTEXT = "dashboard-session"
_SIGN_IN_CONTEXT = "dashboard-sign-in"
_MAX_COOKIE = 8192


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in user: who (``subject``, ``name`` to show), the access token the Cloud
    Controller is asked with, whether it has the operator scope, and the CSRF token."""

    subject: str
    name: str
    token: str
    operator: bool
    csrf: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class SignIn:
    """A sign-in started here: the ``state`` the identity provider must send back, and the
    dashboard page to return to."""

    state: str
    next_path: str
    expires_at: float


def new_csrf() -> str:
    return secrets.token_urlsafe(32)


def new_state() -> str:
    return secrets.token_urlsafe(32)


def _seal(box: SecretBox, value: object, context: str) -> str:
    sealed = box.seal(json.dumps(value), context)
    wire = {
        "v": sealed["v"],
        "kid": sealed["kid"],
        "n": base64.urlsafe_b64encode(_bytes(sealed["n"])).decode(),
        "ct": base64.urlsafe_b64encode(_bytes(sealed["ct"])).decode(),
    }
    return base64.urlsafe_b64encode(json.dumps(wire).encode()).decode()


def _bytes(value: object) -> bytes:
    assert isinstance(value, bytes)
    return value


def _open(box: SecretBox, cookie: str | None, context: str) -> dict[str, object] | None:
    """The sealed value, or None for a missing, altered, foreign or undecodable cookie."""
    if not cookie or len(cookie) > _MAX_COOKIE:
        return None
    try:
        wire = json.loads(base64.urlsafe_b64decode(cookie.encode()))
        sealed = {
            "v": wire["v"],
            "kid": wire["kid"],
            "n": base64.urlsafe_b64decode(str(wire["n"]).encode()),
            "ct": base64.urlsafe_b64decode(str(wire["ct"]).encode()),
        }
        value = json.loads(box.open(sealed, context))
    except (SecretKeyError, ValueError, TypeError, KeyError):
        return None
    return value if isinstance(value, dict) else None


def _secure(request: web.Request, base_url: str) -> bool:
    """Secure cookies where the dashboard is reached over TLS (also behind a router that ends
    TLS, which the public URL tells)."""
    return request.secure or base_url.startswith("https://")


def _set(
    response: web.StreamResponse, request: web.Request, base_url: str, name: str, value: str
) -> None:
    response.set_cookie(
        name,
        value,
        path=COOKIE_PATH,
        httponly=True,
        secure=_secure(request, base_url),
        samesite="Lax",  # Lax: the identity provider's redirect back is a top-level GET
    )


def read_session(request: web.Request, box: SecretBox) -> Session | None:
    value = _open(box, request.cookies.get(SESSION_COOKIE), _SESSION_CONTEXT)
    if value is None:
        return None
    try:
        session = Session(
            subject=str(value["subject"]),
            name=str(value["name"]),
            token=str(value["token"]),
            operator=value["operator"] is True,
            csrf=str(value["csrf"]),
            expires_at=float(str(value["expires_at"])),
        )
    except (KeyError, ValueError):
        return None
    return session if session.expires_at > time.time() else None


def write_session(
    response: web.StreamResponse,
    request: web.Request,
    box: SecretBox,
    base_url: str,
    session: Session,
) -> None:
    _set(response, request, base_url, SESSION_COOKIE, _seal(box, asdict(session), _SESSION_CONTEXT))


def read_sign_in(request: web.Request, box: SecretBox) -> SignIn | None:
    value = _open(box, request.cookies.get(SIGN_IN_COOKIE), _SIGN_IN_CONTEXT)
    if value is None:
        return None
    try:
        sign_in = SignIn(
            state=str(value["state"]),
            next_path=str(value["next_path"]),
            expires_at=float(str(value["expires_at"])),
        )
    except (KeyError, ValueError):
        return None
    return sign_in if sign_in.expires_at > time.time() else None


def write_sign_in(
    response: web.StreamResponse,
    request: web.Request,
    box: SecretBox,
    base_url: str,
    sign_in: SignIn,
) -> None:
    _set(response, request, base_url, SIGN_IN_COOKIE, _seal(box, asdict(sign_in), _SIGN_IN_CONTEXT))


def forget(response: web.StreamResponse, name: str) -> None:
    response.del_cookie(name, path=COOKIE_PATH)


def same_secret(sent: str | None, expected: str) -> bool:
    """Constant-time comparison of a CSRF token or an OAuth state."""
    return sent is not None and hmac.compare_digest(sent.encode(), expected.encode())


def safe_next(path: str | None) -> str:
    """A dashboard page to go to after signing in; anything else (another site, ``//host``,
    a backslash trick, a scheme) is the dashboard's home, so there is no open redirect."""
    if (
        not path
        or not path.startswith(COOKIE_PATH + "/")
        or "//" in path
        or "\\" in path
        or not path.isascii()
        or any(ord(char) < 0x21 for char in path)
        or len(path) > 2048
    ):
        return COOKIE_PATH + "/"
    return path
