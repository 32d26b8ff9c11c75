"""The whole product, through its public interfaces only, on real servers: a platform
registers a database instance through OSB, an application binds and uses its key to create a
destination and an encrypted plan, backs up now, the database loses its data, and a restore
through the API brings back every row. The service runs its scheduler, job runner and
retention; our agent (a real process) runs the tested example scripts against this machine's
PostgreSQL or MariaDB and streams to the suite's SeaweedFS or Swift.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from storage import S3Settings, SwiftSettings, open_store
from tests.agent.helpers import PASSWORD as AGENT_PASSWORD
from tests.agent.helpers import ROOT, USER, AgentProcess
from tests.conftest import skip_unless_available
from tests.servers.broker import BROKER_PASSWORD, BROKER_USER, Service
from tests.servers.log_audit import audit_secret

SERVICE_ID = "a2cc3ad7-d439-406d-9c62-e2be817c72fe"
STANDARD = "969e6b3d-4200-4f87-b552-cbc6882e7c95"
OSB = {"X-Broker-API-Version": "2.17"}
DB_PASSWORD = "e2e-db-password-Kq71"
ENCRYPTION_KEY = "e2e-plan-encryption-key-0c5f7d9a"


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout


class Postgres:
    port, user, scripts = 5432, "postgres", "postgresql"
    parameters = {"PGSSLMODE": "disable"}

    def __init__(self) -> None:
        self.db = f"e2e_{uuid.uuid4().hex[:10]}"

    def sql(self, sql: str, db: str | None = None) -> str:
        return _sh(
            "psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db or self.db,
            "-qAtX", "-v", "ON_ERROR_STOP=1", "-c", sql,
        )  # fmt: skip

    def create(self) -> None:
        self.sql(f"create database {self.db}", db="postgres")
        self.sql(
            "create table orders (id int primary key, customer text, total numeric(10,2));"
            "insert into orders select i, 'customer ' || (i % 97) || repeat(' x', 10), i * 1.25"
            " from generate_series(1, 5000) i;"
        )

    def rows(self) -> str:
        return self.sql("select * from orders order by id")

    def lose_data(self) -> None:
        self.sql("drop table orders")

    def cleanup(self) -> None:
        self.sql(f"drop database if exists {self.db} with (force)", db="postgres")


class MariaDB:
    """Backed up as a user of its own, whose password reaches the scripts through the agent's
    secrets file (never a command line)."""

    port, scripts = 3306, "mariadb"
    parameters: dict[str, str] = {}

    def __init__(self) -> None:
        self.db = f"e2e_{uuid.uuid4().hex[:10]}"
        self.user = self.db

    def sql(self, sql: str, db: str | None = None) -> str:
        args = ["mariadb", "-h", "127.0.0.1", "-u", "root", "-N", "-B", "-e", sql]
        return _sh(*args, *([] if db == "" else [db or self.db]))

    def create(self) -> None:
        self.sql(f"create database {self.db}", db="")
        self.sql(
            f"create user '{self.user}'@'%' identified by '{DB_PASSWORD}';"
            f"grant all privileges on {self.db}.* to '{self.user}'@'%';",
            db="",
        )
        self.sql(
            "create table orders (id int primary key, customer text, total decimal(10,2));"
            "insert into orders select seq, concat('customer ', seq % 97, repeat(' x', 10)),"
            " seq * 1.25 from seq_1_to_5000;"
        )

    def rows(self) -> str:
        return self.sql("select * from orders order by id")

    def lose_data(self) -> None:
        self.sql("drop table orders")

    def cleanup(self) -> None:
        self.sql(f"drop database if exists {self.db}; drop user if exists '{self.user}'@'%'", db="")


def _require(port: int, name: str) -> None:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        skip_unless_available(f"{name} is not running on 127.0.0.1:{port}")


def _destination(settings: S3Settings | SwiftSettings) -> dict[str, Any]:
    """The API's body for a destination reaching ``settings`` (as a user would type it)."""
    if isinstance(settings, S3Settings):
        return {
            "type": "S3",
            "name": "primary",
            "endpoint": settings.endpoint,
            "region": settings.region,
            "bucket": settings.bucket,
            "access_key_id": settings.access_key_id,
            "secret_access_key": settings.secret_access_key.get_secret_value(),
            "addressing_style": settings.addressing_style,
        }
    return {
        "type": "SWIFT",
        "name": "primary",
        "auth_url": settings.auth_url,
        "auth_version": settings.auth_version,
        "username": settings.username,
        "password": settings.password.get_secret_value(),
        "container": settings.container,
    }


