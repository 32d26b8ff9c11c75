"""Manager replicas as real processes (``python -m broker``) on one shared database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers.ports import free_port, wait_listening

ROOT = Path(__file__).resolve().parents[2]
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
