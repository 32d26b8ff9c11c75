"""Fire lag with 10,000 active plans (1,000 instances) on one database, with one manager
replica and with three, each a separate process: the scheduler alone (the reference), and
the product's whole replica (scheduler, job runner, retention) running every fire's backup
on a stub agent that stores a real object in S3.

    .venv/bin/python benchmarks/scheduler_fire_lag.py [--plans 10000] [--instances 1000]
        [--window 60] [--replicas 1,3] [--modes scheduler|runner|scheduler,runner] [--no-herd]
        [--concurrency 50] [--db-connections N] [--agent-delay 0.5] [--drain-timeout 1200]

What is measured, exactly:

- **Fire lag** = the moment the fire's job was written (``insert`` acknowledged by the
  database) minus the fire time (``scheduled_for``), as each replica's scheduler measures it
  (the same figure as ``backup_scheduler_queue_lag_seconds`` in /metrics).
- **Spread**: every plan fires once in a ``--window`` seconds window, fires spread evenly over
  it (10,000 in 60 s = 167 fires a second). Cron has minute granularity, so the fire times
  are placed directly in the database (``next_run_at``, to the millisecond); the scheduler
  then does what it always does: reads due plans, writes one job per fire, computes the next
  fire with croniter in the plan's zone and advances the plan with a compare-and-set. The
  plans' frequency is yearly, so each fires once in the run (no plan can fire while its
  previous job waits, which the scheduler would record as a skipped fire).
- **Herd** (scheduler mode): every plan due at the same instant, as 10,000 plans all at
  ``0 3 * * *`` would be.
- **Lost** = fires whose plan moved on without a job; **dup** = fires with more than one job
  (the unique index makes that impossible: it is counted, not assumed).
- **CPU per fire** = the CPU seconds (user + system, psutil) of the replica processes, and
  separately of the database server, from the placing of the fires to the end of the run,
  divided by the fires.

Modes:

- ``scheduler`` (the reference row, as measured before the runner was added): each replica
  process runs only ``scheduler.Scheduler``; the jobs stay QUEUED.
- ``runner``: each replica process is the product's application (``broker.app.create_app``
  from the environment, as ``python -m broker`` builds it: HTTP, scheduler, job runner,
  retention sweeper, JSON logs at INFO), with ``RUNNER_CONCURRENCY=--concurrency`` and every
  other setting at its default. Every instance's agent is one stub agent process
  (``benchmarks/_stub_agent.py``: the agent protocol, a backup takes ``--agent-delay``
  seconds and then uploads a 1 KiB object to a real SeaweedFS S3 server started by
  ``tests/servers/s3.py``), and every destination points at that server, so the runner does
  all it does in production: claims with a lease, GET /status, POST /backup, polls, confirms
  the object in storage (``RUNNER_VERIFY_UPLOADS``), writes the restore point, ends the job,
  forgets the agent job, applies retention. Measured besides the fire lag:
  **start lag** = the stub agent received the job's ``POST /backup`` minus the fire time;
  **end to end** = the job was ended SUCCEEDED minus the fire time; **drain** = first fire
  to the last job ended, and jobs/s over it; **skipped** = fires recorded MISSED because the
  plan's previous job had not started (docs/scheduling.md "Overlapping fires"; 0 by design
  here, counted apart from lost fires); **dup starts** = agent jobs started twice (a re-sent
  request must be answered 409 and polled); **unfinished** = jobs not SUCCEEDED when the run
  ends (still queued or running after ``--drain-timeout``, or failed, with a reason shown).
  The stub agent's and S3 server's CPU is shown apart: it is the rig's, not the manager's.

The database is the embedded SecantusDB (the product's default and the test suite's), with
the store's write concern (majority, journaled). Figures measured on a shared, loaded
machine are pessimistic; the run prints the load average beside each row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from backup.database import Database, Document, connect  # noqa: E402
from backup.embedded_db import EmbeddedMongo  # noqa: E402
from benchmarks._harness import Figure, report  # noqa: E402
from storage.egress import DEFAULT_DENY, networks_except  # noqa: E402

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo"]
FAR = datetime(2099, 1, 1, tzinfo=UTC)
AGENT_USER = "bench-agent"
BROKER_USER = "bench-broker"
# A replica must not inherit settings of the shell that runs the benchmark.
_OWN_ENV = (
    "MONGODB_", "BROKER_", "SECRETS_", "RUNNER_", "RETENTION_", "BACKGROUND_", "SCHEDULER_",
    "PORT", "LISTEN_HOST", "HOST", "PUBLIC_URL", "DATA_DIR", "LOG_LEVEL", "METRICS_",
)  # fmt: skip


# ----------------------------------------------------------------------------- workers


def scheduler_worker(url: str, database: str, replica: str) -> None:
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


_WRITES = ("insert", "update", "delete", "findAndModify")
_COUNTED = (*_WRITES, "find", "getMore", "aggregate", "count", "distinct")


def app_worker() -> None:
    """One manager replica as the product runs it (``--app-worker``): the application of
    ``python -m broker``, configured from the environment, served on its port, with the
    scheduler's observer teed so that its fire lags are recorded too. Runs until its stdin
    closes, stops like a SIGTERM would (scheduler first, then the runner releases its
    leases), then prints the scheduler's stats and lags as one JSON line on stdout."""
    from aiohttp import web
    from pymongo import monitoring

    from broker.app import create_app
    from broker.config import load_settings
    from broker.context import SCHEDULER
    from broker.logging import configure_logging
    from scheduler import SchedulerObserver

    ops: Counter[str] = Counter()

    class Ops(monitoring.CommandListener):
        """Counts the replica's database commands by name and collection."""

        def started(self, event: monitoring.CommandStartedEvent) -> None:
            target = event.command.get(event.command_name)
            if event.command_name in _COUNTED:
                ops[f"{event.command_name} {target if isinstance(target, str) else ''}"] += 1

        def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
            pass

        def failed(self, event: monitoring.CommandFailedEvent) -> None:
            pass

    monitoring.register(Ops())  # before any client is made
    settings = load_settings()
    app = create_app(settings)
    configure_logging(settings.log_level, stream=sys.stderr)
    lags: list[float] = []

    class Tee(SchedulerObserver):
        def __init__(self, inner: SchedulerObserver) -> None:
            self.inner = inner

        def fired(self, trigger: str, lag_seconds: float) -> None:
            lags.append(lag_seconds)
            self.inner.fired(trigger, lag_seconds)

        def missed(self, fires: int) -> None:
            self.inner.missed(fires)

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()  # the background loops start here
        scheduler = app[SCHEDULER]
        scheduler.observer = Tee(scheduler.observer)
        await web.TCPSite(runner, settings.host, settings.port).start()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        stats = asdict(scheduler.stats)
        await runner.cleanup()
        print(json.dumps({"stats": stats, "lags": lags, "ops": ops}), flush=True)

    asyncio.run(main())


