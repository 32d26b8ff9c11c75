"""Shared measuring code for the benchmarks: closed-loop load at a fixed concurrency for a
fixed time, percentiles, a results table, child processes started and stopped by pid, a bare
aiohttp server (its own process) as the reference measured in the same run, and the figures
each benchmark reports for the summary ``make bench`` ends with.

Reporting figures (every benchmark module does this, so that the summary has one line per
figure): build a :class:`Figure` for each headline number, with the reference measured in the
same run and the target, and call :func:`report` once with them::

    from benchmarks._harness import Figure, report

    report([
        Figure("agent_throughput", "backup 1 GiB zstd+AES", agent_mib_s, "MiB/s",
               reference="shell pipeline", reference_value=shell_mib_s, target_ratio=1.0),
        Figure("scheduler_fire_lag", "p99 fire lag, 10,000 due, 1 replica", p99, "s",
               higher_is_better=False, target_value=5.0),
    ])

A ratio target compares ``value / reference_value`` (``reference_value / value`` when lower
is better, so a ratio above 1 is always the better side); a value target bounds the value
itself (at least it, or at most it when lower is better); a figure may have both, or neither
(shown for information). ``report`` prints the figures and, when the script runs under
``python -m benchmarks`` (which sets ``BENCH_FIGURES``), appends them as JSON lines to that
file; the runner reads them back for the summary table. A script run on its own just prints.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
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


async def measure_calls(
    name: str,
    concurrency: int,
    seconds: float,
    call: Callable[[], Awaitable[object]],
    *,
    warmup: float = 0.5,
) -> Result:
    """:func:`measure` without HTTP: ``concurrency`` workers awaiting ``call`` back to back
    (a database's queries alone, say); an exception counts as an error."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    counting_from = start + warmup
    deadline = counting_from + seconds

    async def worker() -> None:
        nonlocal errors
        while (now := time.perf_counter()) < deadline:
            failed = False
            try:
                await call()
            except Exception:  # counted as an error; the load goes on
                failed = True
            if now >= counting_from:
                latencies.append(time.perf_counter() - now)
                errors += failed

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Result(name, len(latencies), errors, time.perf_counter() - counting_from, latencies)


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds process ``pid`` has used (Linux /proc), 0 elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Figure:
    """One headline number of a benchmark, its reference from the same run and its target."""

    benchmark: str
    name: str
    value: float
    unit: str
    reference: str = ""
    """What the value is compared with (a bare handler, the shell pipeline, boto3, ...)."""
    reference_value: float | None = None
    higher_is_better: bool = True
    target_ratio: float | None = None
    """The ratio (better side above 1) must reach this."""
    target_value: float | None = None
    """The value must reach this (at least; at most when lower is better)."""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.reference_value is None or not self.value or not self.reference_value:
            return None
        if self.higher_is_better:
            return self.value / self.reference_value
        return self.reference_value / self.value

    @property
    def target(self) -> str:
        parts = []
        if self.target_ratio is not None:
            parts.append(f"ratio >= {self.target_ratio:g}")
        if self.target_value is not None:
            sign = ">=" if self.higher_is_better else "<"
            parts.append(f"{sign} {self.target_value:g} {self.unit}")
        return ", ".join(parts)

    @property
    def met(self) -> bool | None:
        """Whether every target is reached; None when there is none."""
        if self.target_ratio is None and self.target_value is None:
            return None
        ok = True
        if self.target_ratio is not None:
            ok = ok and self.ratio is not None and self.ratio >= self.target_ratio
        if self.target_value is not None:
            ok = ok and (
                self.value >= self.target_value
                if self.higher_is_better
                else self.value < self.target_value
            )
        return ok


FIGURES_ENV = "BENCH_FIGURES"


def report(figures: Sequence[Figure]) -> None:
    """Print ``figures``, and hand them to the ``python -m benchmarks`` summary if it runs."""
    print_figures(figures, "figures")
    path = os.environ.get(FIGURES_ENV)
    if path:
        with open(path, "a") as f:
            for figure in figures:
                f.write(json.dumps(asdict(figure)) + "\n")


def read_figures(path: Path) -> list[Figure]:
    """The figures :func:`report` wrote to ``path`` (none if it was not written)."""
    if not path.exists():
        return []
    return [Figure(**json.loads(line)) for line in path.read_text().splitlines() if line]


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def print_figures(figures: Sequence[Figure], title: str) -> None:
    """The figures as one table: value, reference, ratio, target, and whether it is met."""
    print(f"\n{title}\n")
    header = ("benchmark", "figure", "value", "reference", "ratio", "target", "met")
    row = "{:20} {:46} {:>16} {:>34} {:>6} {:>22} {:>4}"
    print(row.format(*header))
    for f in figures:
        reference = (
            f"{f.reference} {_number(f.reference_value)}".strip()
            if f.reference or f.reference_value is not None
            else "-"
        )
        met = {True: "yes", False: "NO", None: "-"}[f.met]
        print(
            row.format(
                f.benchmark[:20],
                f.name[:46],
                f"{_number(f.value)} {f.unit}",
                reference[:34],
                f"{f.ratio:.2f}" if f.ratio is not None else "-",
                f.target[:22] or "-",
                met,
            )
        )
        if f.note:
            print(f"{'':20} ({f.note})")


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


__all__ = [
    "FIGURES_ENV",
    "ROOT",
    "Figure",
    "Process",
    "Result",
    "bare_server",
    "cpu_seconds",
    "free_port",
    "measure",
    "measure_calls",
    "print_figures",
    "print_table",
    "read_figures",
    "report",
]
