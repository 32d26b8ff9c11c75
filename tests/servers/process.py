"""A test server run as a child process on loopback, started and stopped by its pid."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from tests.servers.ports import wait_listening


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Stop ``proc`` as an operator would: SIGTERM, then SIGKILL if it has not exited after
    ``timeout`` seconds. Its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout)


class ServerProcess:
    """One server process in a session of its own, its output appended to ``base/log_name``.

    Subclasses give the command line and what "ready" means; ``stop()`` followed by
    ``start()`` brings the same server back (same ports, same data), which is what the
    fault-injection fixtures rely on."""

    name = "server"
    log_name = "server.log"

    def __init__(self, base: Path) -> None:
        self.base = base
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # ------------------------------------------------------------------ for subclasses

    def _prepare(self) -> None:
        """Directories and configuration the command needs, before each start."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str] | None:
        """The child's environment (None: this process's)."""
        return None

    def _listening_ports(self) -> list[int]:
        raise NotImplementedError

    def _wait_ready(self, timeout: float) -> None:
        """Listening is not always serving: subclasses wait for a real request here."""

    def _after_stop(self) -> None:
        """Clean-up once the process is gone."""

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 90.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self._prepare()
        self._log = open(self.base / self.log_name, "ab")  # closed in stop()
        self.proc = subprocess.Popen(
            self._command(),
            cwd=self.base,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._env(),
            start_new_session=True,
        )
        try:
            for port in self._listening_ports():
                wait_listening(port, timeout=timeout, proc=self.proc)
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _poll_ready(self, probe: Callable[[], None], timeout: float, what: str) -> None:
        """Call ``probe`` until it returns without raising; fail at once if the process
        exits, and with the last error once ``timeout`` has passed."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            code = self.proc.poll() if self.proc is not None else None
            if code is not None:
                raise RuntimeError(f"{self.name} exited with {code}; see {self.base}")
            try:
                probe()
                return
            except Exception as exc:
                last = exc
                time.sleep(0.2)
        raise TimeoutError(f"{what} not ready after {timeout}s: {last!r}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            terminate(proc, 15)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._after_stop()

    def kill(self) -> None:
        """Stop at once (SIGKILL), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=15)
        self.stop()