class Replica:
    """A worker process; ``finish`` closes its stdin and reads its JSON line."""

    def __init__(self, args: list[str], env: dict[str, str], name: str, log: Path) -> None:
        self.name = name
        self.log_path = log
        self.log = open(log, "ab")  # closed in finish()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if line != "ready":
            self.proc.kill()
            self.proc.wait(30)
            raise RuntimeError(f"replica {name} did not start: {line!r}; see {log}")
        self.ps = psutil.Process(self.proc.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.ps)

    def finish(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        out = self.proc.stdout.read().decode().strip().splitlines()
        self.proc.wait(120)
        self.log.close()
        if not out:
            raise RuntimeError(f"replica {self.name} printed no result; see {self.log_path}")
        return json.loads(out[-1])

    def queued_logged(self) -> int:
        """Jobs this scheduler replica says it queued (its ``scheduler_fired`` log lines,
        written at the end of each pass, after the pass's plans are advanced)."""
        with open(self.log_path, errors="replace") as f:
            return sum(
                int(m.group(1))
                for line in f
                if "scheduler_fired" in line and (m := re.search(r"queued=(\d+)", line))
            )

    def events(self, name: str) -> int:
        """How many log lines of this replica are the event ``name`` (JSON logs)."""
        needle = f'"event": "{name}"'
        with open(self.log_path, errors="replace") as f:
            return sum(1 for line in f if needle in line)


def cpu_seconds(ps: psutil.Process | None) -> float:
    if ps is None:
        return 0.0
    try:
        t = ps.cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def scheduler_replicas(url: str, database: str, n: int, tmp: Path) -> list[Replica]:
    env = {**os.environ, "SCHEDULER_POLL_SECONDS": "5", "LOG_LEVEL": "WARNING"}
    return [
        Replica(
            ["--worker", url, database, f"replica-{i}"],
            env,
            f"replica-{i}",
            tmp / f"{database}-{i}.log",
        )
        for i in range(n)
    ]


def app_replicas(env: dict[str, str], database: str, n: int, tmp: Path) -> list[Replica]:
    from tests.servers.ports import free_port

    group = []
    base = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_ENV)}
    for i in range(n):
        port = free_port()
        data = tmp / f"{database}-{i}"
        data.mkdir()
        own = {
            **base,
            **env,
            "MONGODB_DATABASE": database,
            "PORT": str(port),
            "LISTEN_HOST": "127.0.0.1",
            "PUBLIC_URL": f"http://127.0.0.1:{port}",
            "DATA_DIR": str(data),
        }
        group.append(Replica(["--app-worker"], own, f"replica-{i}", tmp / f"{database}-{i}.log"))
    return group