class Client:
    """The two callers of the service: the platform (OSB, broker credentials) and the bound
    application (the backup-manager API, the binding's key)."""

    def __init__(self, service: Service, instance_id: str) -> None:
        self.service, self.instance_id = service, instance_id
        self.broker = {"Authorization": aiohttp.encode_basic_auth(BROKER_USER, BROKER_PASSWORD)}
        self.key: str | None = None

    async def osb(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = {**OSB, **self.broker}
        async with self.service.http.request(
            method, self.service.url + path, headers=headers, **kw
        ) as r:
            return r.status, await r.json(content_type=None)

    async def api(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        assert self.key is not None
        url = f"{self.service.url}/v1/service_instances/{self.instance_id}{path}"
        headers = {"Authorization": f"Bearer {self.key}"}
        async with self.service.http.request(method, url, headers=headers, **kw) as r:
            return r.status, await r.json(content_type=None)

    async def operation_done(self, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        path = f"/v2/service_instances/{self.instance_id}/last_operation"
        while True:
            status, body = await self.osb("GET", path)
            assert status == 200, body
            if body["state"] != "in progress":
                return body
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.2)

    async def register_and_bind(self, engine: Postgres | MariaDB, agent: AgentProcess) -> None:
        """Provision the instance of ``engine``'s database served by ``agent``, wait for the
        operation, and bind an application: its key is then this client's."""
        status, body = await self.osb(
            "PUT",
            f"/v2/service_instances/{self.instance_id}?accepts_incomplete=true",
            json={
                "service_id": SERVICE_ID,
                "plan_id": STANDARD,
                "context": {"platform": "cloudfoundry", "organization_guid": "o"},
                "parameters": {
                    "agent": {
                        "url": f"http://127.0.0.1:{agent.port}",
                        "username": USER,
                        "password": AGENT_PASSWORD,
                    },
                    "database": {
                        "host": "127.0.0.1",
                        "port": engine.port,
                        "username": engine.user,
                        "password": DB_PASSWORD,
                        "parameters": engine.parameters,
                    },
                    "items": [engine.db],
                },
            },
        )
        assert status == 202, body
        assert (await self.operation_done())["state"] == "succeeded"
        status, binding = await self.osb(
            "PUT",
            f"/v2/service_instances/{self.instance_id}/service_bindings/app-1",
            json={"service_id": SERVICE_ID, "plan_id": STANDARD},
        )
        assert status == 201, binding
        self.key = binding["credentials"]["key"]
        audit_secret(self.key, "a binding key")

    async def job_done(self, job_id: str, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status, job = await self.api("GET", f"/jobs/{job_id}")
            assert status == 200, job
            if job["status"] not in ("QUEUED", "RUNNING"):
                return job
            assert time.monotonic() < deadline, job
            await asyncio.sleep(0.3)


@pytest.mark.parametrize(
    ("engine_kind", "backend"),
    [(Postgres, "s3"), (MariaDB, "swift")],
    ids=["postgresql-s3", "mariadb-swift"],
)
async def test_register_bind_back_up_lose_the_data_and_restore_it(
    request: pytest.FixtureRequest,
    service: Service,
    tmp_path: Path,
    engine_kind: type[Postgres] | type[MariaDB],
    backend: str,
) -> None:
    engine = engine_kind()
    _require(engine.port, engine.scripts)
    settings: S3Settings | SwiftSettings = request.getfixturevalue(f"{backend}_settings")
    for secret in (DB_PASSWORD, ENCRYPTION_KEY):
        audit_secret(secret, "the full-stack test")
    agent = AgentProcess(
        tmp_path / "agent", ROOT / "agent" / "examples" / engine.scripts, secrets_via="fd"
    ).start()
    engine.create()
    try:
        client = Client(service, str(uuid.uuid4()))
        # 1. The data-service broker registers its instance (asynchronous: the agent is asked).
        # 2. An application binds: an API key for this instance, shown once.
        await client.register_and_bind(engine, agent)

        # 3. With it: a checked destination and a nightly plan, compressed and encrypted.
        status, dest = await client.api(
            "POST", "/destinations?validate=true", json=_destination(settings)
        )
        assert status == 201, dest
        assert "secret_access_key" not in dest and "password" not in dest
        status, plan = await client.api(
            "POST",
            "/plans",
            json={
                "name": "nightly",
                "destination_id": dest["id"],
                "frequency": "0 3 * * *",
                "timezone": "Europe/Berlin",
                "retention": {"style": "FILES", "period": 3},
                "compression": True,
                "encryption": {"enabled": True, "key": ENCRYPTION_KEY},
            },
        )
        assert status == 201, plan
        assert plan["next_run_at"] and plan["encryption"] == {"enabled": True, "key_set": True}

        # 4. Back up now (a pipeline before a migration); the runner drives the agent.
        before = engine.rows()
        status, job = await client.api("POST", "/backups", json={"plan_id": plan["id"]})
        assert status == 202 and job["status"] == "QUEUED", job
        job = await client.job_done(job["id"])
        assert job["status"] == "SUCCEEDED", (job["reason"], job["items"])
        status, points = await client.api("GET", "/restore_points")
        assert status == 200 and points["total"] == 1
        point = points["items"][0]
        (item,) = point["items"]
        assert item["name"] == engine.db and item["checksum"].startswith("sha256:")
        assert item["compression"] == "zstd" and item["encryption"] == "aes-256-gcm-stream-v1"
        async with open_store(settings) as objects:
            stored = b"".join([c async for c in objects.download(item["key"])])
        assert len(stored) == item["stored_size"]
        assert b"customer 1" not in stored, "no plaintext reached the storage"

        # 5. The data is lost; a restore through the API brings every row back.
        engine.lose_data()
        with pytest.raises(subprocess.CalledProcessError):
            engine.rows()
        status, restore = await client.api(
            "POST", "/restores", json={"restore_point_id": point["id"]}
        )
        assert status == 202 and restore["type"] == "RESTORE", restore
        restore = await client.job_done(restore["id"])
        assert restore["status"] == "SUCCEEDED", (restore["reason"], restore["items"])
        assert engine.rows() == before

        # 6. The platform deletes the instance; the backups are kept by default.
        status, body = await client.osb(
            "DELETE",
            f"/v2/service_instances/{client.instance_id}"
            f"?service_id={SERVICE_ID}&plan_id={STANDARD}&accepts_incomplete=true",
        )
        assert status in (200, 202), body
        assert (await client.operation_done())["state"] == "succeeded"
        async with open_store(settings) as objects:
            kept = sorted([o.key async for o in objects.list()])
        # its file, and the manifest that describes it (docs/recovery.md)
        manifest = f"{client.instance_id}/{plan['id']}/{point['id']}.osb-manifest.json"
        assert kept == sorted([item["key"], manifest])
    finally:
        agent.stop()
        engine.cleanup()
