"""``make demo`` as a new user runs it, to its printed success line, then the README's example
session (taken from README.md, so the two cannot drift apart) against the running demo, and
Ctrl-C, after which nothing the demo started is left running.

The demo uses this machine's PostgreSQL (as ``tests/e2e`` does: ``postgres`` on 127.0.0.1,
trusted), a free port for its manager, a directory and a database name of its own, so it
never collides with a running suite or a user's demo.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil

from tests.conftest import skip_unless_available
from tests.servers.log_audit import audit_secret
from tests.servers.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
READY_LINE = "The demo is ready."
STOPPED_LINE = "The demo has stopped."


def readme_session() -> str:
    """The shell block of the README's section "An example session"."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## An example session", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert found, "README.md: no sh block in 'An example session'"
    return found.group(1)


def env_values(path: Path) -> dict[str, str]:
    """The demo's env file, read the way the session's shell reads it."""
    script = f"set -a; source {path}; env -0"
    output = subprocess.run(["bash", "-c", script], capture_output=True, check=True).stdout
    pairs = (entry.split("=", 1) for entry in output.decode().split("\0") if "=" in entry)
    return dict(pairs)


class Output:
    """A process's output lines, read in a thread so that waiting can time out."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._proc = proc
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, line: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while line not in self.lines:
            assert self._proc.poll() is None or line in self.lines, (
                f"make demo exited with {self._proc.returncode} before {line!r}:\n{self.text}"
            )
            assert time.monotonic() < deadline, f"no {line!r} after {timeout} s:\n{self.text}"
            time.sleep(0.2)

    def finish(self, timeout: float) -> None:
        self._thread.join(timeout)


def _require_postgres() -> None:
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=2).close()
    except OSError:
        skip_unless_available("PostgreSQL is not running on 127.0.0.1:5432")
    for tool in ("psql", "pg_dump", "pg_restore", "jq", "curl", "make"):
        if not shutil.which(tool):
            skip_unless_available(f"{tool} is not installed")


def _databases(name: str) -> str:
    # S608: the name is the test's own (osb_demo_ and hex digits)
    return subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qAtX", "-c",
         f"select datname from pg_database where datname = '{name}'"],  # noqa: S608
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip


def test_make_demo_runs_the_readme_session_and_stops_cleanly(tmp_path: Path) -> None:
    _require_postgres()
    demo_dir = tmp_path / "demo"
    database = f"osb_demo_{uuid.uuid4().hex[:10]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "DEMO_"))}
    env.update(DEMO_PORT=str(free_port()), DEMO_DIR=str(demo_dir), DEMO_DATABASE=database)
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "demo"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, to send it Ctrl-C
    )
    output = Output(proc)
    try:
        output.wait_for(READY_LINE, timeout=300)
        started = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(child.cmdline()) for child in started)
        for server in ("weed", "-m agent", "-m broker", "secantusd"):
            assert server in names, f"{server} is not running: {names}"
        demo_env = env_values(demo_dir / "env")
        audit_secret(demo_env["DEMO_KEY"], "the demo's binding key")
        audit_secret(json.loads(demo_env["DEMO_AGENT"])["password"], "the demo's agent")
        audit_secret(json.loads(demo_env["DEMO_S3"])["secret_access_key"], "the demo's S3")
        audit_secret((demo_dir / "data" / "broker-password").read_text().strip(), "demo")
        assert _databases(database) == database

        # The README's session, as written, from a directory whose .demo is this demo's.
        session_dir = tmp_path / "session"
        session_dir.mkdir()
        (session_dir / ".demo").symlink_to(demo_dir)
        session = subprocess.run(
            ["bash", "-c", readme_session()],
            cwd=session_dir,
            env={k: v for k, v in os.environ.items() if not k.startswith("DEMO_")},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert session.returncode == 0, session.stdout + session.stderr
        assert session.stdout.count('"status": "SUCCEEDED"') >= 2, session.stdout
        assert '"type": "RESTORE"' in session.stdout, session.stdout
        cli = Path(sys.executable).parent / "osb-backup"
        if cli.exists():  # the demo's env file logs the command-line tool in
            listed = subprocess.run(
                ["bash", "-c", f"source .demo/env && {cli} plans list"],
                cwd=session_dir,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert listed.returncode == 0 and "nightly" in listed.stdout, listed

        # Ctrl-C in its terminal: every process it started stops, the sample database goes.
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
        output.finish(timeout=10)
        assert STOPPED_LINE in output.lines, output.text
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, f"left running: {[p.cmdline() for p in alive]}"
        assert _databases(database) == ""
        assert not (demo_dir / "demo.pid").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def test_make_demo_says_what_it_needs_without_postgresql(tmp_path: Path) -> None:
    if not shutil.which("psql"):
        skip_unless_available("psql is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "DEMO_"))}
    env.update(PGHOST="127.0.0.1", PGPORT=str(free_port()), DEMO_DIR=str(tmp_path / "demo"))
    done = subprocess.run(
        ["make", "--no-print-directory", "demo"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Error 3" in output, output  # the demo's own status, as make reports it
    assert "The demo needs a PostgreSQL server it can reach as postgres@127.0.0.1:" in output
    assert "PGHOST, PGPORT" in output, output
    assert not (tmp_path / "demo").exists(), "nothing is started without PostgreSQL"
