"""Throughput of the backup-manager API with JWT authentication on.

``.venv/bin/python benchmarks/api_throughput.py [--concurrency 32] [--seconds 5]``
(or ``python -m benchmarks api_throughput``).

Starts an embedded database, a JWKS stand-in (in this process, serving the signing key the way
UAA's ``/token_keys`` does) and the service as a child process (as in production, background
loops off), loads one instance with 10 plans and 1,000 jobs, then measures under concurrency,
each request carrying an RS256 bearer token the service verifies:

- the instance's items (the token check and one indexed lookup: the API's own overhead),
- listing plans, listing jobs (first page, a numbered page deep in the list, a filtered page),
- creating plans,

beside, in the same run, a bare aiohttp handler (its own process) answering the very bytes of
the jobs page, and the database alone running the queries one jobs page costs.

With the embedded database (SecantusDB) a list costs time proportional to the documents that
match, not to the page (its planner fetches every index match and sorts them in memory), so
the jobs figures are bounded by it: the last lines say how much of each request it takes.
``--mongodb-url`` points the run at a real MongoDB instead (its database ``bench_api_<random>``
is dropped afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from pymongo import AsyncMongoClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backup import jobs
from backup.embedded_db import EmbeddedMongo
from backup.pagination import now
from backup.secrets import generate_master_key_spec
from benchmarks._harness import (
    Process,
    Request,
    Result,
    bare_server,
    free_port,
    measure,
    print_table,
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
    API, and 1,000 finished jobs with stage logs straight into the database."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(db_url, tz_aware=True)
    store = client[db_name]
    instance_id = base.rsplit("/", 1)[-1]
    at = now()
    await store.instances.insert_one(
        {"_id": instance_id, "state": "ready", "items": ["db1", "db2"], "agent": {},
         "database": {}, "secrets": {}, "created_at": at, "updated_at": at, "version": 1,
         "schema_version": 1}
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
    docs = [
        jobs.new_job(
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
        for n in range(JOBS)
    ]
    await store.jobs.insert_many(docs)
    await client.close()
    return instance_id, dest


async def database_only(db_url: str, db_name: str, instance_id: str) -> dict[str, float]:
    """Milliseconds the database alone spends on what one jobs page asks of it (median of 20):
    the page and the total, as the service runs them."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(db_url, tz_aware=True)
    jobs_ = client[db_name].jobs
    query = {"instance_id": instance_id}
    timings: dict[str, list[float]] = {"page of 21": [], "count": []}
    for _ in range(20):
        started = time.perf_counter()
        found = jobs_.find(query, {"items.logs": 0}).sort([("created_at", -1), ("_id", -1)])
        await found.limit(21).to_list()
        timings["page of 21"].append(time.perf_counter() - started)
        started = time.perf_counter()
        await jobs_.count_documents(query)
        timings["count"].append(time.perf_counter() - started)
    await client.close()
    return {k: statistics.median(v) * 1000 for k, v in timings.items()}


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
        (tmp / "jobs-page.json").write_bytes(page)
        bare, bare_url = bare_server(tmp / "jobs-page.json", log=tmp / "bare.log")
        db_times = await database_only(db_url, db_name, instance_id)

        run = uuid.uuid4().hex[:6]

        async def create(http: aiohttp.ClientSession, n: int) -> int:
            body = {"name": f"bench-{run}-{n}", "destination_id": dest, "frequency": "0 3 * * *",
                    "retention": {"style": "DAYS", "period": 7}}  # fmt: skip
            async with http.post(base + "/plans", json=body, headers=auth) as r:
                await r.read()
                return r.status

        scenarios: list[tuple[str, Request]] = [
            (f"bare aiohttp handler ({len(page)} bytes)", get(bare_url, {})),
            ("GET /items (token check + one lookup)", get(base + "/items", auth)),
            (f"GET /plans ({PLANS} plans)", get(base + "/plans", auth)),
            (f"GET /jobs first page (of {JOBS})", get(base + "/jobs", auth)),
            ("GET /jobs?page=40&size=20", get(base + "/jobs?page=40&size=20", auth)),
            ("GET /jobs?status=FAILED", get(base + "/jobs?status=FAILED", auth)),
            ("POST /plans", create),
        ]
        results: list[Result] = []
        for name, request in scenarios:
            results.append(await measure(name, concurrency, seconds, request))
        print_table(
            results,
            f"concurrency {concurrency}, {seconds:g} s each, every API request with an RS256 "
            "bearer token (JWKS cached)",
        )
        spent = sum(db_times.values())
        print(
            f"\ndatabase alone ({'embedded SecantusDB' if db else 'MongoDB'}), the queries of "
            "one GET /jobs page, one after the other (median of 20): "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in db_times.items())
            + f"; at most {1000 / spent:.0f} pages/s if the database serves one query at a time"
        )
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