# ----------------------------------------------------------------------------- setup


@dataclass
class Rig:
    """What the runner mode's documents point at: the stub agent and an S3 bucket, with the
    secrets sealed as the API would seal them."""

    agent_url: str
    agent_password: str
    s3: Any  # storage.S3Settings
    box: Any  # backup.secrets.SecretBox

    def instance(self, instance_id: str) -> Document:
        return {
            "agent": {"url": self.agent_url, "username": AGENT_USER},
            "database": {"host": "127.0.0.1", "port": 5432, "username": "u", "parameters": {}},
            "secrets": self.box.seal_map(
                {"agent_password": self.agent_password, "database_password": "db-pw"},
                f"instances/{instance_id}",
            ),
        }

    def destination(self, dest_id: str) -> Document:
        from backup import destinations

        return {
            **destinations.public_settings(self.s3),
            "secrets": self.box.seal_map(
                {"secret_access_key": self.s3.secret_access_key.get_secret_value()},
                f"destinations/{dest_id}",
            ),
        }


async def load(store: Database, plans: int, instances: int, rig: Rig | None = None) -> None:
    at = datetime.now(UTC)
    common = {"created_at": at, "updated_at": at, "version": 1, "schema_version": 1}
    inst = []
    for _ in range(instances):
        doc: Document = {"_id": str(uuid.uuid4()), "state": "ready", "items": ["db"], **common}
        if rig is not None:
            doc.update(rig.instance(doc["_id"]))
        inst.append(doc)
    dests = []
    for i in inst:
        dest: Document = {
            "_id": uuid.uuid4().hex,
            "instance_id": i["_id"],
            "name": "primary",
            "type": "S3",
            **common,
        }
        if rig is not None:
            dest.update(rig.destination(dest["_id"]))
        dests.append(dest)
    await store.instances.insert_many(inst)
    await store.destinations.insert_many(dests)
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


def spread3(values: list[float]) -> tuple[float, float, float]:
    return pct(values, 50), pct(values, 99), max(values) if values else float("nan")


async def place_fires(
    store: Database, kind: str, plans: int, window: float
) -> tuple[datetime, datetime, bool]:
    """Give every plan its fire (``next_run_at``): evenly over ``window`` seconds from a
    moment far enough ahead that the update is surely done, or all at that moment (herd).
    Returns the first and last fire and whether the update overran the first."""
    margin = 15 + plans * 0.004
    t0 = (datetime.now(UTC) + timedelta(seconds=margin)).replace(microsecond=0)
    step_ms = window * 1000 / plans if kind == "spread" else 0
    await store.plans.update_many(
        {}, [{"$set": {"next_run_at": {"$add": [t0, {"$multiply": ["$slot", step_ms]}]}}}]
    )
    overran = datetime.now(UTC) >= t0
    return t0, t0 + timedelta(milliseconds=step_ms * (plans - 1)), overran


async def wait_until(
    start: datetime, deadline: datetime, done: Callable[[], Any], every: float = 1.0
) -> None:
    """Poll ``done`` every ``every`` seconds from ``start`` (the last fire) until it is true
    or ``deadline``. Not before: the polls are the benchmark's own load on the database it
    measures (a count over 10,000 plans cost that single-core server 0.2 s, each second of
    the fire window), and nothing can be done before the last fire anyway."""
    await asyncio.sleep(max(0.0, (start - datetime.now(UTC)).total_seconds()))
    while datetime.now(UTC) < deadline:
        await asyncio.sleep(every)
        if await done():
            return


async def fire_accounting(store: Database, plans: int, last_fire: datetime) -> dict[str, Any]:
    """Lost and duplicate fires, and what is still due, from the database."""
    pending = await store.plans.count_documents({"next_run_at": {"$lte": last_fire}})
    cursor = await store.jobs.aggregate(
        [{"$group": {"_id": {"p": "$plan_id", "t": "$scheduled_for"}, "n": {"$sum": 1}}}]
    )
    per_fire = await cursor.to_list()
    fired_plans = len({d["_id"]["p"] for d in per_fire})
    return {
        "fires": len(per_fire),
        "pending": pending,
        # a lost fire: its plan was advanced past it, yet it has no job (must never happen)
        "missed": plans - pending - fired_plans,
        "duplicates": sum(d["n"] - 1 for d in per_fire if d["n"] > 1),
    }


