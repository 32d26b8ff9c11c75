"""Shared measuring code for the benchmarks: closed-loop load at a fixed concurrency for a
fixed time, percentiles, a results table, child processes started and stopped by pid, and a
bare aiohttp server (its own process) as the reference measured in the same run."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.servers.ports import free_port, wait_listening  # noqa: E402

# A bare aiohttp server: GET /bare answers the bytes of the file named on the command line
# (so it can serve exactly what the measured endpoint serves), nothing else.
BARE_SERVER = """
import sys
from aiohttp import web
body = open(sys.argv[2], "rb").read() if len(sys.argv) > 2 else b'{"ok": true}'
async def bare(request):
    return web.Response(body=body, content_type="application/json")
app = web.Application()
app.router.add_get("/bare", bare)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""

Request = Callable[[aiohttp.ClientSession, int], Awaitable[int]]


@dataclass
class Result:
    name: str
    requests: int
    errors: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        """The q-th percentile (nearest rank) in milliseconds."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        rank = max(1, math.ceil(q / 100 * len(ordered)))
        return ordered[rank - 1] * 1000


async def measure(
    name: str,
    concurrency: int,
    seconds: float,
    request: Request,
    *,
    warmup: float = 0.5,
) -> Result:
    """Run ``concurrency`` workers, each calling ``request`` back to back, for ``seconds``
    (after ``warmup`` seconds not counted). ``request`` returns an HTTP status (or 0 for a
    failure); >= 400 counts as an error."""
    latencies: list[float] = []
    errors = 0
    counter = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        start = time.perf_counter()
        counting_from = start + warmup
        deadline = counting_from + seconds

        async def worker() -> None:
            nonlocal errors, counter
            while (now := time.perf_counter()) < deadline:
                counter += 1
                try:
                    status = await request(http, counter)
                except (aiohttp.ClientError, TimeoutError):
                    status = 0
                if now >= counting_from:
                    latencies.append(time.perf_counter() - now)
                    if status == 0 or status >= 400:
                        errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - counting_from
    return Result(name, len(latencies), errors, elapsed, latencies)


def print_table(results: Sequence[Result], title: str, unit: str = "req/s") -> None:
    print(f"\n{title}\n")
    header = ("scenario", "count", "errors", unit, "p50 ms", "p99 ms")
    print("{:44} {:>8} {:>7} {:>9} {:>8} {:>8}".format(*header))
    for r in results:
        print(
            f"{r.name:44} {r.requests:>8} {r.errors:>7} {r.rate:>9.0f} "
            f"{r.percentile(50):>8.1f} {r.percentile(99):>8.1f}"
        )


class Process:
    """A child process with its output in a log file, stopped by its own pid."""

    def __init__(
        self, cmd: list[str], *, env: dict[str, str] | None = None, log: Path | None = None
    ) -> None:
        self.cmd, self.env, self.log = cmd, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int, timeout: float = 60.0) -> Process:
        out = self.log.open("ab") if self.log else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                self.cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        finally:
            if self.log:
                out.close()  # type: ignore[union-attr]
        wait_listening(port, timeout, self.proc)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def bare_server(body_file: Path | None = None, log: Path | None = None) -> tuple[Process, str]:
    """Start the bare reference server; returns it and its ``/bare`` URL."""
    port = free_port()
    cmd = [sys.executable, "-c", BARE_SERVER, str(port)]
    if body_file is not None:
        cmd.append(str(body_file))
    return Process(cmd, log=log).start(port), f"http://127.0.0.1:{port}/bare"


__all__ = ["ROOT", "Process", "Result", "bare_server", "free_port", "measure", "print_table"]
