"""The embedded MongoDB-wire-compatible server (SecantusDB) run as a child process.

Used when no ``MONGODB_URL`` is configured, so that one command runs everything on a fresh
machine, and by the test suite. Production points ``MONGODB_URL`` at a real replica set.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_command() -> list[str]:
    exe = shutil.which("secantusd-py", path=str(Path(sys.executable).parent)) or shutil.which(
        "secantusd-py"
    )
    if exe is None:
        raise RuntimeError("secantusd-py not found: install the SecantusDB package")
    return [exe]


class EmbeddedMongo:
    """A SecantusDB server on loopback with its data in ``data_dir`` (``None``: in memory)."""

    def __init__(self, data_dir: str | os.PathLike[str] | None, port: int | None = None) -> None:
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.port = port or _free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def start(self, timeout: float = 30.0) -> None:
        storage = ":memory:"
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            storage = str(self.data_dir)
        cmd = [
            *_server_command(),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--storage-path", storage,
            "--log-level", "WARNING",
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE if os.environ.get("EMBEDDED_DB_QUIET") else None,
            cwd=str(self.data_dir) if self.data_dir else None,
            start_new_session=True,  # a Ctrl-C to us is handled by us, then we stop it
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"embedded database exited with code {self._proc.returncode} on start"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"embedded database did not listen on port {self.port} in {timeout}s")

    def stop(self, timeout: float = 15.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash would."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def __enter__(self) -> EmbeddedMongo:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
