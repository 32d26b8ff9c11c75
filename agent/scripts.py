"""Running one DBA script: bounded output capture, timeout, process-group kill."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MANDATORY = frozenset({"backup", "restore"})


@dataclass(slots=True)
class StageResult:
    stage: str
    found: bool
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.found or (self.returncode == 0 and not self.timed_out)

    def failure(self) -> str:
        if self.timed_out:
            return f"script {self.stage} timed out and was killed"
        return f"script {self.stage} exited with status {self.returncode}"


def secrets_fd(secrets: dict[str, str]) -> int:
    """An anonymous in-memory file holding ``NAME='value'`` lines, for a script to read with
    ``. "$AGENT_SECRETS_FILE"``: the values reach neither the command line nor the
    environment, and nothing touches the disk. Re-opening ``/dev/fd/N`` starts at offset 0,
    so it can be read more than once."""
    fd = os.memfd_create("agent-secrets", os.MFD_CLOEXEC)
    data = "".join(f"{k}={shlex.quote(v)}\n" for k, v in secrets.items()).encode()
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def find_script(scripts_path: Path, stage: str) -> Path | None:
    for name in (stage, f"{stage}.sh"):
        path = scripts_path / name
        if path.is_file():
            return path
    return None


async def _read_tail(stream: asyncio.StreamReader, limit: int) -> str:
    buf = bytearray()
    truncated = False
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            del buf[: len(buf) - limit]
            truncated = True
    text = buf.decode("utf-8", errors="replace")
    return ("[... output truncated ...]\n" + text) if truncated else text


def _killpg(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def run_script(
    path: Path,
    stage: str,
    args: list[str],
    env: dict[str, str],
    *,
    cwd: Path,
    timeout: float,
    log_limit: int,
    pass_fds: tuple[int, ...] = (),
    on_start: Callable[[int], None] | None = None,
) -> StageResult:
    """Run ``path`` in its own session; on timeout or cancellation the whole process group
    is killed so that no child (pg_dump, ...) outlives the stage. An executable script runs
    through its own shebang; a plain file through bash, as the Go agent runs every script."""
    if os.access(path, os.X_OK):
        cmd = [str(path), *args]
    else:
        cmd = [shutil.which("bash") or "/bin/sh", str(path), *args]
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=str(cwd),
        start_new_session=True,
        pass_fds=pass_fds,
    )
    assert proc.stdout is not None and proc.stderr is not None
    if on_start is not None:
        on_start(proc.pid)
    readers = asyncio.gather(_read_tail(proc.stdout, log_limit), _read_tail(proc.stderr, log_limit))
    timed_out = False
    try:
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            timed_out = True
            _killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                _killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        try:
            # A background child that inherited the pipes would keep them open forever.
            out, err = await asyncio.wait_for(asyncio.shield(readers), 5)
        except TimeoutError:
            _killpg(proc.pid, signal.SIGKILL)
            out, err = await readers
    except BaseException:
        _killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(proc.wait(), 5)
        readers.cancel()
        raise
    _killpg(proc.pid, signal.SIGKILL)  # leftovers of a finished stage
    return StageResult(
        stage=stage,
        found=True,
        returncode=proc.returncode,
        stdout=out,
        stderr=err,
        timed_out=timed_out,
        seconds=time.monotonic() - started,
    )


def kill_leftover_group(pid: int) -> bool:
    """Kill a script group left by a crashed agent; only if ``pid`` still leads its own
    session, so that a recycled pid of an unrelated process is never hit."""
    try:
        if os.getsid(pid) != pid:
            return False
    except (ProcessLookupError, PermissionError):
        return False
    _killpg(pid, signal.SIGKILL)
    return True
