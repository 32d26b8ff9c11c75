"""A real OpenStack Swift for the tests: account, container, object and proxy servers of the
``swift`` package (in ``.venv-swift``) on loopback, single replica, with the ``slo``
middleware; behind tempauth (plus a Keystone v3 stand-in backed by real tempauth tokens, for
fast tests), or behind the real Keystone of ``tests/servers/keystone.py``.

Fixtures:

- ``swift_server`` (session): a :class:`SwiftCluster` with ``auth_url`` (auth v1),
  ``keystone_url`` (the stand-in's v3), the users' credentials, ``make_container()``,
  ``settings()`` and ``keystone_settings()``.
- ``swift_settings``: a :class:`storage.SwiftSettings` (auth v1, tempauth) for a fresh, empty
  container on that server.
- ``swift_private_server``: a cluster of the test's own, to ``stop()`` and ``start()`` again.
- ``keystone_swift`` (session): a :class:`KeystoneSwiftCluster` behind a real Keystone
  (``keystone_server``, started at the same time), its ``object-store`` endpoints in
  Keystone's catalog (RegionOne public and internal, RegionTwo public, each on a port of its
  own); ``settings()`` are Keystone v3 settings of the backups project's member.
- ``keystone_swift_settings``: those settings for a fresh, empty container.

The process runs ``tests/servers/swift_runner.py``; its configuration, rings, data and logs stay
in the pytest temp directory.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage import SwiftSettings
from tests.servers.keystone import (
    REGION,
    SECOND_REGION,
    SERVICE_PROJECT,
    SERVICE_USER,
    Identities,
    KeystoneServer,
)
from tests.servers.ports import free_port
from tests.servers.process import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
SWIFT_PYTHON = ROOT / ".venv-swift" / "bin" / "python"
RUNNER = Path(__file__).with_name("swift_runner.py")

ACCOUNT = "test"
MAX_MANIFEST_SEGMENTS = 16
"""Lower than Swift's default (1000) so that tests reach nested manifests with little data."""


