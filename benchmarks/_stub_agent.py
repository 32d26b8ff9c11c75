"""A stub agent for benchmarks: one small, fast HTTP server in its own process that speaks the
agent protocol (docs/agent-protocol.md) for any number of instances.

    AGENT_PASSWORD=... python benchmarks/_stub_agent.py --port PORT [--user U] [--delay 0.5]

- ``GET /status``: ours (``capabilities: ["checksum:sha256"]``), so the manager records the
  stored object's checksum and size and leaves compression to the "scripts" (the old
  contract); the stub compresses nothing.
- ``POST /backup``: 201 and the job runs; 409 with its state for an id it knows; 400 without
  the fields the protocol requires.
- The job: ``--delay`` seconds of "script", then a real upload of a small object to the
  request's S3 destination (bucket, endpoint, keys, ``filenamePrefix``), then SUCCEEDED with
  ``filename``, ``filesize``, ``stored_key``, ``stored_size``, ``checksum`` and a short log per
  stage. The upload is real because the manager confirms every object in storage before it
  writes a restore point (``RUNNER_VERIFY_UPLOADS``). One S3 client per destination
  credentials is kept open (every instance of the benchmark shares one bucket).
- ``GET /backup/{id}``: the state; 404 for an unknown id. ``DELETE /backup``: 200, or 410.
- ``GET /_bench/stats`` (not the protocol; same credentials): per agent job id the epoch time
  its first ``POST /backup`` arrived, how many times it was started (201) and re-sent (409),
  and request counts. The benchmark reads it at the end.

The password comes from the environment (``AGENT_PASSWORD``), never the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage import ObjectStore, S3Settings, StorageError, open_store
from tests.servers.basic_auth import basic_auth

STAGES = ("pre_backup_lock", "pre_backup_check", "backup", "backup_cleanup", "post_backup_unlock")


def _iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")


class StubAgent:
    def __init__(self, user: str, password: str, delay: float, payload: bytes) -> None:
        self.credentials = (user, password)
        self.delay = delay
        self.payload = payload
        self.jobs: dict[str, dict[str, Any]] = {}
        self.first_post: dict[str, float] = {}
        self.starts: Counter[str] = Counter()
        self.resent: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self.failures = 0
        self._stores: dict[tuple[str, str, str], ObjectStore] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def status(self, request: web.Request) -> web.Response:
        self.requests["status"] += 1
        return web.json_response(
            {
                "message": "Client is running",
                "version": "bench-stub",
                "capabilities": ["checksum:sha256"],
            }
        )

    async def start(self, request: web.Request) -> web.Response:
        at = time.time()
        self.requests["post"] += 1
        body = await request.json()
        job_id = body.get("id") if isinstance(body, dict) else None
        if not job_id or not isinstance(body.get("destination"), dict) or "backup" not in body:
            return web.json_response({"message": "body is missing essential fields"}, status=400)
        self.first_post.setdefault(job_id, at)
        if job_id in self.jobs:
            self.resent[job_id] += 1
            return web.json_response(self.jobs[job_id], status=409)
        self.starts[job_id] += 1
        state: dict[str, Any] = {
            "status": "RUNNING",
            "message": "backup is running",
            "state": "backup",
            "start_time": _iso(),
            "end_time": "",
            "execution_time_ms": 0,
            "filename": "",
            "filenamePrefix": body["destination"].get("filenamePrefix", ""),
            "filesize": {"size": 0, "unit": "byte"},
            "transform": {"compression": None, "encryption": None},
        }
        self.jobs[job_id] = state
        task = asyncio.create_task(self._run(body, state, at))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return web.Response(status=201)

    async def get(self, request: web.Request) -> web.Response:
        self.requests["get"] += 1
        state = self.jobs.get(request.match_info["id"])
        if state is None:
            return web.Response(status=404)
        return web.json_response(state)

    async def forget(self, request: web.Request) -> web.Response:
        self.requests["delete"] += 1
        body = await request.json()
        if self.jobs.pop(body.get("id", ""), None) is None:
            return web.Response(status=410)
        return web.Response(status=200)

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "first_post": self.first_post,
                "starts": self.starts,
                "resent": self.resent,
                "requests": self.requests,
                "failures": self.failures,
            }
        )

    async def _store(self, dest: dict[str, Any]) -> ObjectStore:
        endpoint = dest.get("endpoint") or ""
        if "://" not in endpoint:
            endpoint = ("http://" if dest.get("skipSSL") else "https://") + endpoint
        key = (endpoint, dest["bucket"], dest["authKey"])
        store = self._stores.get(key)
        if store is None:
            store = self._stores[key] = open_store(
                S3Settings(
                    endpoint=endpoint,
                    region=dest.get("region") or "us-east-1",
                    bucket=dest["bucket"],
                    access_key_id=dest["authKey"],
                    secret_access_key=dest["authSecret"],
                    addressing_style="path",
                )
            )
        return store

    async def _run(self, body: dict[str, Any], state: dict[str, Any], started: float) -> None:
        await asyncio.sleep(self.delay)
        dest = body["destination"]
        section = body["backup"]
        stamp = datetime.now(UTC).strftime("%Y_%m_%d_%H_%M")
        filename = f"{stamp}_{section.get('host', 'db')}_{section.get('database', 'db')}.dump"
        try:
            stored = await (await self._store(dest)).upload(
                dest.get("filenamePrefix", "") + filename, _once(self.payload)
            )
        except StorageError as exc:
            self.failures += 1
            state.update(status="FAILED", message="backup failed", error_message=str(exc))
        else:
            state.update(
                status="SUCCEEDED",
                message="backup successfully carried out",
                filename=filename,
                filesize={"size": len(self.payload), "unit": "byte"},
                stored_key=stored.key,
                stored_size=stored.size,
                checksum=stored.checksum,
            )
            for stage in STAGES:
                state[f"{stage}_log"] = f"{stage}: ok"
                state[f"{stage}_errorlog"] = ""
        state.update(
            state="finished",
            end_time=_iso(),
            execution_time_ms=int((time.time() - started) * 1000),
        )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for store in self._stores.values():
            with contextlib.suppress(Exception):
                await store.aclose()


async def _once(data: bytes) -> Any:
    yield data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", default="bench-agent")
    parser.add_argument("--delay", type=float, default=0.5, help="seconds a backup takes")
    parser.add_argument("--payload-bytes", type=int, default=1024)
    args = parser.parse_args()
    password = os.environ.get("AGENT_PASSWORD")
    if not password:
        parser.error("set AGENT_PASSWORD in the environment")
    agent = StubAgent(args.user, password, args.delay, os.urandom(args.payload_bytes))
    app = web.Application(middlewares=[basic_auth(*agent.credentials)], client_max_size=1024 * 1024)
    app.add_routes(
        [
            web.get("/status", agent.status),
            web.post("/backup", agent.start),
            web.get("/backup/{id}", agent.get),
            web.delete("/backup", agent.forget),
            web.get("/_bench/stats", agent.stats),
        ]
    )

    async def closing(app: web.Application) -> Any:
        yield
        await agent.close()

    app.cleanup_ctx.append(closing)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
