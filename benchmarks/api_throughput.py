"""Throughput of the backup-manager API with JWT authentication on.

One command: ``.venv/bin/python benchmarks/api_throughput.py [--concurrency 32] [--seconds 5]``.
Starts an embedded database, a JWKS stand-in (in this process) and the service (a child
process, as in production), loads one instance with 1,000 jobs and some plans, then measures
listing plans, listing jobs (first page) and creating plans under concurrency, beside a bare
aiohttp handler (a minimal JSON handler in its own process) measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from pymongo import AsyncMongoClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backup import jobs  # noqa: E402
from backup.embedded_db import EmbeddedMongo  # noqa: E402
from backup.pagination import now  # noqa: E402
from backup.secrets import generate_master_key_spec  # noqa: E402
from tests.servers.ports import free_port, wait_listening  # noqa: E402

BARE = """
import sys
from aiohttp import web
async def ok(request):
    return web.json_response({"items": [], "total": 0, "next_cursor": None})
app = web.Application()
app.router.add_get("/bare", ok)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


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
    return runner, f"http://127.0.0.1:{port}"


def start_processes(
    env: dict[str, str], bare_port: int
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """The service (``python -m broker``) and the bare aiohttp server, as child processes."""
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    service = subprocess.Popen([sys.executable, "-m", "broker"], cwd=ROOT, env=env, **quiet)
    bare_cmd = [sys.executable, "-c", BARE, str(bare_port)]
    return service, subprocess.Popen(bare_cmd, cwd=ROOT, **quiet)


async def database_only(store: Any, instance_id: str) -> dict[str, float]:
    """What the database alone spends on one jobs page, to tell it from the service's share."""
    query = {"instance_id": instance_id}
    timings: dict[str, list[float]] = {"page of 21": [], "count": []}
    for _ in range(20):
        started = time.perf_counter()
        cursor = store.jobs.find(query, {"items.logs": 0}).sort([("created_at", -1), ("_id", -1)])
        await cursor.limit(21).to_list()
        timings["page of 21"].append(time.perf_counter() - started)
        started = time.perf_counter()
        await store.jobs.count_documents(query)
        timings["count"].append(time.perf_counter() - started)
    return {k: statistics.median(v) * 1000 for k, v in timings.items()}


async def measure(
    name: str,
    concurrency: int,
    seconds: float,
    request: Callable[[aiohttp.ClientSession, int], Awaitable[int]],
) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    counter = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def worker() -> None:
            nonlocal errors, counter
            while time.perf_counter() < deadline:
                counter += 1
                started = time.perf_counter()
                status = await request(http, counter)
                latencies.append(time.perf_counter() - started)
                if status >= 400:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "name": name,
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }


async def main(concurrency: int, seconds: float) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="api-bench-"))
    db = EmbeddedMongo(tmp / "db")
    db.start()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    runner, jwks_url = await jwks_server(key)
    issuer = "https://uaa.bench.example/oauth/token"
    port, bare_port = free_port(), free_port()
    env = {
        **os.environ,
        "MONGODB_URL": db.url,
        "MONGODB_DATABASE": "bench",
        "PORT": str(port),
        "DATA_DIR": str(tmp / "data"),
        "BROKER_PASSWORD": "bench-pw",
        "SECRETS_MASTER_KEYS": generate_master_key_spec(),
        "OIDC_ISSUER": issuer,
        "OIDC_JWKS_URL": jwks_url + "/token_keys",
        "OIDC_AUDIENCE": "backup_manager",
        "OPERATOR_SCOPE": "backup_manager.admin",
        "LOG_LEVEL": "INFO",
    }
    service, bare = start_processes(env, bare_port)
    try:
        wait_listening(port, 60, service)
        wait_listening(bare_port, 30, bare)
        token = jwt.encode(
            {
                "sub": "operator",
                "user_id": "operator",
                "scope": ["openid", "backup_manager.admin"],
                "aud": ["backup_manager"],
                "iss": issuer,
                "exp": int(time.time()) + 3600,
            },
            key,
            algorithm="RS256",
            headers={"kid": "bench"},
        )
        auth = {"Authorization": f"Bearer {token}"}
        instance_id = str(uuid.uuid4())
        client: AsyncMongoClient = AsyncMongoClient(db.url, tz_aware=True)
        store = client["bench"]
        at = now()
        await store.instances.insert_one(
            {"_id": instance_id, "state": "ready", "items": ["db1", "db2"], "agent": {},
             "database": {}, "secrets": {}, "created_at": at, "updated_at": at,
             "version": 1, "schema_version": 1}
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}/v1/service_instances/{instance_id}"
        async with aiohttp.ClientSession(headers=auth) as http:
            async with http.post(
                base + "/destinations",
                json={"type": "S3", "name": "d", "endpoint": "http://127.0.0.1:9", "bucket": "bkt",
                      "access_key_id": "a", "secret_access_key": "s"},
            ) as r:  # fmt: skip
                assert r.status == 201, await r.text()
                dest = (await r.json())["id"]
            plan_ids = []
            for n in range(10):
                async with http.post(
                    base + "/plans",
                    json={"name": f"plan-{n}", "destination_id": dest, "frequency": "0 3 * * *",
                          "retention": {"style": "FILES", "period": 7}},
                ) as r:  # fmt: skip
                    assert r.status == 201, await r.text()
                    plan_ids.append((await r.json())["id"])
        docs = []
        for n in range(1000):
            doc = jobs.new_job(
                instance_id=instance_id, type="BACKUP", plan_id=plan_ids[n % 10],
                destination_id=dest, trigger="SCHEDULE",
                items=[jobs.new_item("db1", logs={"backup": "x" * 2000})],
                compression=True, encryption={"enabled": False}, status="SUCCEEDED",
            )  # fmt: skip
            docs.append(doc)
        await store.jobs.insert_many(docs)
        db_times = await database_only(store, instance_id)
        await client.close()

        async def get(url: str) -> Callable[[aiohttp.ClientSession, int], Awaitable[int]]:
            async def call(http: aiohttp.ClientSession, n: int) -> int:
                async with http.get(url, headers=auth) as r:
                    await r.read()
                    return r.status

            return call

        run = uuid.uuid4().hex[:6]

        async def create(http: aiohttp.ClientSession, n: int) -> int:
            body = {"name": f"bench-{run}-{n}", "destination_id": dest, "frequency": "0 3 * * *",
                    "retention": {"style": "DAYS", "period": 7}}  # fmt: skip
            async with http.post(base + "/plans", json=body, headers=auth) as r:
                await r.read()
                return r.status

        results = [
            await measure(
                "bare aiohttp handler",
                concurrency,
                seconds,
                await get(f"http://127.0.0.1:{bare_port}/bare"),
            ),
            await measure(
                "GET /plans (10 plans)", concurrency, seconds, await get(base + "/plans")
            ),
            await measure(
                "GET /jobs first page (of 1000)", concurrency, seconds, await get(base + "/jobs")
            ),
            await measure("POST /plans", concurrency, seconds, create),
        ]
        print(f"\nconcurrency {concurrency}, {seconds:g} s each, JWT (RS256) auth on\n")
        header = ("scenario", "requests", "errors", "req/s", "p50 ms", "p99 ms")
        print("{:34} {:>9} {:>7} {:>9} {:>8} {:>8}".format(*header))
        for r in results:
            print(
                f"{r['name']:34} {r['requests']:>9} {r['errors']:>7} {r['rps']:>9.0f} "
                f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f}"
            )
        print(
            "\ndatabase alone, same queries as GET /jobs (median of 20): "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in db_times.items())
        )
    finally:
        for proc in (service, bare):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        await runner.cleanup()
        db.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    asyncio.run(main(args.concurrency, args.seconds))
