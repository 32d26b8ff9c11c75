"""Throughput of the backup-manager API with JWT authentication on, and where each request's
time goes.

``.venv/bin/python benchmarks/api_throughput.py [--concurrency 32] [--seconds 10]``
(or ``python -m benchmarks api_throughput``).

Starts an embedded database, a JWKS stand-in (in this process, serving the signing key the way
UAA's ``/token_keys`` does) and the service as a child process (as in production, background
loops off), loads one instance with 10 plans and 1,000 finished jobs (one an hour, as a
history; each plan points at its latest job, as the runner leaves it), then measures under
concurrency, each request carrying an RS256 bearer token the service verifies:

- the instance's items (the token check and one indexed lookup: the API's own overhead),
- listing plans, listing jobs (first page, page 40 asked straight and with the ``as_of`` of
  page 1, a filtered page),
- creating plans,

beside, in the same run, a bare aiohttp handler (its own process) answering the very bytes of
the jobs page, and **the database alone** running, at the same concurrency and from this
process, the queries each list request costs (the authorization's instance lookup and the
domain's list functions, without HTTP or the service): the physical limit of that request
here. For each scenario it also says where the time goes: CPU milliseconds per request of the
service and of the database process, and the database commands one request sends.

The figures are reported for the ``make bench`` summary (``benchmarks._harness.report``).
``--mongodb-url`` points the run at a real MongoDB instead (its database
``bench_api_<random>`` is dropped afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from pymongo import AsyncMongoClient, monitoring

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backup import jobs, plans
from backup.database import Database, connect
from backup.embedded_db import EmbeddedMongo
from backup.instances import LIVE_STATES
from backup.pagination import now, page_cursor
from backup.secrets import generate_master_key_spec
from benchmarks._harness import (
    Figure,
    Process,
    Request,
    Result,
    bare_server,
    cpu_seconds,
    free_port,
    measure,
    measure_calls,
    print_table,
    report,
)

ISSUER = "https://uaa.bench.example/oauth/token"
JOBS = 1000
PLANS = 10


async def jwks_server(key: rsa.RSAPrivateKey) -> tuple[web.AppRunner, str]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="bench", alg="RS256", use="sig")

    async def keys(request: web.Request) -> web.Response:
        return web.json_response({"keys": [jwk]})

    app = web.Application()
    app.router.add_get("/token_keys", keys)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/token_keys"


def operator_token(key: rsa.RSAPrivateKey) -> str:
    claims = {
        "sub": "operator",
        "user_id": "operator",
        "scope": ["openid", "backup_manager.admin"],
        "aud": ["backup_manager"],
        "iss": ISSUER,
        "exp": int(time.time()) + 3600,
    }
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "bench"})


async def load(db_url: str, db_name: str, base: str, auth: dict[str, str]) -> tuple[str, str]:
    """One instance (written as provisioning writes it), a destination and plans through the
    API, and 1,000 finished jobs with stage logs straight into the database, one an hour up to
    now; each plan's last_job_id names its latest job."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(db_url, tz_aware=True)
    store = client[db_name]
    instance_id = base.rsplit("/", 1)[-1]
    at = now()
    await store.instances.insert_one(
        {"_id": instance_id, "state": "ready", "items": ["db1", "db2"], "agent": {},
         "database": {}, "secrets": {}, "created_at": at - timedelta(days=60), "updated_at": at,
         "version": 1, "schema_version": 1}
    )  # fmt: skip
    async with aiohttp.ClientSession(headers=auth) as http:
        body = {"type": "S3", "name": "d", "endpoint": "http://127.0.0.1:9", "bucket": "bkt",
                "access_key_id": "a", "secret_access_key": "s"}  # fmt: skip
        async with http.post(base + "/destinations", json=body) as r:
            assert r.status == 201, await r.text()
            dest = (await r.json())["id"]
        plan_ids = []
        for n in range(PLANS):
            body = {"name": f"plan-{n}", "destination_id": dest, "frequency": "0 3 * * *",
                    "retention": {"style": "FILES", "period": 7}}  # fmt: skip
            async with http.post(base + "/plans", json=body) as r:
                assert r.status == 201, await r.text()
                plan_ids.append((await r.json())["id"])
    docs = []
    for n in range(JOBS):
        doc = jobs.new_job(
            instance_id=instance_id,
            type="BACKUP",
            plan_id=plan_ids[n % PLANS],
            destination_id=dest,
            trigger="SCHEDULE",
            items=[jobs.new_item("db1", logs={"backup": "x" * 2000})],
            compression=True,
            encryption={"enabled": False},
            status="FAILED" if n % 10 == 0 else "SUCCEEDED",
        )
        doc["created_at"] = at - timedelta(hours=JOBS - n)
        doc["ended_at"] = doc["created_at"] + timedelta(minutes=3)
        docs.append(doc)
    await store.jobs.insert_many(docs)
    for plan_id, doc in zip(plan_ids, docs[-PLANS:], strict=True):
        await store.plans.update_one({"_id": plan_id}, {"$set": {"last_job_id": doc["_id"]}})
    await client.close()
    return instance_id, dest


