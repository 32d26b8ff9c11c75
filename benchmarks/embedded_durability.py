"""What syncing the embedded database's log on every commit costs on the service's own writes.

    .venv/bin/python benchmarks/embedded_durability.py [--jobs 300] [--concurrency 4]

The embedded SecantusDB on a data directory on disk, started three ways in one run, each
measured with the same write mix: the writes of one backup job as the job runner makes them
(queued: ``jobs.new_job`` inserted; claimed: ``jobs.try_claim``; a lease renewal; three item
writes while it runs: stage, logs, last heard; its restore point inserted; ended:
``jobs.finish``), ``--concurrency`` jobs at a time (``RUNNER_CONCURRENCY``'s default is 4).

- ``default, j:true``: the server as the manager starts it, the client with the service's
  write concern (``backup.database.connect``: majority, journaled). This SecantusDB honours
  ``j: true`` per write by committing that write with ``sync=on``.
- ``--sync-on-commit, j:true``: the server syncing its log on every commit, whatever a
  write asks (also the writes a client sends without ``j``, and the server's own).
- ``default, j:false``: the reference: what an unsynced commit costs (acknowledged before
  the log reaches the disk, as every write was before the server honoured ``j``).

The cases run in alternating rounds, so that the machine's load changing during the run falls
on each alike. Reported: jobs per second (median of the rounds) and the median / 95th
percentile of one write. Figures move with the machine and its disk; compare the rows of one
run.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pymongo import WriteConcern  # noqa: E402

from backup import jobs  # noqa: E402
from backup.database import Database, connect  # noqa: E402
from backup.embedded_db import _server_command  # noqa: E402
from tests.servers.ports import free_port, wait_listening  # noqa: E402


class Timed:
    """Each awaited write's latency."""

    def __init__(self) -> None:
        self.latencies: list[float] = []

    async def __call__(self, coro: Any) -> Any:
        start = time.perf_counter()
        result = await coro
        self.latencies.append(time.perf_counter() - start)
        return result


async def one_job(store: Database, n: int, timed: Timed) -> None:
    now = datetime.now(UTC)
    job = jobs.new_job(
        instance_id=f"instance-{n}",
        type=jobs.JobType.BACKUP,
        plan_id=f"plan-{n}",
        destination_id="d",
        trigger=jobs.Trigger.MANUAL,
        items=[jobs.new_item("orders")],
        compression=True,
        encryption={"enabled": False},
    )
    await timed(store.jobs.insert_one(job))
    lease = await timed(
        jobs.try_claim(store, job, owner="bench", at=now, lease_seconds=30, deadline_seconds=3600)
    )
    assert isinstance(lease, jobs.Lease), lease
    await timed(jobs.renew(store, lease, at=now, lease_seconds=30))
    for stage in ("pre-backup-lock", "backup", "post-backup-unlock"):
        await timed(
            jobs.update_held(
                store,
                lease,
                {
                    "items.0.stage": stage,
                    "items.0.logs": {f"{stage}_log": "x" * 200},
                    "items.0.last_heard_at": datetime.now(UTC),
                },
            )
        )
    point = {
        "_id": job["_id"],
        "instance_id": job["instance_id"],
        "plan_id": job["plan_id"],
        "destination_id": "d",
        "job_id": job["_id"],
        "state": "available",
        "created_at": now,
        "items": [{"name": "orders", "key": f"k/{n}", "size": 1000, "checksum": "sha256:00"}],
    }
    await timed(store.restore_points.insert_one(point))
    await timed(jobs.finish(store, lease, jobs.JobStatus.SUCCEEDED, None, at=datetime.now(UTC)))


async def measure(
    store: Database, first: int, n_jobs: int, concurrency: int, timed: Timed
) -> float:
    """Run ``n_jobs`` jobs' writes; the seconds they took."""
    queue = iter(range(first, first + n_jobs))

    async def worker() -> None:
        for n in queue:
            await one_job(store, n, timed)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def run(urls: list[tuple[str, bool]], args: argparse.Namespace) -> list[dict[str, float]]:
    """The cases in turns (round ``r`` of every case, then round ``r + 1``), so that a change
    of the machine's load during the run falls on all of them alike."""
    stores = []
    for url, journal in urls:
        store = connect(url, "bench")
        await store.ensure_indexes()
        if not journal:
            store.mongo = store.mongo.with_options(write_concern=WriteConcern(w=1, j=False))
        stores.append(store)
    timers = [Timed() for _ in stores]
    rates: list[list[float]] = [[] for _ in stores]
    per_round = max(1, args.jobs // args.rounds)
    for r in range(args.rounds):
        for i, store in enumerate(stores):
            seconds = await measure(store, r * per_round, per_round, args.concurrency, timers[i])
            rates[i].append(per_round / seconds)
    for store in stores:
        await store.close()
    out = []
    for timed, case_rates in zip(timers, rates, strict=True):
        ordered = sorted(timed.latencies)
        out.append(
            {
                "jobs_per_s": statistics.median(case_rates),
                "writes": len(ordered),
                "p50_ms": statistics.median(ordered) * 1000,
                "p95_ms": ordered[int(0.95 * (len(ordered) - 1))] * 1000,
            }
        )
    return out


def start_server(path: Path, sync: bool) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [
        *_server_command(),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--storage-path", str(path),
        "--log-level", "WARNING",
    ]  # fmt: skip
    if sync:
        cmd.append("--sync-on-commit")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    wait_listening(port, timeout=30, proc=proc)
    return proc, f"mongodb://127.0.0.1:{port}/?directConnection=true"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300, help="per case")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    cases = [
        ("default, j:true (service)", False, True),
        ("--sync-on-commit, j:true", True, True),
        ("default, j:false (reference)", False, False),
    ]
    base = Path(tempfile.mkdtemp(prefix="durability-", dir=str(ROOT / "benchmarks")))
    procs = []
    try:
        urls = []
        for n, (_, sync, journal) in enumerate(cases):
            path = base / f"case-{n}"
            path.mkdir()
            proc, url = start_server(path, sync)
            procs.append(proc)
            urls.append((url, journal))
        rows = asyncio.run(run(urls, args))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(base, ignore_errors=True)
    print(
        f"{args.jobs} backup jobs' writes (8 each) per case, {args.concurrency} at a time, on "
        f"disk, the cases in {args.rounds} alternating rounds (jobs/s: median of the rounds)"
    )
    print(f"{'server, write concern':<32}{'jobs/s':>9}{'writes':>8}{'p50 ms':>9}{'p95 ms':>9}")
    for (name, _, _), r in zip(cases, rows, strict=True):
        print(
            f"{name:<32}{r['jobs_per_s']:>9.1f}{int(r['writes']):>8}"
            f"{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}"
        )
    from benchmarks._harness import Figure, report

    reference = rows[2]["jobs_per_s"]
    report(
        [
            Figure("embedded_durability", name, r["jobs_per_s"], "jobs/s", cases[2][0], reference)
            for (name, _, _), r in zip(cases[:2], rows[:2], strict=True)
        ]
    )


if __name__ == "__main__":
    main()