# ----------------------------------------------------------------------------- scenarios


async def scheduler_scenario(
    server: EmbeddedMongo, tmp: Path, *, kind: str, replicas: int, plans: int, instances: int,
    window: float,
) -> dict[str, Any]:  # fmt: skip
    """The reference: scheduler processes only, the jobs stay QUEUED."""
    database = f"bench_sched_{uuid.uuid4().hex[:8]}"
    store = connect(server.url, database)
    await store.ensure_indexes()
    await load(store, plans, instances)
    group = scheduler_replicas(server.url, database, replicas, tmp)
    db_ps = psutil.Process(server._proc.pid) if server._proc else None  # type: ignore[attr-defined]
    _, last_fire, overran = await place_fires(store, kind, plans, window)
    cpu0 = [r.cpu() for r in group]
    db0 = cpu_seconds(db_ps)
    due = {"paused": False, "next_run_at": {"$lte": last_fire}}  # the scheduler's index

    polls = 0

    async def all_advanced() -> bool:
        # The replicas' logs first: any question to the database while the fires are being
        # written is load on the server measured (on the embedded one, even this indexed
        # existence question reads every due plan: 0.5 s of its CPU a second in a herd, which
        # once doubled the herd's lag). Ask it once every job is logged, or every 10 s in
        # case a fire is lost (then the log never reaches the count).
        nonlocal polls
        polls += 1
        if sum(r.queued_logged() for r in group) < plans and polls % 10:
            return False
        return await store.plans.find_one(due, {"_id": 1}) is None

    await wait_until(last_fire, last_fire + timedelta(seconds=600), all_advanced)
    cpu = sum(r.cpu() - c for r, c in zip(group, cpu0, strict=True))
    db_cpu = cpu_seconds(db_ps) - db0
    results = [r.finish() for r in group]
    lags = [lag for r in results for lag in r["lags"]]
    fired = await fire_accounting(store, plans, last_fire)
    stats = [r["stats"] for r in results]
    await store.client.drop_database(database)
    await store.close()
    fires = fired["fires"]
    return {
        "mode": "scheduler",
        "kind": kind,
        "replicas": replicas,
        "plans": plans,
        "overran": overran,
        "fire": spread3(lags),
        **fired,
        "cpu_per_fire_ms": 1000 * cpu / max(1, fires),
        "db_cpu_per_fire_ms": 1000 * db_cpu / max(1, fires),
        "contended": sum(s["already_recorded"] for s in stats),
        "per_replica": [s["queued"] for s in stats],
        "load": os.getloadavg()[0],
    }


