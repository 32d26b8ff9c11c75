"""Manager replicas as real processes (``python -m broker``) on one shared database, and the
API calls tests make through them.

Fixtures (import them into the test module or its conftest):

- ``shared_database``: a fresh database on the session's server that every replica of the
  test uses, with master keys and broker credentials of its own: a :class:`SharedDatabase`
  whose ``env`` is what each replica needs to reach it, ``store`` the test's own handle and
  ``box`` the keys to seal seeded secrets with. Dropped at teardown.
- ``managers``: ``managers(n, **env)`` starts n replicas with the same environment (each on
  its own port with its own data directory; the test's own settings are not inherited) and
  waits until each answers ``/ready``; all are stopped at teardown, by process id.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from backup.database import Database, connect
from backup.secrets import SecretBox, generate_master_key_spec, parse_master_keys
from storage import S3Settings
from tests.servers.broker import TEST_EGRESS
from tests.servers.log_audit import audit_secret
from tests.servers.ports import free_port, wait_listening

ROOT = Path(__file__).resolve().parents[2]
BROKER_USER, BROKER_PASSWORD = "replica-test", "replica-broker-PW-4417"
audit_secret(BROKER_PASSWORD, "tests.servers.managers.BROKER_PASSWORD")
# Variables of the test's own environment a replica must not inherit.
_OWN = ("MONGODB_", "BROKER_", "SECRETS_", "RUNNER_", "RETENTION_", "BACKGROUND_", "PORT")


class ManagerProcess:
    """One replica; its log (JSON lines) goes to ``<base>/manager-<n>.log``."""

    def __init__(self, base: Path, index: int, env: dict[str, str]) -> None:
        self.index = index
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / f"manager-{index}.log"
        self.data_dir = base / f"manager-{index}"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(_OWN)}
        self.env.update(env)
        self.env.update(
            PORT=str(self.port),
            LISTEN_HOST="127.0.0.1",
            PUBLIC_URL=self.url,
            DATA_DIR=str(self.data_dir),
            **TEST_EGRESS,
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ManagerProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "broker"],
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_listening(self.port, timeout=60, proc=self.proc)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/ready", timeout=5) as r:  # noqa: S310
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"replica {self.index} never became ready; see {self.log_path}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def logged(self, event: str, **fields: Any) -> bool:
        """Whether this replica logged ``event`` (with these field values)."""
        return any(
            e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
            for e in self.log_events()
        )

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One request to this replica's API with the broker's credentials (blocking):
        the status and the decoded JSON answer."""
        token = base64.b64encode(f"{BROKER_USER}:{BROKER_PASSWORD}".encode()).decode()
        req = urllib.request.Request(  # noqa: S310 - loopback
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:  # noqa: S310
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """:meth:`call` from a test's event loop (in a thread: the loop keeps running)."""
        return await asyncio.to_thread(self.call, method, path, body)

    async def create_s3_destination(
        self, instance_id: str, settings: S3Settings, name: str = "primary"
    ) -> dict[str, Any]:
        """Create an S3 destination of ``instance_id`` through this replica's API; its JSON."""
        status, dest = await self.api(
            "POST",
            f"/v1/service_instances/{instance_id}/destinations",
            {
                "type": "S3",
                "name": name,
                "endpoint": settings.endpoint,
                "bucket": settings.bucket,
                "region": settings.region,
                "access_key_id": settings.access_key_id,
                "secret_access_key": settings.secret_access_key.get_secret_value(),
                "addressing_style": "path",
            },
        )
        assert status == 201, dest
        return dest


@dataclass
class SharedDatabase:
    """The database the replicas of one test share, and what they need to reach it."""

    db: Database
    box: SecretBox
    env: dict[str, str]


@pytest.fixture
async def shared_database(mongo_url: str) -> AsyncIterator[SharedDatabase]:
    keys = generate_master_key_spec()
    audit_secret(keys, "the master keys of a shared_database")
    database = f"replicas_{uuid.uuid4().hex[:10]}"
    store = connect(mongo_url, database)
    env = {
        "MONGODB_URL": mongo_url,
        "MONGODB_DATABASE": database,
        "BROKER_USERNAME": BROKER_USER,
        "BROKER_PASSWORD": BROKER_PASSWORD,
        "SECRETS_MASTER_KEYS": keys,
    }
    try:
        yield SharedDatabase(store, SecretBox(parse_master_keys(keys)), env)
    finally:
        await store.client.drop_database(database)
        await store.close()


@pytest.fixture
def managers(tmp_path: Path) -> Iterator[Callable[..., list[ManagerProcess]]]:
    """``managers(n, **env)`` starts n replicas with the same environment; all are stopped
    at teardown (by process id)."""
    started: list[ManagerProcess] = []

    def start(n: int, **env: str) -> list[ManagerProcess]:
        group = [ManagerProcess(tmp_path, len(started) + i, env) for i in range(n)]
        started.extend(group)
        for m in group:
            m.start()
        return group

    yield start
    for m in started:
        m.terminate()