class SwiftCluster(ServerProcess):
    """The account, container, object and proxy servers and the Keystone stand-in, in one
    process (``swift_runner.py``)."""

    name = "swift"
    log_name = "swift.log"

    def __init__(self, base: Path, *, max_manifest_segments: int = MAX_MANIFEST_SEGMENTS) -> None:
        super().__init__(base)
        self.max_manifest_segments = max_manifest_segments
        self.etc = base / "etc"
        self.devices = base / "devices"
        self.ports = {n: free_port() for n in ("account", "container", "object", "proxy")}
        self.ports["keystone"] = free_port()
        self.user = f"{ACCOUNT}:tester"
        self.key = "key-" + secrets.token_urlsafe(24)
        # A user of the same account without .admin: it may not touch containers (403).
        self.reader = f"{ACCOUNT}:reader"
        self.reader_key = "rk-" + secrets.token_urlsafe(18)
        self.keystone_user = "tester"
        self.keystone_password = "pw-" + secrets.token_urlsafe(24)
        self.project = "backups"
        self.started_in: float | None = None
        """Seconds the session fixture took to start it."""

    @property
    def auth_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy']}/auth/v1.0"

    @property
    def keystone_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['keystone']}/v3"

    @property
    def storage_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy']}/v1/AUTH_{ACCOUNT}"

    # ------------------------------------------------------------------ configuration

    def _write_config(self) -> None:
        self.etc.mkdir(parents=True, exist_ok=True)
        (self.devices / "sdb1").mkdir(parents=True, exist_ok=True)
        if not (self.etc / "swift.conf").exists():
            (self.etc / "swift.conf").write_text(
                "[swift-hash]\n"
                f"swift_hash_path_prefix = {uuid.uuid4().hex}\n"
                f"swift_hash_path_suffix = {uuid.uuid4().hex}\n\n"
                "[storage-policy:0]\nname = gold\ndefault = yes\n"
            )
        common = (
            "[DEFAULT]\n"
            "bind_ip = 127.0.0.1\n"
            f"swift_dir = {self.etc}\n"
            f"devices = {self.devices}\n"
            "mount_check = false\n"
            "disable_fallocate = true\n"
            "workers = 0\n"
            "log_level = WARNING\n"
            "log_name = {name}\n\n"
        )
        for name, egg in (("account", "account"), ("container", "container"), ("object", "object")):
            text = common.format(name=name) + (
                f"[pipeline:main]\npipeline = {name}-server\n\n"
                f"[app:{name}-server]\nuse = egg:swift#{egg}\n"
            )
            (self.etc / f"{name}-server.conf").write_text(text)
        auth, auth_filters = self._auth_pipeline()
        proxy = common.format(name="proxy") + (
            "[pipeline:main]\n"
            f"pipeline = catch_errors gatekeeper healthcheck proxy-logging {auth} copy slo dlo "
            "versioned_writes symlink proxy-logging proxy-server\n\n"
            "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n"
            "allow_account_management = true\n\n"
            f"{auth_filters}"
            "[filter:slo]\nuse = egg:swift#slo\n"
            f"max_manifest_segments = {self.max_manifest_segments}\n\n"
            "[filter:catch_errors]\nuse = egg:swift#catch_errors\n\n"
            "[filter:gatekeeper]\nuse = egg:swift#gatekeeper\n\n"
            "[filter:healthcheck]\nuse = egg:swift#healthcheck\n\n"
            "[filter:proxy-logging]\nuse = egg:swift#proxy_logging\n\n"
            "[filter:copy]\nuse = egg:swift#copy\n\n"
            "[filter:dlo]\nuse = egg:swift#dlo\n\n"
            "[filter:versioned_writes]\nuse = egg:swift#versioned_writes\n\n"
            "[filter:symlink]\nuse = egg:swift#symlink\n"
        )
        (self.etc / "proxy-server.conf").write_text(proxy)
        (self.etc / "proxy-server.conf").chmod(0o600)
        (self.etc / "runner.json").write_text(json.dumps(self._runner_config()))
        (self.etc / "runner.json").chmod(0o600)

    def _auth_pipeline(self) -> tuple[str, str]:
        """The proxy's authentication middleware: its pipeline names and their sections."""
        fernet = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
        return "tempauth", (
            "[filter:tempauth]\nuse = egg:swift#tempauth\n"
            f"user_{ACCOUNT}_tester = {self.key} .admin\n"
            f"user_{ACCOUNT}_reader = {self.reader_key}\n"
            "token_life = 86400\n"
            f"fernet_key_k1 = {fernet}\nactive_fernet_key_id = k1\n\n"
        )

    def _runner_config(self) -> dict[str, Any]:
        return {
            "ports": self.ports,
            "keystone": {
                "user": self.keystone_user,
                "password": self.keystone_password,
                "user_domain": "Default",
                "project": self.project,
                "project_domain": "Default",
                "tempauth_user": self.user,
                "tempauth_key": self.key,
            },
        }

    # ------------------------------------------------------------------ the process

    def _prepare(self) -> None:
        if not SWIFT_PYTHON.exists():
            raise RuntimeError(f"{SWIFT_PYTHON} is missing: run `make install-test`")
        self._write_config()

    def _command(self) -> list[str]:
        # -P: the runner's own directory must not shadow the ``swift`` package.
        return [str(SWIFT_PYTHON), "-P", str(RUNNER), str(self.etc)]

    def _listening_ports(self) -> list[int]:
        return [self.ports["proxy"], self.ports["keystone"]]

    def _wait_ready(self, timeout: float) -> None:
        def write() -> None:
            conn = self.connection()
            conn.put_container("ready")
            conn.put_object("ready", "probe", b"ok")
            conn.delete_object("ready", "probe")
            conn.close()

        self._poll_ready(write, timeout, "Swift")

    # ------------------------------------------------------------------ helpers

    def connection(self, user: str | None = None, key: str | None = None) -> Any:
        """A plain swiftclient connection (blocking) for test setup and inspection."""
        from swiftclient.client import Connection

        return Connection(
            authurl=self.auth_url,
            user=user or self.user,
            key=key or self.key,
            auth_version="1",
            retries=1,
            timeout=60,
        )

    def make_container(self, name: str | None = None) -> str:
        name = name or "c-" + uuid.uuid4().hex[:20]
        conn = self.connection()
        try:
            conn.put_container(name)
        finally:
            conn.close()
        return name

    def settings(self, container: str | None = None, **over: Any) -> SwiftSettings:
        fields: dict[str, Any] = {
            "auth_url": self.auth_url,
            "auth_version": "1",
            "username": self.user,
            "password": self.key,
            "user_domain_name": None,
            "project_name": None,
            "project_domain_name": None,
            "container": container or self.make_container(),
        }
        fields.update(over)
        return SwiftSettings(**fields)

    def keystone_settings(self, container: str | None = None, **over: Any) -> SwiftSettings:
        keystone = {
            "auth_url": self.keystone_url,
            "auth_version": "3",
            "username": self.keystone_user,
            "password": self.keystone_password,
            "user_domain_name": "Default",
            "project_name": self.project,
            "project_domain_name": "Default",
        }
        return self.settings(container, **{**keystone, **over})

    def names(self, container: str) -> list[str]:
        """Every object name in ``container`` ([] if it does not exist)."""
        from swiftclient.exceptions import ClientException

        conn = self.connection()
        try:
            return [o["name"] for o in conn.get_container(container, full_listing=True)[1]]
        except ClientException as exc:
            if exc.http_status == 404:
                return []
            raise
        finally:
            conn.close()


