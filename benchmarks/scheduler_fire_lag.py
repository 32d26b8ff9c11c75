"""Scheduler fire lag with 10,000 active plans (1,000 instances) on one database, with one
scheduler replica and with three, each a separate process.

    .venv/bin/python benchmarks/scheduler_fire_lag.py [--plans 10000] [--instances 1000]
        [--window 60] [--replicas 1,3] [--no-herd]

What is measured, exactly:

- **Fire lag** = the moment the fire's job was written (``insert`` acknowledged by the
  database) minus the fire time (``scheduled_for``), as each replica's scheduler measures it
  (the same figure as ``backup_scheduler_queue_lag_seconds`` in /metrics). The job runner is
  not running: this is the scheduler's part (the runner's start lag is its own benchmark).
- **Spread**: every plan fires once in a ``--window`` seconds window, fires spread evenly over
  it (10,000 in 60 s = 167 fires a second). Cron has minute granularity, so the fire times
  are placed directly in the database (``next_run_at``, to the millisecond); the scheduler
  then does what it always does: reads due plans, writes one job per fire, computes the next
  fire with croniter in the plan's zone and advances the plan with a compare-and-set. The
  plans' frequency is yearly, so each fires once in the window.
- **Herd** (reference): every plan due at the same instant, as 10,000 plans all at
  ``0 3 * * *`` would be.
- **Missed** = fires with no job once the run is over; **duplicates** = fires with more than
  one job (the unique index makes that impossible: it is counted, not assumed).
- **CPU per fire** = the CPU seconds (user + system) of the scheduler processes during the
  run (psutil), divided by the fires; the database server's CPU is shown beside it.

The database is the embedded SecantusDB (the product's default and the test suite's), with
the store's write concern (majority, journaled). Figures measured on a shared, loaded
machine are pessimistic; the run prints the load average beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from backup.embedded_db import EmbeddedMongo  # noqa: E402
from backup.store import Store, connect  # noqa: E402

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo"]
FAR = datetime(2099, 1, 1, tzinfo=UTC)


# ----------------------------------------------------------------------------- worker


def worker(url: str, database: str, replica: str) -> None:
    """One scheduler replica (``--worker``): runs until its stdin closes, then prints its
    stats and the lags it measured as one JSON line."""
    import structlog

    from scheduler import Scheduler, SchedulerObserver, load_scheduler_settings

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))

    class Lags(SchedulerObserver):
        def __init__(self) -> None:
            self.lags: list[float] = []

        def fired(self, trigger: str, lag_seconds: float) -> None:
            self.lags.append(lag_seconds)

    async def main() -> None:
        store = connect(url, database)
        lags = Lags()
        s = Scheduler(store, load_scheduler_settings(), replica_id=replica, observer=lags)
        await s.start()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await s.stop()
        print(json.dumps({"stats": asdict(s.stats), "lags": lags.lags}), flush=True)
        await store.close()

    asyncio.run(main())


class Replica:
    def __init__(self, url: str, database: str, name: str, log: Path) -> None:
        env = {**os.environ, "SCHEDULER_POLL_SECONDS": "5", "LOG_LEVEL": "WARNING"}
        self.log = open(log, "ab")  # closed in finish()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", url, database, name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if line != "ready":
            raise RuntimeError(f"scheduler replica {name} did not start: {line!r}; see {log}")
        self.ps = psutil.Process(self.proc.pid)

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def finish(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        out = self.proc.stdout.read().decode().strip().splitlines()
        self.proc.wait(60)
        self.log.close()
        return json.loads(out[-1])


# ----------------------------------------------------------------------------- setup


async def load(store: Store, plans: int, instances: int) -> None:
    at = datetime.now(UTC)
    common = {"created_at": at, "updated_at": at, "version": 1, "schema_version": 1}
    inst = [
        {"_id": str(uuid.uuid4()), "state": "ready", "items": ["db"], **common}
        for _ in range(instances)
    ]
    dests = [
        {"_id": uuid.uuid4().hex, "instance_id": i["_id"], "name": "primary", "type": "S3"}
        for i in inst
    ]
    await store.instances.insert_many(inst)
    await store.destinations.insert_many([{**d, **common} for d in dests])
    docs = []
    for n in range(plans):
        k = n % instances
        docs.append(
            {
                "_id": uuid.uuid4().hex,
                "instance_id": inst[k]["_id"],
                "name": f"plan-{n}",
                "destination_id": dests[k]["_id"],
                "frequency": "0 0 1 1 *",
                "timezone": ZONES[n % len(ZONES)],
                "items": ["db"],
                "retention": {"style": "FILES", "period": 3},
                "compression": True,
                "encryption": {"enabled": False},
                "secrets": {},
                "paused": False,
                "next_run_at": FAR,
                "last_job_id": None,
                "slot": n,
                **common,
            }
        )
    for i in range(0, len(docs), 1000):
        await store.plans.insert_many(docs[i : i + 1000])


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def scenario(
    server: EmbeddedMongo, tmp: Path, *, kind: str, replicas: int, plans: int, instances: int,
    window: float,
) -> dict[str, Any]:  # fmt: skip
    database = f"bench_sched_{uuid.uuid4().hex[:8]}"
    store = connect(server.url, database)
    await store.ensure_indexes()
    t = time.perf_counter()
    await load(store, plans, instances)
    load_s = time.perf_counter() - t
    group = [
        Replica(server.url, database, f"replica-{i}", tmp / f"{database}-{i}.log")
        for i in range(replicas)
    ]
    db_ps = psutil.Process(server._proc.pid) if server._proc else None  # type: ignore[attr-defined]
    # the fires are placed after the update that places them is surely done
    margin = 15 + plans * 0.004
    t0 = (datetime.now(UTC) + timedelta(seconds=margin)).replace(microsecond=0)
    step_ms = window * 1000 / plans if kind == "spread" else 0
    t = time.perf_counter()
    await store.plans.update_many(
        {}, [{"$set": {"next_run_at": {"$add": [t0, {"$multiply": ["$slot", step_ms]}]}}}]
    )
    placed_s = time.perf_counter() - t
    overran = datetime.now(UTC) >= t0
    cpu0 = [r.cpu() for r in group]
    db0 = sum(db_ps.cpu_times()[:2]) if db_ps else 0.0
    last_fire = t0 + timedelta(milliseconds=step_ms * (plans - 1))
    end = last_fire + timedelta(seconds=600)
    due = {"next_run_at": {"$lte": last_fire}}
    while datetime.now(UTC) < end:
        await asyncio.sleep(1)
        if await store.plans.count_documents(due) == 0:
            break  # every plan advanced past its fire
    pending = await store.plans.count_documents(due)
    cpu = sum(r.cpu() - c for r, c in zip(group, cpu0, strict=True))
    db_cpu = (sum(db_ps.cpu_times()[:2]) - db0) if db_ps else float("nan")
    results = [r.finish() for r in group]
    lags = [lag for r in results for lag in r["lags"]]
    cursor = await store.jobs.aggregate(
        [{"$group": {"_id": {"p": "$plan_id", "t": "$scheduled_for"}, "n": {"$sum": 1}}}]
    )
    per_fire = await cursor.to_list()
    duplicates = sum(d["n"] - 1 for d in per_fire if d["n"] > 1)
    fired_plans = len({d["_id"]["p"] for d in per_fire})
    # a lost fire: its plan was advanced past it, yet it has no job (must never happen)
    lost = plans - pending - fired_plans
    not_queued = await store.jobs.count_documents({"status": {"$ne": "QUEUED"}})
    stats = [r["stats"] for r in results]
    await store.client.drop_database(database)
    await store.close()
    fires = len(per_fire)
    return {
        "kind": kind,
        "replicas": replicas,
        "plans": plans,
        "fires": fires,
        "load_s": load_s,
        "placed_s": placed_s,
        "overran": overran,
        "p50": pct(lags, 50),
        "p99": pct(lags, 99),
        "max": max(lags) if lags else float("nan"),
        "missed": lost,
        "pending": pending,
        "duplicates": duplicates,
        "not_queued": not_queued,
        "cpu_per_fire_ms": 1000 * cpu / max(1, fires),
        "db_cpu_per_fire_ms": 1000 * db_cpu / max(1, fires),
        "contended": sum(s["already_recorded"] for s in stats),
        "per_replica": [s["queued"] for s in stats],
    }


async def reference(server: EmbeddedMongo, instances: int) -> dict[str, float]:
    """The database alone, no scheduler: the two writes of a fire (insert its job, advance its
    plan with a compare-and-set) for 2,000 plans in batches of 500, timed and with the
    server's CPU, on this machine now. Its inverse is what one replica could at best do."""
    from pymongo import UpdateOne

    from backup import jobs as jobdocs

    database = f"bench_ref_{uuid.uuid4().hex[:8]}"
    store = connect(server.url, database)
    await store.ensure_indexes()
    await load(store, 2000, min(instances, 2000))
    plans = await store.plans.find({}, {"_id": 1, "instance_id": 1, "next_run_at": 1}).to_list()
    db_ps = psutil.Process(server._proc.pid)  # type: ignore[attr-defined]
    c0, t0 = sum(db_ps.cpu_times()[:2]), time.perf_counter()
    for i in range(0, len(plans), 500):
        chunk = plans[i : i + 500]
        docs = [
            jobdocs.new_job(
                instance_id=p["instance_id"],
                type="BACKUP",
                plan_id=p["_id"],
                destination_id="d",
                trigger="SCHEDULE",
                items=[jobdocs.new_item("db")],
                compression=True,
                encryption={"enabled": False},
                scheduled_for=FAR,
            )
            for p in chunk
        ]
        await store.jobs.insert_many(docs, ordered=False)
        await store.plans.bulk_write(
            [
                UpdateOne(
                    {"_id": p["_id"], "next_run_at": FAR},
                    {"$set": {"next_run_at": FAR + timedelta(days=1), "last_job_id": d["_id"]}},
                )
                for p, d in zip(chunk, docs, strict=True)
            ],
            ordered=False,
        )
    wall = (time.perf_counter() - t0) / len(plans)
    cpu = (sum(db_ps.cpu_times()[:2]) - c0) / len(plans)
    await store.client.drop_database(database)
    await store.close()
    return {"wall_ms": wall * 1000, "cpu_ms": cpu * 1000}


