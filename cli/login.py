"""Who the CLI acts as, in the ways its users already are logged in:

- the Cloud Foundry CLI's session (``$CF_HOME/.cf/config.json``): its access token, refreshed
  with its refresh token against the UAA when it has expired (and written back to that file,
  as the ``cf`` CLI does, so both tools go on sharing one session); instance names resolved in
  the targeted space through the Cloud Controller v3 API;
- a binding's key (``OSB_BACKUP_KEY``, or ``--key-file``): the one instance it was made for;
- operator credentials (``--operator`` with ``OSB_BACKUP_OPERATOR_PASSWORD`` or a prompt).

Secrets are never taken from an argument (other users see command lines) and never printed.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx

from cli.errors import CliError, ExitCode

CF_CLIENT = ("cf", "")
"""The OAuth client the ``cf`` CLI refreshes its tokens with (public: an empty secret)."""
EXPIRY_MARGIN_SECONDS = 30
"""A token expiring within this margin is refreshed before use, so it cannot expire en route."""
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def looks_like_guid(value: str) -> bool:
    return bool(_GUID.match(value))


def cf_config_path(environ: dict[str, str] | None = None) -> Path:
    """``$CF_HOME/.cf/config.json``, ``CF_HOME`` defaulting to the home directory (as cf)."""
    environ = dict(os.environ) if environ is None else environ
    home = environ.get("CF_HOME") or str(Path.home())
    return Path(home) / ".cf" / "config.json"


def token_expiry(token: str) -> int | None:
    """The ``exp`` claim of a JWT, read without checking the signature (the servers check it;
    this only decides whether to refresh first)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return exp if isinstance(exp, int) else None


def _unreachable(url: str, exc: httpx.HTTPError) -> CliError:
    return CliError(f"Cannot reach {url}: {exc or type(exc).__name__}.", ExitCode.UNAVAILABLE)


@dataclass
class CfSession:
    """The ``cf`` CLI's config file, read once; tokens refreshed as needed."""

    path: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, path: Path) -> CfSession:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CliError(
                f"Not logged in: there is no cf CLI config at {path}.",
                ExitCode.NOT_LOGGED_IN,
                hint="Run `cf login` (or set CF_HOME), or use a binding key (OSB_BACKUP_KEY) "
                "or operator credentials (--operator).",
            ) from None
        except (OSError, ValueError) as exc:
            raise CliError(
                f"The cf CLI config {path} cannot be read: {exc}.", ExitCode.NOT_LOGGED_IN
            ) from None
        if not isinstance(data, dict) or not data.get("AccessToken"):
            raise CliError(
                f"Not logged in: the cf CLI config {path} holds no access token.",
                ExitCode.NOT_LOGGED_IN,
                hint="Run `cf login`.",
            )
        return cls(path, data)

    @property
    def api_endpoint(self) -> str:
        """The Cloud Controller (``Target``)."""
        target = str(self.data.get("Target") or "").rstrip("/")
        if not target:
            raise CliError(
                "The cf CLI has no API endpoint targeted.",
                ExitCode.NOT_LOGGED_IN,
                hint="Run `cf api` and `cf login`.",
            )
        return target

    @property
    def uaa_endpoint(self) -> str:
        url = self.data.get("UAAEndpoint") or self.data.get("AuthorizationEndpoint") or ""
        return str(url).rstrip("/")

    @property
    def verify_tls(self) -> bool:
        return not self.data.get("SSLDisabled", False)

    @property
    def access_token(self) -> str:
        """The bare token (the file stores ``bearer <token>``)."""
        value = str(self.data.get("AccessToken") or "")
        scheme, _, token = value.partition(" ")
        return token if scheme.lower() == "bearer" and token else value

    @property
    def space(self) -> tuple[str, str]:
        """(guid, name) of the targeted space."""
        space = self.data.get("TargetedSpace") or {}
        guid = str(space.get("GUID") or "") if isinstance(space, dict) else ""
        if not guid:
            raise CliError(
                "The cf CLI has no space targeted, so an instance name cannot be resolved.",
                ExitCode.NOT_LOGGED_IN,
                hint="Run `cf target -s SPACE`, or give the instance's GUID (cf service NAME "
                "--guid).",
            )
        return guid, str(space.get("Name") or guid)

    def expired(self) -> bool:
        exp = token_expiry(self.access_token)
        return exp is not None and exp - EXPIRY_MARGIN_SECONDS <= time.time()

    def token(self) -> str:
        """A token that has not expired: refreshed first if it has."""
        if self.expired():
            self.refresh()
        return self.access_token

    def refresh(self) -> None:
        """Trade the refresh token for a new access token at the UAA (as ``cf`` does, with
        its public client), and write both back to the cf config."""
        refresh_token = str(self.data.get("RefreshToken") or "")
        if not refresh_token or not self.uaa_endpoint:
            raise CliError(
                "The cf session has expired and cannot be refreshed.",
                ExitCode.NOT_LOGGED_IN,
                hint="Run `cf login` again.",
            )
        url = self.uaa_endpoint + "/oauth/token"
        client = (
            str(self.data.get("UAAOAuthClient") or CF_CLIENT[0]),
            str(self.data.get("UAAOAuthClientSecret") or CF_CLIENT[1]),
        )
        try:
            response = httpx.post(
                url,
                data={
                    "grant_type": "refresh_token",
                    "refresh_token": refresh_token,
                    "token_format": "jwt",
                },
                auth=client,
                headers={"Accept": "application/json"},
                verify=self.verify_tls,
                timeout=30,
            )
        except httpx.HTTPError as exc:
            raise _unreachable(url, exc) from None
        if response.status_code in (400, 401):
            raise CliError(
                "The cf session has expired (the UAA refused its refresh token).",
                ExitCode.NOT_LOGGED_IN,
                hint="Run `cf login` again.",
            )
        if response.status_code != 200:
            raise CliError(
                f"The UAA at {self.uaa_endpoint} answered {response.status_code} to a token "
                "refresh.",
                ExitCode.UNAVAILABLE,
            )
        try:
            body = cast(dict[str, Any], response.json())
            access = str(body["access_token"])
        except (ValueError, KeyError, TypeError):
            raise CliError(
                f"The UAA at {self.uaa_endpoint} answered a token refresh without a token.",
                ExitCode.UNAVAILABLE,
            ) from None
        self.data["AccessToken"] = f"bearer {access}"
        if body.get("refresh_token"):
            self.data["RefreshToken"] = str(body["refresh_token"])
        self._write_back()

    def _write_back(self) -> None:
        """Replace the config file atomically with the new tokens, keeping its mode and every
        other field (a failure to write only costs a refresh next time)."""
        try:
            mode = self.path.stat().st_mode & 0o777
            handle, temp = tempfile.mkstemp(dir=self.path.parent, prefix=".config.", text=True)
            with os.fdopen(handle, "w") as out:
                json.dump(self.data, out, indent=2)
            os.chmod(temp, mode)
            os.replace(temp, self.path)
        except OSError:
            return

    def resolve_instance(self, name: str) -> str:
        """The GUID of the service instance ``name`` in the targeted space."""
        space_guid, space_name = self.space
        url = self.api_endpoint + "/v3/service_instances"
        params = {"names": name, "space_guids": space_guid}
        for attempt in range(2):
            try:
                response = httpx.get(
                    url,
                    params=params,
                    headers={"Authorization": f"bearer {self.token()}"},
                    verify=self.verify_tls,
                    timeout=30,
                )
            except httpx.HTTPError as exc:
                raise _unreachable(self.api_endpoint, exc) from None
            if response.status_code == 401 and attempt == 0:
                self.refresh()  # revoked or expired in between: one more try
                continue
            break
        if response.status_code == 401:
            raise CliError(
                "The Cloud Controller refused the cf session's token.",
                ExitCode.NOT_LOGGED_IN,
                hint="Run `cf login` again.",
            )
        if response.status_code != 200:
            raise CliError(
                f"The Cloud Controller at {self.api_endpoint} answered "
                f"{response.status_code} to an instance look-up.",
                ExitCode.UNAVAILABLE,
            )
        resources = cast(dict[str, Any], response.json()).get("resources") or []
        if not resources:
            raise CliError(
                f"There is no service instance named {name!r} in space {space_name!r} that "
                "you may see.",
                ExitCode.NOT_FOUND,
                hint="`cf services` lists the space's instances; `cf target` changes the space.",
            )
        return str(resources[0]["guid"])