class KeystoneSwiftCluster(SwiftCluster):
    """The same servers behind a real Keystone: Keystone's ``authtoken`` and Swift's
    ``keystoneauth`` in the proxy's pipeline instead of tempauth, validating tokens with the
    ``swift`` service user; accounts are ``AUTH_<project id>``, and a project's ``member`` or
    ``admin`` may use its account (``operator_roles``), a ``reader`` may not.

    The proxy also listens on a second port (the catalog's ``internal`` interface) and a third
    (the only endpoint of region ``RegionTwo``), so that a test can tell which endpoint a client
    chose. :meth:`register_catalog` adds the ``object-store`` service and its endpoints to
    Keystone. ``authtoken`` caches no token (``token_cache_time = -1``): a revoked token is
    refused at once, as Swift with a short cache would soon refuse it."""

    name = "swift-keystone"

    def __init__(self, base: Path, keystone: KeystoneServer, **options: Any) -> None:
        super().__init__(base, **options)
        self.keystone = keystone
        del self.ports["keystone"]
        self.ports["proxy_internal"] = free_port()
        self.ports["proxy_region_two"] = free_port()

    @property
    def keystone_url(self) -> str:
        return self.keystone.url

    @property
    def identities(self) -> Identities:
        assert self.keystone.identities is not None, "the Keystone is not populated yet"
        return self.keystone.identities

    def endpoint(self, interface: str = "public", region: str = REGION) -> str:
        """The object-store URL of ``interface`` in ``region`` for the backups project."""
        return self._endpoint_template(interface, region).replace(
            "%(project_id)s", self.identities.project.id
        )

    @property
    def storage_url(self) -> str:
        return self.endpoint()

    def _endpoint_template(self, interface: str, region: str) -> str:
        port = {
            ("public", REGION): "proxy",
            ("internal", REGION): "proxy_internal",
            ("public", SECOND_REGION): "proxy_region_two",
        }[(interface, region)]
        return f"http://127.0.0.1:{self.ports[port]}/v1/AUTH_%(project_id)s"

    def register_catalog(self) -> None:
        """The ``object-store`` service: public and internal endpoints in RegionOne, a public
        one in RegionTwo."""
        service = self.keystone.add_service("object-store", "swift")
        for interface, region in (
            ("public", REGION),
            ("internal", REGION),
            ("public", SECOND_REGION),
        ):
            template = self._endpoint_template(interface, region)
            self.keystone.add_endpoint(service, interface, template, region)

    def _auth_pipeline(self) -> tuple[str, str]:
        return "authtoken keystoneauth", (
            "[filter:authtoken]\n"
            "paste.filter_factory = keystonemiddleware.auth_token:filter_factory\n"
            f"www_authenticate_uri = {self.keystone.url}\n"
            f"auth_url = {self.keystone.url}\n"
            "auth_type = password\n"
            "interface = public\n"  # the catalog has no internal identity endpoint
            f"username = {SERVICE_USER}\n"
            f"password = {self.keystone.swift_service_password}\n"
            f"project_name = {SERVICE_PROJECT}\n"
            "user_domain_id = default\n"
            "project_domain_id = default\n"
            "delay_auth_decision = true\n"  # as Swift's sample: /info needs no token
            "include_service_catalog = false\n"
            "token_cache_time = -1\n"
            "http_request_max_retries = 1\n\n"
            "[filter:keystoneauth]\nuse = egg:swift#keystoneauth\n"
            "operator_roles = admin, member\n\n"
        )

    def _runner_config(self) -> dict[str, Any]:
        return {"ports": self.ports, "more_proxies": ["proxy_internal", "proxy_region_two"]}

    def _listening_ports(self) -> list[int]:
        return [self.ports["proxy"], self.ports["proxy_internal"], self.ports["proxy_region_two"]]

    def connection(self, user: str | None = None, key: str | None = None) -> Any:
        """A swiftclient connection (blocking) as the backups project's member, through a
        keystoneauth1 session, for test setup and inspection."""
        from swiftclient.client import Connection

        assert user is None and key is None, "a Keystone cluster's users are Keystone's"
        ids = self.identities
        return Connection(
            session=self.keystone.session(ids.member, ids.project),
            os_options={"service_type": "object-store", "region_name": REGION},
            retries=1,
            timeout=60,
        )

    def settings(self, container: str | None = None, **over: Any) -> SwiftSettings:
        """Keystone v3 settings of the backups project's member, in RegionOne."""
        ids = self.identities
        fields: dict[str, Any] = {
            "auth_url": self.keystone.url,
            "auth_version": "3",
            "username": ids.member.name,
            "password": ids.member.password,
            "user_domain_name": ids.member.domain_name,
            "project_name": ids.project.name,
            "project_domain_name": ids.project.domain_name,
            "region_name": REGION,
            "container": container or self.make_container(),
        }
        fields.update(over)
        return SwiftSettings(**fields)

    def keystone_settings(self, container: str | None = None, **over: Any) -> SwiftSettings:
        return self.settings(container, **over)


