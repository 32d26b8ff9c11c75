"""Run the agent as a real process and talk to it over HTTP."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers.ports import free_port, wait_listening
from tests.servers.process import terminate

USER, PASSWORD = "agent-user", "agent-pa55word-XYZ"
ROOT = Path(__file__).resolve().parents[2]


def write_script(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def tracing_scripts(
    directory: Path, *, backup_body: str | None = None, restore_body: str | None = None
) -> None:
    """A script set that records each stage and its arguments in $TRACE, and the environment
    of the backup and restore stages in ``$TRACE.<stage>.env``."""
    directory.mkdir(parents=True, exist_ok=True)
    stages = [
        "pre-backup-lock",
        "pre-backup-check",
        "backup-cleanup",
        "post-backup-unlock",
        "pre-restore-lock",
        "restore",
        "restore-cleanup",
        "post-restore-unlock",
    ]
    for stage in stages:
        dump = f' env > "$TRACE.{stage}.env";' if stage == "restore" else ""
        write_script(directory, stage, f'echo "{stage} $*" >> "$TRACE";{dump} echo out-{stage}')
    if restore_body:
        write_script(directory, "restore", restore_body)
    write_script(
        directory,
        "backup.sh",
        backup_body
        or 'echo "backup $*" >> "$TRACE"; env > "$TRACE.backup.env"; '
        'echo payload > "$BACKUP_DIRECTORY/$BACKUP_FILENAME.txt"'
        "; echo out-backup; echo err-backup >&2",
    )


def script_env(trace: Path, stage: str) -> dict[str, str]:
    """The environment a tracing script saw (single-line values only)."""
    lines = (trace.parent / f"{trace.name}.{stage}.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


class AgentProcess:
    """The agent as a real process (``python -m agent``); its output goes to ``agent.log``
    under the test's tmp_path, where the session-end audit looks for leaked secrets."""

    def __init__(self, base: Path, scripts: Path, **env: Any) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.scripts = scripts
        self.trace = base / "trace.txt"
        self.trace.touch()
        self.port = free_port()
        self.log_path = base / "agent.log"
        self.env = {
            **os.environ,
            "client_username": USER,
            "client_password": PASSWORD,
            "client_port": str(self.port),
            "client_host": "127.0.0.1",
            "directory_backup": str(base / "backup"),
            "directory_restore": str(base / "restore"),
            "state_directory": str(base / "state"),
            "scripts_path": str(scripts),
            "TRACE": str(self.trace),
            # Tests of refusals send many wrong credentials from one address; the throttle has
            # its own tests (tests/agent/test_http_hardening.py), which set a small limit.
            "auth_failure_limit": "100000",
            # Scripts get a clean environment: the tracing scripts need TRACE let through.
            "script_env_passthrough": "TRACE",
        }
        self.env.update({k: str(v) for k, v in env.items()})
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_cmd: list[str] | None = None

    def start(self) -> AgentProcess:
        self.port = free_port()
        self.env["client_port"] = str(self.port)
        log = open(self.log_path, "ab")
        cmd = self.start_cmd or [sys.executable, "-m", "agent"]
        self.proc = subprocess.Popen(
            cmd,
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_listening(self.port, timeout=30, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc:
            terminate(self.proc, 20)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def trace_lines(self) -> list[str]:
        return self.trace.read_text().splitlines()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        auth: tuple[str, str] | None = (USER, PASSWORD),
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        conn: http.client.HTTPConnection
        if "tls_cert_file" in self.env:
            ctx = ssl.create_default_context(cafile=self.env["tls_cert_file"])
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=30, context=ctx)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Content-Type": "application/json", **(headers or {})}
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        finally:
            conn.close()
        parsed: Any = None
        if payload:
            with contextlib.suppress(ValueError):
                parsed = json.loads(payload)
            if parsed is None:
                parsed = payload.decode(errors="replace")
        return resp.status, parsed

    def wait_job(self, kind: str, job_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status, body = self.request("GET", f"/{kind}/{job_id}")
            assert status == 200, (status, body)
            if body["status"] != "RUNNING":
                return body
            if time.monotonic() > deadline:
                raise TimeoutError(f"{kind} {job_id} still running: {body}")
            time.sleep(0.1)

    def wait_state(self, kind: str, job_id: str, state: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body = self.request("GET", f"/{kind}/{job_id}")
            if status == 200 and body["state"] == state:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{kind} {job_id} never reached {state}")


@pytest.fixture
def make_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """``make_agent(scripts=None, backup_body=None, restore_body=None, **env)``: an agent
    process in a directory of its own with the given env overrides, running ``scripts`` (else
    the tracing set, with these bodies); every agent started is killed at teardown."""
    started: list[AgentProcess] = []

    def make(
        scripts: Path | None = None,
        *,
        backup_body: str | None = None,
        restore_body: str | None = None,
        **env: Any,
    ) -> AgentProcess:
        base = tmp_path / f"agent{len(started)}"
        base.mkdir()
        if scripts is None:
            scripts = base / "scripts"
            tracing_scripts(scripts, backup_body=backup_body, restore_body=restore_body)
        agent = AgentProcess(base, scripts, **env)
        started.append(agent)
        return agent.start()

    yield make
    for agent in started:
        agent.kill()


def backup_request(job_id: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": job_id,
        "compression": False,
        "encryption_key": "none",
        "destination": {
            "type": "S3",
            "bucket": "bucket-1",
            "region": "us-east-1",
            "endpoint": "127.0.0.1:1",
            "authKey": "key",
            "authSecret": "s3cr3t-AUTH",
            "skipSSL": True,
            "filenamePrefix": "plan-1/",
            "skipStorage": True,
        },
        "backup": {
            "host": "127.0.0.1",
            "username": "dbuser",
            "password": "db-PASSW0RD-123",
            "database": "mydb",
            "parameters": [],
        },
    }
    return _overridden(body, overrides)


def restore_request(job_id: str, **overrides: Any) -> dict[str, Any]:
    body = backup_request(job_id)
    body["restore"] = body.pop("backup")
    body["destination"]["filename"] = "2026_01_01_00_00_127.0.0.1_mydb.txt"
    return _overridden(body, overrides)


def _overridden(body: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``body`` with ``overrides``: a dict merged into the section of that name, else set."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return body