def report(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'scenario':<10}{'replicas':>9}{'fires':>8}{'p50 s':>9}{'p99 s':>9}{'max s':>9}"
        f"{'missed':>8}{'late':>6}{'dup':>5}{'CPU ms/fire':>13}{'DB CPU ms/fire':>16}"
        "  jobs per replica"
    )
    for r in rows:
        print(
            f"{r['kind']:<10}{r['replicas']:>9}{r['fires']:>8}{r['p50']:>9.3f}{r['p99']:>9.3f}"
            f"{r['max']:>9.3f}{r['missed']:>8}{r['pending']:>6}{r['duplicates']:>5}{r['cpu_per_fire_ms']:>13.2f}"
            f"{r['db_cpu_per_fire_ms']:>16.2f}  {r['per_replica']}"
            + ("  (setup overran the first fires: rerun)" if r["overran"] else "")
        )


async def main(args: argparse.Namespace) -> int:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sched-") as tmp:
        server = EmbeddedMongo(Path(tmp) / "db")
        server.start()
        try:
            ref = await reference(server, args.instances)
            kinds = ["spread"] + ([] if args.no_herd else ["herd"])
            for kind in kinds:
                for n in args.replicas:
                    print(
                        f"... {kind}, {n} replica(s), {args.plans} plans; load average "
                        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
                        flush=True,
                    )
                    rows.append(
                        await scenario(
                            server,
                            Path(tmp),
                            kind=kind,
                            replicas=n,
                            plans=args.plans,
                            instances=args.instances,
                            window=args.window,
                        )
                    )
        finally:
            server.stop()
    print()
    print(
        f"Scheduler fire lag: {args.plans} plans over {args.instances} instances; spread = "
        f"fires evenly over {args.window:g} s ({args.plans / args.window:.0f}/s), herd = all "
        "at one instant. Lag = job written - fire time. Runner not running."
    )
    report(rows)
    print(
        f"Reference, the database alone (same run): a fire's two writes cost "
        f"{ref['wall_ms']:.2f} ms of wall time and {ref['cpu_ms']:.2f} ms of the database "
        f"server's CPU in batches of 500, so this database can take at most about "
        f"{1000 / ref['wall_ms']:.0f} fires/s right now; the spread runs ask for "
        f"{args.plans / args.window:.0f}/s."
    )
    print(
        "missed = fires whose plan moved on without a job (lost); late = fires still not "
        "handled 10 minutes after the last one; dup = fires with more than one job."
    )
    print("Targets: spread p99 < 1 s, no missed, no duplicate fire.")
    print(f"Load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    bad = [r for r in rows if r["missed"] or r["duplicates"]]
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:5])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plans", type=int, default=10_000)
    parser.add_argument("--instances", type=int, default=1_000)
    parser.add_argument("--window", type=float, default=60.0, help="seconds the fires spread over")
    parser.add_argument(
        "--replicas",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 3],
        help="comma-separated replica counts to run, e.g. 1,3",
    )
    parser.add_argument("--no-herd", action="store_true", help="skip the herd scenario")
    sys.exit(asyncio.run(main(parser.parse_args())))