async def runner_scenario(
    server: EmbeddedMongo, tmp: Path, rig: Rig, rig_ps: list[psutil.Process], *, replicas: int,
    plans: int, instances: int, window: float, concurrency: int, db_connections: int | None,
    keys: str, broker_pw: str, drain_timeout: float,
) -> dict[str, Any]:  # fmt: skip
    """Whole replicas (scheduler, runner, retention) driving the stub agent, spread fires."""
    database = f"bench_run_{uuid.uuid4().hex[:8]}"
    store = connect(server.url, database)
    await store.ensure_indexes()
    await load(store, plans, instances, rig)
    env = {
        "MONGODB_URL": server.url,
        "BROKER_USERNAME": BROKER_USER,
        "BROKER_PASSWORD": broker_pw,
        "SECRETS_MASTER_KEYS": keys,
        "LOG_LEVEL": "INFO",
        "RUNNER_CONCURRENCY": str(concurrency),
        **({"RUNNER_DB_CONNECTIONS": str(db_connections)} if db_connections else {}),
        # The stub agent and storage listen on 127.0.0.1, which the default policy denies.
        "EGRESS_DENY_NETWORKS": ",".join(networks_except(DEFAULT_DENY, "127.0.0.1")),
    }
    group = app_replicas(env, database, replicas, tmp)
    db_ps = psutil.Process(server._proc.pid) if server._proc else None  # type: ignore[attr-defined]
    t0, last_fire, overran = await place_fires(store, "spread", plans, window)
    cpu0 = [r.cpu() for r in group]
    db0 = cpu_seconds(db_ps)
    rig0 = sum(cpu_seconds(p) for p in rig_ps)
    due = {"paused": False, "next_run_at": {"$lte": last_fire}}

    async def drained() -> bool:
        # Each an indexed existence check; the embedded server still reads every matching
        # job, so the drain is checked every 10 s (the drain time is taken from the jobs'
        # end times, not from this check).
        return (
            await store.plans.find_one(due, {"_id": 1}) is None
            and await store.jobs.find_one({"status": "QUEUED"}, {"_id": 1}) is None
            and await store.jobs.find_one({"status": "RUNNING"}, {"_id": 1}) is None
        )

    await wait_until(last_fire, last_fire + timedelta(seconds=drain_timeout), drained, every=10)
    cpu = sum(r.cpu() - c for r, c in zip(group, cpu0, strict=True))
    db_cpu = cpu_seconds(db_ps) - db0
    rig_cpu = sum(cpu_seconds(p) for p in rig_ps) - rig0
    load_end = os.getloadavg()[0]
    results = [r.finish() for r in group]
    ran = [r.events("job_finished") for r in group]
    lags = [lag for r in results for lag in r["lags"]]
    fired = await fire_accounting(store, plans, last_fire)
    docs = await store.jobs.find(
        {},
        {"status": 1, "reason": 1, "scheduled_for": 1, "ended_at": 1, "items.agent_job_id": 1},
    ).to_list()
    agent = await agent_stats(rig)
    await store.client.drop_database(database)
    await store.close()

    def at(d: datetime) -> float:
        return d.timestamp()

    succeeded = [d for d in docs if d["status"] == "SUCCEEDED"]
    ids = {f"{d['_id']}-0" for d in docs}
    start_lags = [
        agent["first_post"][f"{d['_id']}-0"] - at(d["scheduled_for"])
        for d in docs
        if f"{d['_id']}-0" in agent["first_post"]
    ]
    e2e = [at(d["ended_at"]) - at(d["scheduled_for"]) for d in succeeded]
    ended = [at(d["ended_at"]) for d in succeeded]
    drain = (max(ended) - at(t0)) if ended else float("nan")
    skipped = [
        d for d in docs if d["status"] == "MISSED" and (d.get("reason") or "").startswith("Skipped")
    ]
    bad = [d for d in docs if d["status"] not in ("SUCCEEDED", "MISSED")]
    fires = fired["fires"]
    stats = [r["stats"] for r in results]
    ops: Counter[str] = Counter()
    for r in results:
        ops.update(r.get("ops", {}))
    return {
        "mode": "runner",
        "ops": ops,
        "kind": "spread",
        "replicas": replicas,
        "plans": plans,
        "overran": overran,
        "fire": spread3(lags),
        "start": spread3(start_lags),
        "e2e": spread3(e2e),
        **fired,
        "succeeded": len(succeeded),
        "skipped": len(skipped),
        "unfinished": len(bad),
        "unfinished_by_status": dict(Counter(d["status"] for d in bad)),
        "unfinished_reason": next((d.get("reason") for d in bad if d.get("reason")), None),
        "dup_starts": sum(n - 1 for k, n in agent["starts"].items() if k in ids and n > 1),
        "resent": sum(n for k, n in agent["resent"].items() if k in ids),
        "drain_s": drain,
        "jobs_per_s": len(succeeded) / drain if ended and drain > 0 else float("nan"),
        "cpu_per_fire_ms": 1000 * cpu / max(1, fires),
        "db_cpu_per_fire_ms": 1000 * db_cpu / max(1, fires),
        "rig_cpu_per_fire_ms": 1000 * rig_cpu / max(1, fires),
        "contended": sum(s["already_recorded"] for s in stats),
        "per_replica": [s["queued"] for s in stats],
        "ran_per_replica": ran,
        "load": load_end,
    }


async def agent_stats(rig: Rig) -> dict[str, Any]:
    import aiohttp

    auth = aiohttp.BasicAuth(AGENT_USER, rig.agent_password)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{rig.agent_url}/_bench/stats", auth=auth) as resp:
            resp.raise_for_status()
            return await resp.json()


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
    c0, t0 = cpu_seconds(db_ps), time.perf_counter()
    insert_wall = insert_cpu = 0.0
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
        ic, it = cpu_seconds(db_ps), time.perf_counter()
        await store.jobs.insert_many(docs, ordered=False)
        insert_wall += time.perf_counter() - it
        insert_cpu += cpu_seconds(db_ps) - ic
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
    cpu = (cpu_seconds(db_ps) - c0) / len(plans)
    await store.client.drop_database(database)
    await store.close()
    return {
        "wall_ms": wall * 1000,
        "cpu_ms": cpu * 1000,
        "insert_wall_ms": insert_wall * 1000 / len(plans),
        "insert_cpu_ms": insert_cpu * 1000 / len(plans),
    }