class Commands(monitoring.CommandListener):
    """Counts the commands a client sends (its database round trips)."""

    def __init__(self) -> None:
        self.sent = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.sent += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def request_queries(store: Database, instance_id: str) -> dict[str, Any]:
    """What each list request asks of the database, as the service asks it: the
    authorization's lookup of the instance, then the handler's domain calls."""

    async def instance() -> None:
        found = await store.instances.find_one(
            {"_id": instance_id, "state": {"$in": list(LIVE_STATES)}}
        )
        assert found is not None

    async def plans_page() -> None:
        await instance()
        page = await plans.list_page(store, instance_id, 20, None)
        await jobs.last_jobs(store, [d["last_job_id"] for d in page.items if d.get("last_job_id")])

    def jobs_page(cursor: str | None, status: str | None = None) -> Any:
        async def call() -> None:
            await instance()
            await jobs.list_page(store, instance_id, limit=20, cursor=cursor, status=status)

        return call

    return {"plans": plans_page, "first": jobs_page(None), "page40": jobs_page(page_cursor(40)),
            "failed": jobs_page(None, "FAILED")}  # fmt: skip


async def database_alone(
    db_url: str, db_name: str, instance_id: str, as_of: str, concurrency: int, seconds: float
) -> tuple[dict[str, Result], dict[str, float]]:
    """The list requests' queries alone, at ``concurrency``, and the commands each sends."""
    listener = Commands()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        db_url, tz_aware=True, event_listeners=[listener]
    )
    probe = connect(db_url, db_name)  # the product's read and write concerns, on our client
    store = Database.__new__(Database)
    store.client = client
    store.mongo = client.get_database(
        db_name, write_concern=probe.mongo.write_concern, read_concern=probe.mongo.read_concern
    )
    await probe.close()
    calls = request_queries(store, instance_id)
    page40_as_of = page_cursor(40, as_of)

    async def page40_pinned() -> None:
        found = await store.instances.find_one(
            {"_id": instance_id, "state": {"$in": list(LIVE_STATES)}}
        )
        assert found is not None
        await jobs.list_page(store, instance_id, limit=20, cursor=page40_as_of)

    calls["page40_as_of"] = page40_pinned
    results: dict[str, Result] = {}
    commands: dict[str, float] = {}
    try:
        for name, call in calls.items():
            for _ in range(3):  # warm: the windows learn the list as the service's do
                await call()
            before = listener.sent
            await call()
            commands[name] = listener.sent - before
            results[name] = await measure_calls(
                f"database alone: {name}", concurrency, seconds, call
            )
    finally:
        await client.close()
    return results, commands


def get(url: str, headers: dict[str, str]) -> Request:
    async def call(http: aiohttp.ClientSession, n: int) -> int:
        async with http.get(url, headers=headers) as r:
            await r.read()
            return r.status

    return call