class CfAuth(httpx.Auth):
    """Bearer with the cf session's token; on a 401 the token is refreshed once and the
    request sent again (it may have been revoked or expired in flight)."""

    def __init__(self, session: CfSession) -> None:
        self.session = session

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.session.token()}"
        response = yield request
        if response.status_code == 401 and self.session.data.get("RefreshToken"):
            self.session.refresh()
            request.headers["Authorization"] = f"Bearer {self.session.access_token}"
            yield request


class BearerAuth(httpx.Auth):
    """A binding's key as a bearer token."""

    def __init__(self, key: str) -> None:
        self.key = key

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.key}"
        yield request


@dataclass
class Login:
    """How to authenticate, and how to turn what the user typed into an instance GUID."""

    auth: httpx.Auth
    kind: str
    """``cf``, ``binding`` or ``operator``."""
    cf: CfSession | None = None

    def instance_id(self, given: str) -> str:
        """``given`` itself if it is a GUID (or there is no Cloud Controller to ask), else the
        GUID of the instance of that name in the cf CLI's targeted space."""
        if self.cf is None or looks_like_guid(given):
            return given
        return self.cf.resolve_instance(given)


def read_secret_file(path: str) -> str:
    """The first line of a file (``-``: standard input), for a key or password."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise CliError(f"Cannot read {path}: {exc.strerror}.", ExitCode.USAGE) from None
    value = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not value:
        raise CliError(f"{'Standard input' if path == '-' else path} is empty.", ExitCode.USAGE)
    return value


def choose_login(*, key_file: str | None, operator: str | None, password_prompt: Any) -> Login:
    """A binding key (``--key-file`` or ``OSB_BACKUP_KEY``) first, then operator credentials
    (``--operator``/``OSB_BACKUP_OPERATOR`` with ``OSB_BACKUP_OPERATOR_PASSWORD`` or a prompt),
    else the cf CLI's session. ``password_prompt()`` asks for the operator's password."""
    key = read_secret_file(key_file) if key_file else os.environ.get("OSB_BACKUP_KEY", "")
    if key:
        return Login(BearerAuth(key), "binding")
    if operator:
        password = os.environ.get("OSB_BACKUP_OPERATOR_PASSWORD") or password_prompt()
        return Login(httpx.BasicAuth(operator, password), "operator")
    session = CfSession.load(cf_config_path())
    return Login(CfAuth(session), "cf", session)
