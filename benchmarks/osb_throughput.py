"""Throughput of the OSB side of the broker, beside a bare aiohttp handler.

One command: ``.venv/bin/python benchmarks/osb_throughput.py [--concurrency 32] [--seconds 5]``
(or ``python -m benchmarks osb_throughput``).

Starts, each in its own process as in production: an embedded database (SecantusDB), our
agent (answering ``GET /status``), the service (``python -m broker``, JSON logs at INFO to a
file), and a bare aiohttp server that answers the same catalog bytes from a trivial handler.
Then, at the same concurrency, measures

- ``GET /bare``: the reference (no auth, no middleware, no database),
- ``GET /v2/catalog``: Basic auth, version check, request-id middleware, pre-rendered body,
- ``GET /v2/service_instances/:id/last_operation`` on a ready instance (one indexed read),
- a provision/deprovision cycle: ``PUT ?accepts_incomplete=true`` (202), poll
  ``last_operation`` until ``succeeded`` (the broker asks the agent's ``/status`` meanwhile),
  then a synchronous ``DELETE`` (200); reported per cycle and per request.

and prints requests (or cycles) per second with p50/p99 latency. The figures depend on the
machine and its load; compare the rows of one run, not runs of different machines.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backup.embedded_db import EmbeddedMongo
from backup.secrets import generate_master_key_spec
from benchmarks._harness import (
    Process,
    Result,
    bare_server,
    free_port,
    measure,
    print_table,
)
from broker.config import DEFAULT_CATALOG
from broker.osb.catalog import Catalog
from storage.egress import DEFAULT_DENY, networks_except

SERVICE_ID = "a2cc3ad7-d439-406d-9c62-e2be817c72fe"
PLAN_ID = "969e6b3d-4200-4f87-b552-cbc6882e7c95"
BROKER_USER, BROKER_PASSWORD = "bench", "bench-broker-pw"
AGENT_USER, AGENT_PASSWORD = "bench-agent", "bench-agent-pw"
POLL_SECONDS = 0.02  # platforms poll far less often (Retry-After: 5)


def agent_process(base: Path) -> tuple[Process, str]:
    port = free_port()
    (base / "scripts").mkdir(parents=True)
    env = {
        **os.environ,
        "client_username": AGENT_USER,
        "client_password": AGENT_PASSWORD,
        "client_port": str(port),
        "client_host": "127.0.0.1",
        "directory_backup": str(base / "backup"),
        "directory_restore": str(base / "restore"),
        "state_directory": str(base / "state"),
        "scripts_path": str(base / "scripts"),
    }
    cmd = [sys.executable, "-m", "agent"]
    return Process(cmd, env=env, log=base / "agent.log").start(port), f"http://127.0.0.1:{port}"


def provision_body(agent_url: str) -> dict[str, object]:
    return {
        "service_id": SERVICE_ID,
        "plan_id": PLAN_ID,
        "context": {"platform": "cloudfoundry", "organization_guid": "o", "space_guid": "s"},
        "parameters": {
            "agent": {"url": agent_url, "username": AGENT_USER, "password": AGENT_PASSWORD},
            "database": {"host": "127.0.0.1", "port": 5432, "username": "u", "password": "p"},
            "items": ["db1"],
        },
    }


async def database_alone(url: str, instance_id: str, concurrency: int, seconds: float) -> Result:
    """The read behind last_operation, straight from this process to the database, at the
    same concurrency: what the database alone allows."""
    from pymongo import AsyncMongoClient
    from pymongo.read_concern import ReadConcern

    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(url, tz_aware=True)
    coll = client.get_database("bench", read_concern=ReadConcern("majority")).instances
    projection = {"state": 1, "tombstone_expires_at": 1, "last_operation": 1}

    async def read(http: aiohttp.ClientSession, n: int) -> int:
        return 200 if await coll.find_one({"_id": instance_id}, projection) else 404

    try:
        return await measure("database alone: that read, no HTTP", concurrency, seconds, read)
    finally:
        await client.close()


async def main(concurrency: int, seconds: float) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="osb-bench-"))
    db = EmbeddedMongo(tmp / "db")
    db.start()
    port = free_port()
    env = {
        **os.environ,
        "MONGODB_URL": db.url,
        "MONGODB_DATABASE": "bench",
        "PORT": str(port),
        "DATA_DIR": str(tmp / "data"),
        "BROKER_USERNAME": BROKER_USER,
        "BROKER_PASSWORD": BROKER_PASSWORD,
        "SECRETS_MASTER_KEYS": generate_master_key_spec(),
        "LOG_LEVEL": "INFO",
        # The agent listens on 127.0.0.1, which the default egress policy denies.
        "EGRESS_DENY_NETWORKS": ",".join(networks_except(DEFAULT_DENY, "127.0.0.1")),
    }
    catalog_file = tmp / "catalog.json"
    catalog_file.write_bytes(Catalog.load(DEFAULT_CATALOG).body)
    processes: list[Process] = []
    try:
        agent, agent_url = agent_process(tmp / "agent")
        processes.append(agent)
        service = Process([sys.executable, "-m", "broker"], env=env, log=tmp / "broker.log").start(
            port
        )
        processes.append(service)
        bare, bare_url = bare_server(catalog_file)
        processes.append(bare)
        base = f"http://127.0.0.1:{port}"
        headers = {
            "Authorization": aiohttp.encode_basic_auth(BROKER_USER, BROKER_PASSWORD),
            "X-Broker-API-Version": "2.17",
        }
        body = provision_body(agent_url)

        async def get(url: str) -> object:
            async def call(http: aiohttp.ClientSession, n: int) -> int:
                async with http.get(url, headers=headers) as r:
                    await r.read()
                    return r.status

            return call

        async def wait_done(http: aiohttp.ClientSession, iid: str) -> tuple[int, int]:
            polls = 0
            while True:
                polls += 1
                url = f"{base}/v2/service_instances/{iid}/last_operation"
                async with http.get(url, headers=headers) as r:
                    state = (await r.json())["state"] if r.status == 200 else "error"
                if state != "in progress":
                    return (200 if state == "succeeded" else 500), polls
                await asyncio.sleep(POLL_SECONDS)

        requests_in_cycles = 0

        async def cycle(http: aiohttp.ClientSession, n: int) -> int:
            nonlocal requests_in_cycles
            iid = str(uuid.uuid4())
            url = f"{base}/v2/service_instances/{iid}"
            async with http.put(url + "?accepts_incomplete=true", json=body, headers=headers) as r:
                await r.read()
                if r.status != 202:
                    return r.status
            status, polls = await wait_done(http, iid)
            if status != 200:
                return status
            async with http.delete(
                f"{url}?service_id={SERVICE_ID}&plan_id={PLAN_ID}", headers=headers
            ) as r:
                await r.read()
                requests_in_cycles += 2 + polls
                return r.status

        # One ready instance for last_operation.
        async with aiohttp.ClientSession() as http:
            ready = str(uuid.uuid4())
            async with http.put(
                f"{base}/v2/service_instances/{ready}?accepts_incomplete=true",
                json=body,
                headers=headers,
            ) as r:
                assert r.status == 202, await r.text()
            assert (await wait_done(http, ready))[0] == 200

        results: list[Result] = [
            await measure("bare aiohttp handler (same catalog bytes)", concurrency, seconds,
                          await get(bare_url)),  # type: ignore[arg-type]
            await measure("GET /v2/catalog", concurrency, seconds,
                          await get(f"{base}/v2/catalog")),  # type: ignore[arg-type]
            await measure("GET .../last_operation (ready instance)", concurrency, seconds,
                          await get(f"{base}/v2/service_instances/{ready}/last_operation")),  # type: ignore[arg-type]
        ]  # fmt: skip
        results.append(await database_alone(db.url, ready, concurrency, seconds))
        cycles = await measure("provision + poll + deprovision cycle", concurrency, seconds, cycle)
        print_table(
            results,
            f"concurrency {concurrency}, {seconds:g} s each (after 0.5 s warm-up); the service, "
            "its database, the agent and the bare server each in its own process",
        )
        print_table([cycles], "provision/deprovision cycles", unit="cycles/s")
        if cycles.requests:
            per = requests_in_cycles / max(cycles.requests, 1)
            print(
                f"\n{per:.1f} HTTP requests per cycle (PUT, last_operation polled every "
                f"{POLL_SECONDS * 1000:.0f} ms, "
                f"DELETE): {cycles.rate * per:.0f} OSB requests/s during the cycles"
            )
        print(
            f"\ncatalog: {catalog_file.stat().st_size} bytes; the service's log: {tmp}/broker.log"
        )
        from benchmarks._harness import Figure, report

        bare, catalog, last_operation, alone = results[:4]
        report(
            [
                Figure("osb_throughput", "GET /v2/catalog", catalog.rate, "req/s",
                       "bare aiohttp handler", bare.rate),
                Figure("osb_throughput", "GET .../last_operation", last_operation.rate,
                       "req/s", "database alone", alone.rate),
                Figure("osb_throughput", "provision + poll + deprovision", cycles.rate,
                       "cycles/s"),
            ]
        )  # fmt: skip
    finally:
        for proc in reversed(processes):
            proc.stop()
        db.stop()
        shutil.rmtree(tmp / "db", ignore_errors=True)
        shutil.rmtree(tmp / "agent", ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    asyncio.run(main(args.concurrency, args.seconds))