async def main(concurrency: int, seconds: float, mongodb_url: str | None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="api-bench-"))
    db = EmbeddedMongo(tmp / "db") if mongodb_url is None else None
    if db is not None:
        db.start()
    db_url = db.url if db is not None else str(mongodb_url)
    db_name = "bench" if db is not None else f"bench_api_{uuid.uuid4().hex[:8]}"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    runner, jwks_url = await jwks_server(key)
    port = free_port()
    env = {
        **os.environ,
        "MONGODB_URL": db_url,
        "MONGODB_DATABASE": db_name,
        "PORT": str(port),
        "DATA_DIR": str(tmp / "data"),
        "BROKER_PASSWORD": "bench-broker-password",
        "SECRETS_MASTER_KEYS": generate_master_key_spec(),
        "OIDC_ISSUER": ISSUER,
        "OIDC_JWKS_URL": jwks_url,
        "OIDC_AUDIENCE": "backup_manager",
        "OPERATOR_SCOPE": "backup_manager.admin",
        "BACKGROUND_ENABLED": "false",
        "LOG_LEVEL": "WARNING",
    }
    service = Process([sys.executable, "-m", "broker"], env=env, log=tmp / "service.log")
    bare: Process | None = None
    try:
        service.start(port, timeout=90)
        auth = {"Authorization": f"Bearer {operator_token(key)}"}
        base = f"http://127.0.0.1:{port}/v1/service_instances/{uuid.uuid4()}"
        instance_id, dest = await load(db_url, db_name, base, auth)
        async with aiohttp.ClientSession() as http:  # the bare server answers these bytes
            async with http.get(base + "/jobs", headers=auth) as r:
                assert r.status == 200, await r.text()
                page = await r.read()
            async with http.get(base + "/jobs?page=1&size=20", headers=auth) as r:
                assert r.status == 200, await r.text()
                as_of = (await r.json())["as_of"]
        (tmp / "jobs-page.json").write_bytes(page)
        bare, bare_url = bare_server(tmp / "jobs-page.json", log=tmp / "bare.log")
        alone, commands = await database_alone(
            db_url, db_name, instance_id, as_of, concurrency, seconds
        )

        run = uuid.uuid4().hex[:6]

        async def create(http: aiohttp.ClientSession, n: int) -> int:
            body = {"name": f"bench-{run}-{n}", "destination_id": dest, "frequency": "0 3 * * *",
                    "retention": {"style": "DAYS", "period": 7}}  # fmt: skip
            async with http.post(base + "/plans", json=body, headers=auth) as r:
                await r.read()
                return r.status

        scenarios: list[tuple[str, str | None, Request]] = [
            (f"bare aiohttp handler ({len(page)} bytes)", None, get(bare_url, {})),
            ("GET /items (token check + one lookup)", None, get(base + "/items", auth)),
            (f"GET /plans ({PLANS} plans)", "plans", get(base + "/plans", auth)),
            (f"GET /jobs first page (of {JOBS})", "first", get(base + "/jobs", auth)),
            ("GET /jobs?page=40&size=20", "page40", get(base + "/jobs?page=40&size=20", auth)),
            ("GET /jobs?page=40&size=20&as_of=<page 1's>", "page40_as_of",
             get(base + f"/jobs?page=40&size=20&as_of={as_of}", auth)),
            ("GET /jobs?status=FAILED", "failed", get(base + "/jobs?status=FAILED", auth)),
            ("POST /plans", None, create),
        ]  # fmt: skip
        results: dict[str, Result] = {}
        costs: dict[str, tuple[float, float]] = {}
        db_pid = db.pid if db is not None else None
        assert service.proc is not None
        for name, key_, request in scenarios:
            service_cpu = cpu_seconds(service.proc.pid)
            db_cpu = cpu_seconds(db_pid) if db_pid else 0.0
            result = await measure(name, concurrency, seconds, request)
            # CPU of the whole run (warm-up too) over the requests of the whole run, about
            served = max(1.0, result.rate * (seconds + 0.5))
            costs[name] = (
                (cpu_seconds(service.proc.pid) - service_cpu) * 1000 / served,
                ((cpu_seconds(db_pid) - db_cpu) * 1000 / served) if db_pid else float("nan"),
            )
            results[key_ or name] = result
        print_table(
            list(results.values()),
            f"concurrency {concurrency}, {seconds:g} s each, every API request with an RS256 "
            "bearer token (JWKS cached)",
        )
        print_table(
            list(alone.values()),
            f"the database alone ({'embedded SecantusDB' if db else 'MongoDB'}), each list "
            f"request's queries from this process, concurrency {concurrency}",
            unit="calls/s",
        )
        print("\nwhere a request's time goes (CPU ms per request; database commands sent):")
        for name, _, _ in scenarios:
            service_ms, db_ms = costs[name]
            print(f"  {name:44} service {service_ms:6.2f}  database {db_ms:6.2f}")
        for name, sent in commands.items():
            print(f"  database commands of one '{name}' request: {sent:g}")
        bare_rate = results[scenarios[0][0]].rate
        figures = [
            Figure("api_throughput", "GET /items (token check + one lookup)",
                   results[scenarios[1][0]].rate, "req/s", "bare aiohttp handler", bare_rate),
        ]  # fmt: skip
        labels = {
            "plans": f"GET /plans ({PLANS} plans)",
            "first": f"GET /jobs first page (of {JOBS})",
            "page40": "GET /jobs?page=40&size=20",
            "page40_as_of": "GET /jobs page 40 with as_of",
            "failed": "GET /jobs?status=FAILED",
        }
        for key_, label in labels.items():
            got, limit = results[key_], alone[key_]
            figures.append(
                Figure("api_throughput", label, got.rate, "req/s", "database alone",
                       limit.rate, target_ratio=0.8,
                       target_value=200.0 if key_ == "first" else None)
            )  # fmt: skip
            figures.append(
                Figure("api_throughput", f"{label}: p99", got.percentile(99), "ms",
                       "database alone p99", limit.percentile(99), higher_is_better=False,
                       target_value=100.0)
            )  # fmt: skip
        report(figures)
        print(f"(logs in {tmp})")
    finally:
        if bare is not None:
            bare.stop()
        service.stop()
        await runner.cleanup()
        if db is not None:
            db.stop()
        else:
            client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(db_url)
            await client.drop_database(db_name)
            await client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--mongodb-url", default=None, help="a real MongoDB (default: embedded)")
    args = parser.parse_args()
    asyncio.run(main(args.concurrency, args.seconds, args.mongodb_url))
