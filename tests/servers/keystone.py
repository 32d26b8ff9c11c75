"""A real OpenStack Keystone (identity v3) for the tests: the ``keystone`` package (in
``.venv-keystone``) on loopback, SQLite and Fernet keys in the pytest temp directory, set up by
``keystone-manage``'s own code (``tests/servers/keystone_runner.py``) and then populated through
its REST API, as an operator would.

Fixtures:

- ``keystone_server`` (session, in ``tests/servers/swift.py``, which starts Swift behind it at
  the same time): a :class:`KeystoneServer` with :class:`Identities`: the
  ``backups`` project (domain ``Default``) and a user with the ``member`` role on it, a user
  with no role on it, a user with only ``reader`` (Keystone scopes his token; Swift's
  ``keystoneauth`` refuses him), the same project name in another domain, a project whose
  catalog has no ``object-store`` endpoint (Keystone's endpoint filter), a second region, and
  the ``swift`` service user (``admin`` in ``service``) that Swift's ``authtoken`` uses.
  The object-store service and its endpoints are registered by the Swift cluster that runs
  behind this Keystone (``keystone_swift``).
- ``short_token_keystone`` (session): a second Keystone process on the same database and keys
  whose tokens live :data:`SHORT_TOKEN_SECONDS`; Swift (validating against the first one)
  honours their expiry, which is inside the token.
- ``application_credential``: a fresh application credential of the member user on
  ``backups``, deleted at teardown if a test has not revoked it.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.servers.log_audit import audit_secret
from tests.servers.ports import free_port
from tests.servers.process import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
KEYSTONE_PYTHON = ROOT / ".venv-keystone" / "bin" / "python"
RUNNER = Path(__file__).with_name("keystone_runner.py")

REGION = "RegionOne"
SERVICE_USER = "swift"
SERVICE_PROJECT = "service"
SECOND_REGION = "RegionTwo"
SHORT_TOKEN_SECONDS = 6
"""The short-lived Keystone's token lifetime: long enough for a request, short enough that a
transfer of a few segments outlasts a token. keystoneauth renews a token that has less than
two minutes left whenever it is asked for one, so a client never asks this Keystone for a token
it would keep: a token expires only in the hands of whoever cached it (swiftclient does)."""


@dataclass(frozen=True)
class User:
    id: str
    name: str
    password: str
    domain_name: str = "Default"


@dataclass(frozen=True)
class Project:
    id: str
    name: str
    domain_name: str = "Default"


@dataclass(frozen=True)
class ApplicationCredential:
    """An application credential as its owner received it: the secret is shown only once."""

    id: str
    name: str
    secret: str
    user: User
    project: Project


@dataclass(frozen=True)
class Identities:
    """Who exists in the test Keystone (see the module's docstring)."""

    project: Project
    member: User
    no_role: User
    reader: User
    other_domain: str
    other_domain_project: Project
    no_swift_project: Project
    service_project: Project
    swift_service: User


class KeystoneServer(ServerProcess):
    """Keystone's public WSGI application in a process of its own (``keystone_runner.py``).

    ``shares`` makes a second server on the first one's database and keys (same users, same
    catalog, tokens each can validate), for a different ``[token] expiration``."""

    name = "keystone"
    log_name = "keystone.log"

    def __init__(
        self,
        base: Path,
        *,
        token_expiration: int = 3600,
        shares: KeystoneServer | None = None,
    ) -> None:
        super().__init__(base)
        self.port = free_port()
        self.token_expiration = token_expiration
        self.data = shares.data if shares else base / "data"
        self.admin_password = (
            shares.admin_password if shares else "adm-" + secrets.token_urlsafe(18)
        )
        self._bootstraps = shares is None
        # Chosen before the user exists, so that Swift's configuration can be written (and
        # Swift started) while Keystone starts.
        self.swift_service_password = (
            shares.swift_service_password
            if shares
            else audit_secret("pw-" + secrets.token_urlsafe(18))
        )
        self._admin: Any = None
        self._roles: dict[str, str] = {}
        self.identities: Identities | None = None
        self.started_in: float | None = None
        """Seconds the session fixture took to start and populate it."""

    @property
    def url(self) -> str:
        """The identity v3 URL (``auth_url`` of a Swift destination)."""
        return f"http://127.0.0.1:{self.port}/v3"

    # ------------------------------------------------------------------ the process

    def _prepare(self) -> None:
        if not KEYSTONE_PYTHON.exists():
            raise RuntimeError(f"{KEYSTONE_PYTHON} is missing: run `make install-test`")
        self.data.mkdir(parents=True, exist_ok=True)
        etc = self.base / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        config = etc / "keystone.conf"
        config.write_text(
            "[DEFAULT]\n"
            f"log_file = {self.base / 'keystone-server.log'}\n"
            "debug = false\n\n"
            f"[database]\nconnection = sqlite:///{self.data / 'keystone.db'}\n"
            "sqlite_synchronous = false\n\n"
            f"[token]\nprovider = fernet\nexpiration = {self.token_expiration}\n\n"
            f"[fernet_tokens]\nkey_repository = {self.data / 'fernet-keys'}\n\n"
            f"[fernet_receipts]\nkey_repository = {self.data / 'fernet-receipts'}\n\n"
            f"[credential]\nkey_repository = {self.data / 'credential-keys'}\n\n"
            # bcrypt's fewest rounds: each password or application-credential check would
            # otherwise cost about half a second of CPU.
            "[identity]\npassword_hash_rounds = 4\n\n"
            # Keystone's own cache, in this process's memory: without it a request costs some
            # ninety SQLite queries. Entries live two seconds, since the short-lived instance
            # shares the database but not this cache (a deployment shares memcached).
            "[cache]\nenabled = true\nbackend = oslo_cache.dict\nexpiration_time = 2\n"
        )
        runner: dict[str, Any] = {"port": self.port, "config_file": str(config)}
        if self._bootstraps:
            runner["bootstrap"] = {
                "password": self.admin_password,
                "public_url": self.url,
                "region": REGION,
                "done": str(self.data / "bootstrapped"),
            }
        (etc / "runner.json").write_text(json.dumps(runner))
        (etc / "runner.json").chmod(0o600)

    def _command(self) -> list[str]:
        # -P: the runner's own directory must not shadow any package.
        return [str(KEYSTONE_PYTHON), "-P", str(RUNNER), str(self.base / "etc")]

    def _listening_ports(self) -> list[int]:
        return [self.port]

    def _wait_ready(self, timeout: float) -> None:
        import requests

        def answers() -> None:
            requests.get(self.url, timeout=5).raise_for_status()

        self._poll_ready(answers, timeout, "Keystone")

    def _after_stop(self) -> None:
        self._admin = None

    # ------------------------------------------------------------------ sessions and the API

    def session(self, user: User, project: Project | None = None) -> Any:
        """A keystoneauth1 session of ``user``, scoped to ``project`` if given."""
        from keystoneauth1 import session
        from keystoneauth1.identity import v3

        scope: dict[str, str] = {}
        if project is not None:
            scope = {"project_name": project.name, "project_domain_name": project.domain_name}
        auth = v3.Password(
            auth_url=self.url,
            username=user.name,
            password=user.password,
            user_domain_name=user.domain_name,
            **scope,
        )
        return session.Session(auth=auth, timeout=30)

    def admin(self) -> Any:
        """The bootstrap admin's session (project ``admin``)."""
        if self._admin is None:
            admin = User("", "admin", self.admin_password)
            self._admin = self.session(admin, Project("", "admin"))
        return self._admin

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One identity API call as the admin; the answer's JSON (None for 204)."""
        answer = self.admin().request(self.url + path, method, json=body, raise_exc=True)
        return answer.json() if answer.content else None

    def create_domain(self, name: str) -> str:
        return str(self.api("POST", "/domains", {"domain": {"name": name}})["domain"]["id"])

    def create_project(self, name: str, domain_id: str = "default") -> str:
        body = {"project": {"name": name, "domain_id": domain_id}}
        return str(self.api("POST", "/projects", body)["project"]["id"])

    def create_user(
        self,
        name: str,
        domain_id: str = "default",
        domain_name: str = "Default",
        password: str | None = None,
    ) -> User:
        password = password or audit_secret("pw-" + secrets.token_urlsafe(18))
        body = {"user": {"name": name, "domain_id": domain_id, "password": password}}
        created = self.api("POST", "/users", body)["user"]
        return User(created["id"], name, password, domain_name)

    def role_id(self, name: str) -> str:
        if not self._roles:
            self._roles = {r["name"]: r["id"] for r in self.api("GET", "/roles")["roles"]}
        return self._roles[name]

    def grant(self, role: str, user: User, project_id: str) -> None:
        self.api("PUT", f"/projects/{project_id}/users/{user.id}/roles/{self.role_id(role)}")

    def create_region(self, region: str) -> None:
        self.api("POST", "/regions", {"region": {"id": region}})

    def add_service(self, service_type: str, name: str) -> str:
        body = {"service": {"type": service_type, "name": name}}
        return str(self.api("POST", "/services", body)["service"]["id"])

    def add_endpoint(self, service_id: str, interface: str, url: str, region: str = REGION) -> str:
        body = {
            "endpoint": {
                "service_id": service_id,
                "interface": interface,
                "url": url,
                "region_id": region,
            }
        }
        return str(self.api("POST", "/endpoints", body)["endpoint"]["id"])

    def limit_catalog(self, project_id: str, endpoint_ids: list[str]) -> None:
        """Keystone's endpoint filter: the project's catalog lists only these endpoints."""
        for endpoint_id in endpoint_ids:
            self.api("PUT", f"/OS-EP-FILTER/projects/{project_id}/endpoints/{endpoint_id}")

    def endpoint_ids(self, service_type: str) -> list[str]:
        services = self.api("GET", f"/services?type={service_type}")["services"]
        ids: list[str] = []
        for service in services:
            endpoints = self.api("GET", f"/endpoints?service_id={service['id']}")["endpoints"]
            ids += [e["id"] for e in endpoints]
        return ids

    def application_credential(
        self,
        user: User,
        project: Project,
        *,
        name: str | None = None,
        roles: list[str] | None = None,
        expires_at: str | None = None,
    ) -> ApplicationCredential:
        """A new application credential, created by ``user`` himself (as a tenant would)."""
        body: dict[str, Any] = {"name": name or "osb-" + uuid.uuid4().hex[:12]}
        if roles is not None:
            body["roles"] = [{"name": role} for role in roles]
        if expires_at is not None:
            body["expires_at"] = expires_at
        owner = self.session(user, project)
        answer = owner.post(
            f"{self.url}/users/{user.id}/application_credentials",
            json={"application_credential": body},
            raise_exc=True,
        ).json()["application_credential"]
        audit_secret(answer["secret"], "a Keystone application credential's secret")
        return ApplicationCredential(answer["id"], answer["name"], answer["secret"], user, project)

    def revoke(self, credential: ApplicationCredential) -> None:
        """Deletes the application credential; Keystone revokes the tokens it issued."""
        path = f"/users/{credential.user.id}/application_credentials/{credential.id}"
        with contextlib.suppress(Exception):
            self.api("DELETE", path)

    # ------------------------------------------------------------------ the test world

    def populate(self) -> Identities:
        """Creates the identities the tests use (see the module's docstring)."""
        self.create_region(SECOND_REGION)
        project = Project(self.create_project("backups"), "backups")
        member = self.create_user("backup-user")
        self.grant("member", member, project.id)
        no_role = self.create_user("no-role-user")
        reader = self.create_user("reader-user")
        self.grant("reader", reader, project.id)
        other_domain = "other-domain"
        other_id = self.create_domain(other_domain)
        other_project = Project(self.create_project("backups", other_id), "backups", other_domain)
        no_swift = Project(self.create_project("no-swift"), "no-swift")
        self.grant("member", member, no_swift.id)
        service = Project(self.create_project(SERVICE_PROJECT), SERVICE_PROJECT)
        swift = self.create_user(SERVICE_USER, password=self.swift_service_password)
        self.grant("admin", swift, service.id)
        # The endpoint filter: no-swift's catalog lists the identity endpoint only.
        self.limit_catalog(no_swift.id, self.endpoint_ids("identity"))
        self.identities = Identities(
            project=project,
            member=member,
            no_role=no_role,
            reader=reader,
            other_domain=other_domain,
            other_domain_project=other_project,
            no_swift_project=no_swift,
            service_project=service,
            swift_service=swift,
        )
        return self.identities


@contextlib.contextmanager
def running_keystone(base: Path, **options: Any) -> Iterator[KeystoneServer]:
    server = KeystoneServer(base, **options)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def short_token_keystone(
    keystone_server: KeystoneServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KeystoneServer]:
    with running_keystone(
        tmp_path_factory.mktemp("keystone-short"),
        token_expiration=SHORT_TOKEN_SECONDS,
        shares=keystone_server,
    ) as server:
        server.identities = keystone_server.identities
        yield server


@pytest.fixture
def application_credential(keystone_server: KeystoneServer) -> Iterator[ApplicationCredential]:
    ids = keystone_server.identities
    assert ids is not None
    credential = keystone_server.application_credential(ids.member, ids.project)
    yield credential
    keystone_server.revoke(credential)
