"""A stand-in for the Go ``osb-backup-agent``, which cannot run on this machine (no Go
toolchain, no release binary). It speaks the Go agent's wire format as its source defines it
(evoila/osb-backup-agent: httpBodies, backup, restore): ``/status`` without capabilities,
201 on a new job, 409 with the job's state for a known id, 404 for an unknown one, 429 when
busy, jobs in memory only (a restart forgets them), stage logs for every stage, ``filesize``
and a boolean ``compression`` in the state. Uploads go to the real S3 server under
``filenamePrefix + filename`` like the Go agent's S3 upload.

Tests steer it: ``hold`` keeps jobs running until released, ``fail_stage`` (and
``fail_database``) fails a stage, ``busy``
answers 429 a number of times, ``restart()`` forgets every job; ``requests`` and ``starts``
record what the manager sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from storage import S3Settings, open_store
from tests.servers.basic_auth import basic_auth
from tests.servers.ports import free_port

USER, PASSWORD = "go-agent", "go-agent-PW-7781"
# The stages the Go agent runs and reports a log of (``<stage>_log``, ``<stage>_errorlog``).
BACKUP_STAGES = (
    "pre_backup_lock",
    "pre_backup_check",
    "backup",
    "backup_cleanup",
    "post_backup_unlock",
)
RESTORE_STAGES = ("pre_restore_lock", "restore", "restore_cleanup", "post_restore_unlock")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")


class GoAgentStandIn:
    def __init__(self, *, payload: bytes = b"go-agent-dump\n" * 100, log_text: str = "") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.payload = payload
        self.log_text = log_text
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.starts: Counter[str] = Counter()
        self.release = asyncio.Event()
        self.release.set()
        self.fail_stage: str | None = None
        self.fail_database: str | None = None  # with fail_stage: only this item fails
        self.busy = 0
        # Refuse the next start with this message: 400 with a FAILED job that the Go agent
        # keeps in memory (under the request's id) until it is deleted.
        self.refuse: str | None = None
        self.lose_uploads = False  # report success without storing anything
        self.uploaded: list[str] = []
        self.forgotten: list[str] = []
        self.downloaded: list[str] = []
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------ control

    def hold(self) -> None:
        self.release.clear()

    def let_go(self) -> None:
        self.release.set()

    async def start(self) -> GoAgentStandIn:
        app = web.Application(middlewares=[basic_auth(USER, PASSWORD)])
        app.add_routes(
            [
                web.get("/status", self._status),
                web.post("/backup", self._start_backup),
                web.get("/backup/{id}", self._get_backup),
                web.put("/restore", self._start_restore),
                web.get("/restore/{id}", self._get_restore),
                web.delete("/backup", self._delete_backup),
                web.delete("/restore", self._delete_restore),
            ]
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        for task in self.tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.tasks.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def restart(self) -> None:
        """Like the Go agent's restart: every job (running or not) is forgotten."""
        await self.stop()
        self.jobs.clear()
        await self.start()

    # ------------------------------------------------------------ HTTP

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response({"message": "Client is running"})

    async def _start(self, request: web.Request, kind: str) -> web.Response:
        body = await request.json()
        self.requests.append((kind, body))
        job_id = body.get("id", "")
        key = (kind, job_id)
        if key in self.jobs:
            return web.json_response(self.jobs[key], status=409)
        if not body.get("encryption_key"):
            return web.json_response(
                {"message": "body is missing essential fields: encryption_key"}, status=400
            )
        # Like the Go agent: an empty database username or password is a missing field (a
        # failed job kept under the id), which is why the manager refuses such a registration.
        section = body.get(kind) if isinstance(body.get(kind), dict) else {}
        missing = [f for f in ("username", "password") if not section.get(f)]
        if missing and not self.refuse:
            self.refuse = f"body is missing essential fields: {kind}({' '.join(missing)})"
        if self.refuse:
            failed = {
                "status": "FAILED",
                "message": f"{kind} failed",
                "state": "Body Deserialization",
                "error_message": self.refuse,
            }
            self.refuse = None
            self.jobs[key] = failed
            return web.json_response(failed, status=400)
        if self.busy > 0:
            self.busy -= 1
            return web.Response(status=429)
        self.starts[job_id] += 1
        stages = BACKUP_STAGES if kind == "backup" else RESTORE_STAGES
        state: dict[str, Any] = {
            "status": "RUNNING",
            "message": f"{kind} is running",
            "state": stages[0].replace("_", "-"),
            "type": body["destination"]["type"],
            "compression": bool(body.get("compression")),
            "start_time": _now(),
            "end_time": "",
            "execution_time_ms": 0,
            "filename": "",
            "filesize": {"size": 0, "unit": "byte"},
        }
        for stage in stages:
            state[f"{stage}_log"] = ""
            state[f"{stage}_errorlog"] = ""
        self.jobs[key] = state
        self.tasks[key] = asyncio.create_task(self._run(kind, body, state))
        return web.Response(status=201)

    async def _start_backup(self, request: web.Request) -> web.Response:
        return await self._start(request, "backup")

    async def _start_restore(self, request: web.Request) -> web.Response:
        return await self._start(request, "restore")

    async def _get(self, request: web.Request, kind: str) -> web.Response:
        state = self.jobs.get((kind, request.match_info["id"]))
        if state is None:
            return web.Response(status=404)
        return web.json_response(state)

    async def _get_backup(self, request: web.Request) -> web.Response:
        return await self._get(request, "backup")

    async def _get_restore(self, request: web.Request) -> web.Response:
        return await self._get(request, "restore")

    async def _delete(self, request: web.Request, kind: str) -> web.Response:
        body = await request.json()
        state = self.jobs.get((kind, body["id"]))
        if state is None:
            return web.Response(status=410)
        self.forgotten.append(body["id"])
        del self.jobs[(kind, body["id"])]
        return web.Response(status=200)

    async def _delete_backup(self, request: web.Request) -> web.Response:
        return await self._delete(request, "backup")

    async def _delete_restore(self, request: web.Request) -> web.Response:
        return await self._delete(request, "restore")

    # ------------------------------------------------------------ jobs

    async def _run(self, kind: str, body: dict[str, Any], state: dict[str, Any]) -> None:
        stages = BACKUP_STAGES if kind == "backup" else RESTORE_STAGES
        try:
            for stage in stages:
                state["state"] = stage.replace("_", "-")
                if stage in ("backup", "restore"):
                    await self.release.wait()
                state[f"{stage}_log"] = self.log_text or f"out-{stage}"
                database = body[kind]["database"]
                if self.fail_stage == stage and self.fail_database in (None, database):
                    raise RuntimeError(f"Executing the shell script failed ({stage})")
                if stage == "backup":
                    await self._upload(body, state)
                if stage == "restore":
                    await self._download(body)
            state.update(status="SUCCEEDED", message=f"{kind} successfully carried out")
        except RuntimeError as exc:
            state.update(status="FAILED", message=f"{kind} failed", error_message=str(exc))
        finally:
            state.update(state="finished", end_time=_now())

    def _settings(self, dest: dict[str, Any]) -> S3Settings:
        endpoint = dest.get("endpoint") or ""
        if "://" not in endpoint:
            endpoint = ("http://" if dest.get("skipSSL") else "https://") + endpoint
        return S3Settings(
            endpoint=endpoint,
            region=dest.get("region") or "us-east-1",
            bucket=dest["bucket"],
            access_key_id=dest["authKey"],
            secret_access_key=dest["authSecret"],
            addressing_style="path",
        )

    async def _upload(self, body: dict[str, Any], state: dict[str, Any]) -> None:
        dest = body["destination"]
        filename = f"2026_01_01_03_00_{body['backup']['host']}_{body['backup']['database']}.dump"
        key = dest.get("filenamePrefix", "") + filename

        async def chunks() -> Any:
            yield self.payload

        if not self.lose_uploads:
            async with open_store(self._settings(dest)) as store:
                await store.upload(key, chunks())
            self.uploaded.append(key)
        state["filename"] = filename
        state["filesize"] = {"size": len(self.payload), "unit": "byte"}

    async def _download(self, body: dict[str, Any]) -> None:
        dest = body["destination"]
        key = dest.get("filenamePrefix", "") + dest["filename"]
        data = b""
        async with open_store(self._settings(dest)) as store:
            async for chunk in store.download(key):
                data += chunk
        if data != self.payload:
            raise RuntimeError("restore got other bytes than were backed up")
        self.downloaded.append(key)