# ----------------------------------------------------------------------------- report


def _s(v: float) -> str:
    return "-" if v != v else f"{v:.2f}"  # NaN: nothing measured


def report_scheduler(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'scenario':<10}{'replicas':>9}{'fires':>8}{'p50 s':>9}{'p99 s':>9}{'max s':>9}"
        f"{'lost':>6}{'late':>6}{'dup':>5}{'CPU ms/fire':>13}{'DB CPU ms/fire':>16}{'load':>6}"
        "  jobs per replica"
    )
    for r in rows:
        p50, p99, top = r["fire"]
        print(
            f"{r['kind']:<10}{r['replicas']:>9}{r['fires']:>8}{p50:>9.3f}{p99:>9.3f}{top:>9.3f}"
            f"{r['missed']:>6}{r['pending']:>6}{r['duplicates']:>5}{r['cpu_per_fire_ms']:>13.2f}"
            f"{r['db_cpu_per_fire_ms']:>16.2f}{r['load']:>6.1f}  {r['per_replica']}"
            + ("  (setup overran the first fires: rerun)" if r["overran"] else "")
        )


def report_runner(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'replicas':>8}{'fires':>7} | {'fire lag p50/p99/max s':>23} | "
        f"{'start lag p50/p99/max s':>24} | {'end to end p50/p99/max s':>25} | "
        f"{'drain s':>8}{'jobs/s':>8}"
    )
    for r in rows:
        cols = [" / ".join(_s(v) for v in r[k]) for k in ("fire", "start", "e2e")]
        print(
            f"{r['replicas']:>8}{r['fires']:>7} | {cols[0]:>23} | {cols[1]:>24} | "
            f"{cols[2]:>25} | {_s(r['drain_s']):>8}{_s(r['jobs_per_s']):>8}"
            + ("  (setup overran the first fires: rerun)" if r["overran"] else "")
        )
    print()
    print(
        f"{'replicas':>8}{'ok':>7}{'lost':>6}{'late':>6}{'dup':>5}{'skipped':>9}"
        f"{'dup starts':>11}{'re-sent':>9}{'unfinished':>11} |{'CPU ms/fire':>12}"
        f"{'DB CPU':>8}{'rig CPU':>9}{'load':>6}  written / run per replica"
    )
    for r in rows:
        print(
            f"{r['replicas']:>8}{r['succeeded']:>7}{r['missed']:>6}{r['pending']:>6}"
            f"{r['duplicates']:>5}{r['skipped']:>9}{r['dup_starts']:>11}{r['resent']:>9}"
            f"{r['unfinished']:>11} |{r['cpu_per_fire_ms']:>12.2f}{r['db_cpu_per_fire_ms']:>8.2f}"
            f"{r['rig_cpu_per_fire_ms']:>9.2f}{r['load']:>6.1f}  {r['per_replica']} / "
            f"{r['ran_per_replica']}"
        )
        if r["unfinished"]:
            print(
                f"{'':>8}  unfinished: {r['unfinished_by_status']}; e.g. {r['unfinished_reason']!r}"
            )
    for r in rows:
        jobs = max(1, r["succeeded"])
        writes = {k: n for k, n in r["ops"].items() if k.split()[0] in _WRITES}
        reads = sum(r["ops"].values()) - sum(writes.values())
        top = ", ".join(f"{k} {n / jobs:.2f}" for k, n in Counter(writes).most_common(4))
        print(
            f"{r['replicas']:>8} replica(s), database commands per succeeded job (all the "
            f"replicas did, scheduler included): {sum(writes.values()) / jobs:.2f} writes "
            f"({top}), {reads / jobs:.2f} reads"
        )


# ----------------------------------------------------------------------------- main


