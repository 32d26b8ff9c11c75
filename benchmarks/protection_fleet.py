"""The operators' fleet view and the metrics endpoint at 1,000, 5,000 and 10,000 plans: time
to answer, and how it grows.

``.venv/bin/python benchmarks/protection_fleet.py [--plans 1000,5000,10000] [--seconds 2]``
(or ``python -m benchmarks protection_fleet``).

Starts an embedded database and two services as child processes (background loops off, so
nothing but the requests measured runs in them): one with the per-plan metrics series
(``METRICS_PER_PLAN=true``, the default) and one without. Seeds, straight into the database,
instances of two plans each, every plan with three restore points and its latest job (a tenth
of them failed, a tenth paused), as the runner and the API leave them. At each size it then:

- evaluates the whole fleet (``backup.protection.refresh``, what the background evaluator
  does every ``PROTECTION_INTERVAL_SECONDS``; the first one writes every entry, the next
  only what changed), beside ``evaluate()`` alone (its reads and rules, nothing written);
- measures, one request at a time, ``GET /v1/protection?state=unprotected`` (first page),
  the middle of the unfiltered list by cursor and as a numbered page, and ``GET /metrics``
  with and without the per-plan series, beside a bare aiohttp handler (its own process)
  answering the same bytes as the first page and the database alone running each request's
  query from this process.

The figures are reported for the ``make bench`` summary (``benchmarks._harness.report``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import aiohttp
from pymongo.errors import BulkWriteError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backup import protection
from backup.database import Database, Document, connect
from backup.embedded_db import EmbeddedMongo
from backup.pagination import encode_cursor, now, page_cursor
from backup.secrets import generate_master_key_spec
from benchmarks._harness import (
    Figure,
    Process,
    Request,
    Result,
    bare_server,
    free_port,
    print_table,
    report,
)

PLANS_PER_INSTANCE = 2
POINTS_PER_PLAN = 3
BROKER = ("broker", "bench-broker-password")


def _docs(first: int, count: int) -> dict[str, list[Document]]:
    """``count`` instances from number ``first`` on, with their plans, points and jobs."""
    at = now()
    out: dict[str, list[Document]] = {k: [] for k in ("instances", "plans", "points", "jobs")}
    for n in range(first, first + count):
        iid = f"inst-{n:06d}"
        out["instances"].append(
            {"_id": iid, "state": "ready", "items": ["orders"], "created_at": at, "version": 1,
             "schema_version": 1}
        )  # fmt: skip
        for p in range(PLANS_PER_INSTANCE):
            pid, jid = f"plan-{n:06d}-{p}", f"job-{n:06d}-{p}"
            number = n * PLANS_PER_INSTANCE + p
            out["plans"].append(
                {"_id": pid, "instance_id": iid, "name": f"plan-{p}", "destination_id": "d",
                 "frequency": "0 3 * * *" if p == 0 else "0 */6 * * *",
                 "timezone": "Europe/Berlin", "items": ["orders"],
                 "retention": {"style": "FILES", "period": 3}, "compression": True,
                 "encryption": {"enabled": False}, "paused": number % 10 == 7,
                 "next_run_at": at + timedelta(hours=3), "last_job_id": jid, "created_at": at,
                 "updated_at": at, "version": 1, "schema_version": 1}
            )  # fmt: skip
            failed = number % 10 == 3
            out["jobs"].append(
                {"_id": jid, "instance_id": iid, "plan_id": pid, "type": "BACKUP",
                 "status": "FAILED" if failed else "SUCCEEDED",
                 "reason": "pg_dump exited with 1" if failed else None,
                 "created_at": at - timedelta(minutes=20),
                 "started_at": at - timedelta(minutes=20),
                 "ended_at": at - timedelta(minutes=10), "schema_version": 1}
            )  # fmt: skip
            for k in range(POINTS_PER_PLAN):
                out["points"].append(
                    {"_id": f"rp-{n:06d}-{p}-{k}", "instance_id": iid, "plan_id": pid,
                     "destination_id": "d", "job_id": jid, "state": "available",
                     "created_at": at - timedelta(hours=6 * k, minutes=10),
                     "expires_at": at + timedelta(days=7), "items": [], "schema_version": 1}
                )  # fmt: skip
    return out


async def seed(store: Database, first: int, count: int) -> None:
    docs = _docs(first, count)
    for name, collection in (
        ("instances", store.instances),
        ("plans", store.plans),
        ("jobs", store.jobs),
        ("points", store.restore_points),
    ):
        batch = docs[name]
        for i in range(0, len(batch), 500):
            try:
                await collection.insert_many(batch[i : i + 500], ordered=False)
            except BulkWriteError as exc:  # a retried insert finds its documents there
                if any(e.get("code") != 11000 for e in exc.details.get("writeErrors", [])):
                    raise


async def timed(
    name: str, call: Callable[[], Awaitable[int | None]], seconds: float, *, at_least: int = 3
) -> Result:
    """One call at a time after one not counted, for ``seconds`` and at least ``at_least``
    calls (an answer slower than the window still gets a figure); a status >= 400 is an
    error."""
    await call()
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(latencies) < at_least:
        begun = time.perf_counter()
        status = await call()
        latencies.append(time.perf_counter() - begun)
        errors += status is not None and status >= 400
    return Result(name, len(latencies), errors, time.perf_counter() - start, latencies)


def get(url: str) -> Request:
    headers = {"Authorization": aiohttp.encode_basic_auth(*BROKER)}

    async def call(http: aiohttp.ClientSession, _n: int) -> int:
        async with http.get(url, headers=headers) as r:
            await r.read()
            return r.status

    return call


async def main(sizes: list[int], seconds: float) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="protection-bench-"))
    db = EmbeddedMongo(tmp / "db")
    db.start()
    db_name = "bench"
    services: dict[bool, tuple[Process, str]] = {}
    bare: Process | None = None
    store = connect(db.url, db_name)
    await store.ensure_indexes()
    try:
        for per_plan in (True, False):
            port = free_port()
            env = {
                **os.environ,
                "MONGODB_URL": db.url,
                "MONGODB_DATABASE": db_name,
                "PORT": str(port),
                "DATA_DIR": str(tmp / f"data-{per_plan}"),
                "BROKER_USERNAME": BROKER[0],
                "BROKER_PASSWORD": BROKER[1],
                "SECRETS_MASTER_KEYS": generate_master_key_spec(),
                "BACKGROUND_ENABLED": "false",
                "METRICS_PER_PLAN": str(per_plan).lower(),
                "LOG_LEVEL": "WARNING",
            }
            log = tmp / f"service-{per_plan}.log"
            service = Process([sys.executable, "-m", "broker"], env=env, log=log)
            services[per_plan] = (service.start(port, timeout=90), f"http://127.0.0.1:{port}")
        base, base_off = services[True][1], services[False][1]

        figures: list[Figure] = []
        growth: dict[int, dict[str, float]] = {}
        seeded = 0
        for plans in sizes:
            instances = plans // PLANS_PER_INSTANCE
            await seed(store, seeded, instances - seeded)
            seeded = instances
            started = time.perf_counter()
            await protection.refresh(store, now())  # the first look: every instance is new
            first_refresh = time.perf_counter() - started
            started = time.perf_counter()
            await protection.refresh(store, now())  # as the evaluator runs: states stored
            refresh_s = time.perf_counter() - started
            started = time.perf_counter()
            await protection.evaluate(store, now())  # its reads and rules, nothing written
            queries_s = time.perf_counter() - started

            first_url = f"{base}/v1/protection?state=unprotected"
            middle = max(1, instances // 20 // 2)  # a page in the middle of the whole list
            numbered_url = f"{base}/v1/protection?page={middle}&size=20"
            before = (
                await store.protection.find({}, {"created_at": 1})
                .sort([("created_at", -1), ("_id", -1)])
                .skip((middle - 1) * 20 - 1)
                .limit(1)
                .to_list()
            )
            deep = encode_cursor(before[0]) if before else None
            later_url = f"{base}/v1/protection?cursor={deep}" if deep else numbered_url
            async with aiohttp.ClientSession() as http:
                headers = {"Authorization": aiohttp.encode_basic_auth(*BROKER)}
                async with http.get(first_url, headers=headers) as r:
                    assert r.status == 200, await r.text()
                    body = await r.read()
            (tmp / "page.json").write_bytes(body)
            if bare is not None:
                bare.stop()
            bare, bare_url = bare_server(tmp / "page.json", log=tmp / "bare.log")

            unprotected_query = {"state": "unprotected"}
            later = deep or page_cursor(middle)
            numbered = page_cursor(middle)

            async def first_alone() -> None:
                await protection.fleet_page(
                    store, protection.ProtectionState.UNPROTECTED, limit=20, cursor=None
                )

            async def later_alone(cursor: str = later) -> None:
                await protection.fleet_page(store, None, limit=20, cursor=cursor)

            async def numbered_alone(cursor: str = numbered) -> None:
                await protection.fleet_page(store, None, limit=20, cursor=cursor)

            async def metrics_alone() -> None:
                await protection.summary(store)

            scenarios: list[tuple[str, Request]] = [
                (f"bare handler ({len(body)} bytes)", get(bare_url)),
                ("GET /v1/protection?state=unprotected", get(first_url)),
                (f"GET /v1/protection?cursor=<page {middle}'s>", get(later_url)),
                ("GET /metrics (per-plan series)", get(f"{base}/metrics")),
                ("GET /metrics (METRICS_PER_PLAN=false)", get(f"{base_off}/metrics")),
                (f"GET /v1/protection?page={middle}&size=20", get(numbered_url)),
            ]
            results: dict[str, Result] = {}
            async with aiohttp.ClientSession() as http:
                for name, request in scenarios:
                    results[name] = await timed(name, functools.partial(request, http, 0), seconds)
            alone = {
                "first": await timed("fleet_page(unprotected)", first_alone, seconds),
                "later": await timed(f"fleet_page(cursor {middle})", later_alone, seconds),
                "numbered": await timed(f"fleet_page(page={middle})", numbered_alone, seconds),
                "metrics": await timed("summary()", metrics_alone, seconds),
            }
            total = await store.protection.count_documents(unprotected_query)
            print_table(
                list(results.values()),
                f"{plans} plans ({instances} instances, {total} unprotected), one request at a "
                f"time, {seconds:g} s each",
            )
            print_table(list(alone.values()), "the database alone, from this process", "calls/s")
            print(
                f"\nfleet evaluation (refresh): {refresh_s:.2f} s (first one {first_refresh:.2f} "
                f"s); evaluate() alone, nothing written, {queries_s:.2f} s"
            )
            bare_ms = results[scenarios[0][0]].percentile(50)
            p50 = {name: r.percentile(50) for name, r in results.items()}
            growth[plans] = {
                "first": p50[scenarios[1][0]],
                "later": p50[scenarios[2][0]],
                "metrics": p50[scenarios[3][0]],
                "metrics_off": p50[scenarios[4][0]],
                "numbered": p50[scenarios[5][0]],
                "refresh": refresh_s * 1000,
            }
            label = f"{plans:,} plans"
            figures += [
                Figure("protection_fleet", f"fleet view first page, {label}: p50",
                       p50[scenarios[1][0]], "ms", "database alone p50",
                       alone["first"].percentile(50), higher_is_better=False,
                       target_value=100.0, note=f"bare handler {bare_ms:.2f} ms"),
                Figure("protection_fleet", f"fleet view by cursor at page {middle}, {label}: p50",
                       p50[scenarios[2][0]], "ms", "database alone p50",
                       alone["later"].percentile(50), higher_is_better=False,
                       target_value=200.0),
                Figure("protection_fleet", f"/metrics per plan, {label}: p50",
                       p50[scenarios[3][0]], "ms", "database alone p50",
                       alone["metrics"].percentile(50), higher_is_better=False,
                       target_value=2000.0),
                Figure("protection_fleet", f"/metrics without per-plan, {label}: p50",
                       p50[scenarios[4][0]], "ms", "bare handler p50", bare_ms,
                       higher_is_better=False, target_value=100.0),
                Figure("protection_fleet", f"fleet view page={middle}&size=20, {label}: p50",
                       p50[scenarios[5][0]], "ms", "database alone p50",
                       alone["numbered"].percentile(50), higher_is_better=False),
                Figure("protection_fleet", f"fleet evaluation, {label}", refresh_s * 1000, "ms",
                       "evaluate() alone", queries_s * 1000, higher_is_better=False),
            ]  # fmt: skip
        print("\ngrowth (p50 ms; evaluation ms):")
        header = ("plans", "first", "cursor", "page=N", "metrics", "no plans", "eval")
        print("  " + " ".join(f"{h:>9}" for h in header))
        for plans, row in growth.items():
            print(
                f"  {plans:>9} {row['first']:9.2f} {row['later']:9.2f} {row['numbered']:9.2f} "
                f"{row['metrics']:9.2f} "
                f"{row['metrics_off']:9.2f} {row['refresh']:9.0f}"
            )
        report(figures)
    finally:
        await store.close()
        if bare is not None:
            bare.stop()
        for service, _ in services.values():
            service.stop()
        db.stop()


def _sizes(text: str) -> list[int]:
    sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    if not sizes or sizes[0] < PLANS_PER_INSTANCE:
        raise argparse.ArgumentTypeError("plans: a comma-separated list of sizes, each >= 2")
    return sizes


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plans", type=_sizes, default=_sizes("1000,5000,10000"))
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    asyncio.run(main(args.plans, args.seconds))