@contextlib.contextmanager
def running_swift(
    base: Path, cluster_type: type[SwiftCluster] = SwiftCluster, **options: Any
) -> Iterator[SwiftCluster]:
    cluster = cluster_type(base, **options)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def swift_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwiftCluster]:
    with running_swift(tmp_path_factory.mktemp("swift-server")) as cluster:
        yield cluster


@pytest.fixture
def swift_settings(swift_server: SwiftCluster) -> SwiftSettings:
    """Settings (auth v1, tempauth) for a fresh, empty container on the session's cluster."""
    return swift_server.settings()


@pytest.fixture
def swift_private_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwiftCluster]:
    """A cluster of this test's own, to stop and restart; stopped at teardown in any case."""
    with running_swift(tmp_path_factory.mktemp("swift-private")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def keystone_swift(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeystoneSwiftCluster]:
    """Swift behind a real Keystone, its endpoints in Keystone's catalog. The two start at the
    same time: Swift is ready once Keystone knows its users and endpoints."""
    started = time.monotonic()
    keystone = KeystoneServer(tmp_path_factory.mktemp("keystone"))
    cluster = KeystoneSwiftCluster(tmp_path_factory.mktemp("swift-keystone"), keystone)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            swift_ready = pool.submit(cluster.start)
            try:
                keystone.start()
                keystone.populate()
                cluster.register_catalog()
            finally:
                swift_ready.result()
        keystone.started_in = cluster.started_in = time.monotonic() - started
        yield cluster
    finally:
        cluster.stop()
        keystone.stop()


@pytest.fixture(scope="session")
def keystone_server(keystone_swift: KeystoneSwiftCluster) -> KeystoneServer:
    """The real Keystone (``tests/servers/keystone.py``), populated, with Swift behind it."""
    return keystone_swift.keystone


@pytest.fixture
def keystone_swift_settings(keystone_swift: KeystoneSwiftCluster) -> SwiftSettings:
    """Settings (Keystone v3, the member's password) for a fresh, empty container."""
    return keystone_swift.settings()