async def main(args: argparse.Namespace) -> int:
    sched_rows: list[dict[str, Any]] = []
    run_rows: list[dict[str, Any]] = []
    rate = args.plans / args.window
    with tempfile.TemporaryDirectory(prefix="bench-sched-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        server = EmbeddedMongo(tmp / "db")
        server.start()
        stack.callback(server.stop)
        ref = await reference(server, args.instances)

        def note(what: str, n: int) -> None:
            print(
                f"... {what}, {n} replica(s), {args.plans} plans; load average "
                f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
                flush=True,
            )

        if "scheduler" in args.modes:
            kinds = [k for k in args.scenarios if not (args.no_herd and k == "herd")]
            for kind in kinds:
                for n in args.replicas:
                    note(f"scheduler only, {kind}", n)
                    sched_rows.append(
                        await scheduler_scenario(
                            server,
                            tmp,
                            kind=kind,
                            replicas=n,
                            plans=args.plans,
                            instances=args.instances,
                            window=args.window,
                        )
                    )
                    report_scheduler(sched_rows[-1:])
        if "runner" in args.modes:
            start_rig = await asyncio.to_thread(rig_starter, stack, tmp, args.agent_delay)
            for n in args.replicas:
                note("with the runner, spread", n)
                rig, rig_ps, keys, broker_pw = await asyncio.to_thread(start_rig)
                run_rows.append(
                    await runner_scenario(
                        server,
                        tmp,
                        rig,
                        rig_ps,
                        replicas=n,
                        plans=args.plans,
                        instances=args.instances,
                        window=args.window,
                        concurrency=args.concurrency,
                        db_connections=args.db_connections,
                        keys=keys,
                        broker_pw=broker_pw,
                        drain_timeout=args.drain_timeout,
                    )
                )
                report_runner(run_rows[-1:])
    print()
    print(
        f"Fire lag: {args.plans} plans over {args.instances} instances on the embedded "
        f"database. Lag = job written - fire time."
    )
    if sched_rows:
        print(
            f"\nReference, the scheduler only (runner not running): spread = fires evenly over "
            f"{args.window:g} s ({rate:.0f}/s), herd = all at one instant."
        )
        report_scheduler(sched_rows)
        print(
            "lost = fires whose plan moved on without a job; late = fires still not handled "
            "10 minutes after the last one; dup = fires with more than one job; CPU = the "
            "replica processes' CPU (all of them), DB CPU = the database server's; load = "
            "1-minute load average at the end of the row."
        )
    if run_rows:
        print(
            f"\nWith the job runner: whole replicas (scheduler, runner with "
            f"RUNNER_CONCURRENCY={args.concurrency}, retention; other settings at their "
            f"defaults) running every fire's backup on one stub agent (a backup takes "
            f"{args.agent_delay:g} s, then stores 1 KiB in SeaweedFS S3); spread fires over "
            f"{args.window:g} s ({rate:.0f}/s)."
        )
        report_runner(run_rows)
        print(
            "fire lag = job written - fire time; start lag = the agent received POST /backup - "
            "fire time; end to end = job ended SUCCEEDED - fire time; drain = first fire to "
            "last job ended, jobs/s = succeeded jobs over the drain.\n"
            "ok = jobs SUCCEEDED (restore point written, object confirmed in S3); lost, late, "
            "dup as above; skipped = fires recorded MISSED because the plan's previous job had "
            "not started (0 by design: each plan fires once); dup starts = agent jobs started "
            "twice; re-sent = start requests answered 409 (a re-sent request, polled, not "
            "run again); unfinished = jobs not SUCCEEDED at the end.\n"
            "CPU ms/fire = the replica processes' CPU over the whole run (fires and drain) per "
            "fire, all replicas together; DB CPU = the database server's; rig CPU = the stub "
            "agent's and the S3 server's (not the manager's); written / run per replica = "
            "jobs each replica's scheduler wrote / jobs each replica's runner ended."
        )
    print(
        f"\nReference, the database alone (same run): a fire's two writes cost "
        f"{ref['wall_ms']:.2f} ms of wall time and {ref['cpu_ms']:.2f} ms of the database "
        f"server's CPU in batches of 500, so this database can take at most about "
        f"{1000 / ref['wall_ms']:.0f} fires/s right now; the spread runs ask for {rate:.0f}/s."
    )
    print(
        f"Reference, the insert-only floor (same run): inserting a fire's job alone costs "
        f"{ref['insert_wall_ms']:.2f} ms of wall time and {ref['insert_cpu_ms']:.2f} ms of the "
        f"database's CPU, so the database alone takes "
        f"{herd_floor(ref, args.plans):.1f} s to insert 99 % of a herd of {args.plans} jobs."
    )
    print(
        "Targets: herd p99 fire lag < 5 s (one replica and three), spread p99 < 0.5 s (one "
        "replica), no lost, no duplicate fire, every job done."
    )
    report(figures(sched_rows, ref, args.plans, rate))
    print(f"Load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    bad = [r for r in sched_rows + run_rows if r["missed"] or r["duplicates"]]
    bad += [r for r in run_rows if r["unfinished"] or r["dup_starts"]]
    return 1 if bad else 0


def herd_floor(ref: dict[str, float], plans: int) -> float:
    """Seconds the database alone takes to insert 99 % of a herd's jobs (batches of 500)."""
    return 0.99 * plans * ref["insert_wall_ms"] / 1000


def figures(
    rows: list[dict[str, Any]], ref: dict[str, float], plans: int, rate: float
) -> list[Figure]:
    """The headline figures for the ``python -m benchmarks`` summary: each scheduler row's
    p99 fire lag beside the insert-only floor measured in the same run. For the spread, the
    floor is one pass interval's fires inserted at once (what a pass writes) plus that
    interval at its longest (1.2 x 0.25 s): a fire may wait for the next pass."""
    out = []
    for r in rows:
        if r["mode"] != "scheduler":
            continue
        p99 = r["fire"][1]
        if r["kind"] == "herd":
            floor = herd_floor(ref, r["plans"])
            what = f"insert-only floor, 99 % of {r['plans']:,} jobs"
            target: float | None = 5.0
        else:
            floor = 0.3 + rate * 0.3 * ref["insert_wall_ms"] / 1000
            what = "pass interval + insert-only floor of its fires"
            target = 0.5 if r["replicas"] == 1 else None
        lost = f"lost {r['missed']}, dup {r['duplicates']}, late {r['pending']}"
        out.append(
            Figure(
                "scheduler_fire_lag",
                f"p99 fire lag, {r['kind']}, {r['plans']:,} plans, {r['replicas']} replica(s)",
                p99,
                "s",
                reference=what,
                reference_value=floor,
                higher_is_better=False,
                target_value=target,
                note=f"{lost}; load {r['load']:.1f}",
            )
        )
    return out


def rig_starter(
    stack: ExitStack, tmp: Path, delay: float
) -> Callable[[], tuple[Rig, list[psutil.Process], str, str]]:
    """Start SeaweedFS and the stub agent (stopped with ``stack``); returns a function that
    makes a rig for one scenario: a fresh bucket, fresh master keys and broker password."""
    from backup.secrets import SecretBox, generate_master_key_spec, parse_master_keys
    from benchmarks._harness import Process
    from tests.servers.ports import free_port
    from tests.servers.s3 import running_s3

    (tmp / "s3").mkdir()
    s3 = stack.enter_context(running_s3(tmp / "s3"))
    password = "stub-" + uuid.uuid4().hex
    port = free_port()
    stub = Process(
        [sys.executable, str(ROOT / "benchmarks" / "_stub_agent.py"), "--port", str(port),
         "--user", AGENT_USER, "--delay", str(delay)],
        env={**os.environ, "AGENT_PASSWORD": password},
        log=tmp / "stub-agent.log",
    ).start(port)  # fmt: skip
    stack.callback(stub.stop)
    assert stub.proc is not None and s3.proc is not None
    rig_ps = [psutil.Process(stub.proc.pid), psutil.Process(s3.proc.pid)]

    def make() -> tuple[Rig, list[psutil.Process], str, str]:
        keys = generate_master_key_spec()
        box = SecretBox(parse_master_keys(keys))
        rig = Rig(f"http://127.0.0.1:{port}", password, s3.settings(), box)
        return rig, rig_ps, keys, "broker-" + uuid.uuid4().hex

    return make


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        scheduler_worker(*sys.argv[2:5])
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "--app-worker":
        app_worker()
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
    parser.add_argument(
        "--modes",
        type=lambda s: s.split(","),
        default=["scheduler"],
        help="scheduler (default: the scheduler only), runner (whole replicas running the "
        "backups on a stub agent), or both. On the embedded database the runner mode drains "
        "about 6 to 20 backups a second (fewer as the collections grow), so 10,000 plans take "
        "about 20 minutes and may not all drain within the default --drain-timeout; a shorter "
        "run: --modes runner --plans 2000 --instances 200 --window 20",
    )
    parser.add_argument("--no-herd", action="store_true", help="skip the herd scenario")
    parser.add_argument(
        "--scenarios",
        type=lambda s: s.split(","),
        default=["spread", "herd"],
        help="scheduler-mode scenarios to run: spread, herd or both (default)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=50, help="RUNNER_CONCURRENCY of each replica"
    )
    parser.add_argument(
        "--db-connections",
        type=int,
        default=None,
        help="RUNNER_DB_CONNECTIONS of each replica (default: the product's)",
    )
    parser.add_argument(
        "--agent-delay", type=float, default=0.5, help="seconds a backup takes on the stub"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=1200.0,
        help="seconds after the last fire the runner mode waits for every job to end",
    )
    parsed = parser.parse_args()
    unknown = set(parsed.modes) - {"scheduler", "runner"}
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    if set(parsed.scenarios) - {"spread", "herd"}:
        parser.error("--scenarios: spread, herd or both")
    sys.exit(asyncio.run(main(parsed)))
