"""The manager on its embedded defaults survives a crash in the middle of a backup (issue 16).

Real processes: ``python -m broker`` on a temporary ``DATA_DIR`` (its embedded SecantusDB a
child of it), our agent running a backup script that pauses, real S3. The manager is killed
with ``kill -9`` (an out-of-memory kill), then the manager and its database together (a
crashed host); each time the test restarts it on the same data directory, as a supervisor
would. The restarted manager is ready within 10 s, takes the job over, and the job ends
SUCCEEDED once, with the agent's backup run once and one restore point. While it runs, the
job shows the agent's stage, when it was last heard from and its stage logs. A clean SIGTERM
afterwards leaves no process holding the data directory. Last, the instance is deleted while
a backup runs: fetching it answers 422 ConcurrencyError meanwhile, and the backup leaves no
restore point and no file.

(tests/broker/test_embedded_db.py shows the restart itself on an idle manager; this adds the
job that was running.)
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from storage import S3Settings
from tests.agent.helpers import AgentProcess
from tests.broker.conftest import SERVICE_ID, STANDARD, parameters, provision_body
from tests.broker.test_embedded_db import database_pid, databases_on, gone_within, processes
from tests.broker.test_process import BrokerProcess, osb_headers, wait_succeeded
from tests.servers.s3 import SeaweedS3

__all__ = ["processes"]  # the fixture, shared with test_embedded_db

PAUSING_BACKUP = (
    'echo "backup $BACKUP_DATABASE" >> "$TRACE"; sleep 6; '
    'echo "$BACKUP_DATABASE data" > "$BACKUP_DIRECTORY/$BACKUP_FILENAME.txt"; echo out-backup'
)
FAST_RUNNER = {
    "RUNNER_LEASE_SECONDS": "3",
    "RUNNER_POLL_SECONDS": "0.5",
    "RUNNER_AGENT_POLL_MIN_SECONDS": "0.2",
    "RUNNER_AGENT_POLL_MAX_SECONDS": "0.5",
    "EGRESS_DENY_NETWORKS": "",  # the agent and S3 listen on loopback here
}


class Manager:
    """One manager process on ``data``, and HTTP calls to it (broker credentials)."""

    def __init__(self, data: Path, log: Path) -> None:
        self.process = BrokerProcess(data, log, **FAST_RUNNER)

    @property
    def url(self) -> str:
        return self.process.url

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with aiohttp.ClientSession(headers=osb_headers()) as http:
            async with http.request(method, self.url + path, json=body) as r:
                return r.status, await r.json(content_type=None)

    def start_until_ready(self) -> float:
        """Start it; seconds until ``/ready`` answers 200 (the database answers)."""
        began = time.monotonic()
        self.process.start()
        while True:
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=2) as r:  # noqa: S310
                    if r.status == 200:
                        return time.monotonic() - began
            except OSError:
                pass
            if time.monotonic() - began > 60:
                raise AssertionError("the manager did not become ready")
            time.sleep(0.1)


async def until(check: Callable[[], Any], what: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def setup(manager: Manager, agent: AgentProcess, s3: S3Settings) -> tuple[str, str]:
    """An instance of ``agent`` provisioned through OSB, a destination and a plan: (instance
    id, plan id)."""
    iid = str(uuid.uuid4())
    params = parameters(f"http://127.0.0.1:{agent.port}", items=["orders"])
    async with aiohttp.ClientSession(headers=osb_headers()) as http:
        url = f"{manager.url}/v2/service_instances/{iid}?accepts_incomplete=true"
        async with http.put(url, json=provision_body(params)) as r:
            assert r.status == 202, await r.text()
        await wait_succeeded(http, manager.url, iid)
    base = f"/v1/service_instances/{iid}"
    status, dest = await manager.call(
        "POST",
        f"{base}/destinations",
        {
            "type": "S3",
            "name": "primary",
            "endpoint": s3.endpoint,
            "bucket": s3.bucket,
            "region": s3.region,
            "access_key_id": s3.access_key_id,
            "secret_access_key": s3.secret_access_key.get_secret_value(),
            "addressing_style": "path",
        },
    )
    assert status == 201, dest
    status, plan = await manager.call(
        "POST",
        f"{base}/plans",
        {
            "name": "nightly",
            "destination_id": dest["id"],
            "frequency": "0 3 * * *",
            "timezone": "UTC",
            "retention": {"style": "FILES", "period": 7},
        },
    )
    assert status == 201, plan
    return iid, plan["id"]


async def backup_mid_run(manager: Manager, agent: AgentProcess, iid: str, plan: str) -> str:
    """A backup started through the API and seen running on the agent, in its backup stage,
    through ``GET .../jobs/{id}``: the job's id."""
    base = f"/v1/service_instances/{iid}"
    status, job = await manager.call("POST", f"{base}/plans/{plan}/backups")
    assert status == 202, job

    async def in_backup_stage() -> dict[str, Any] | None:
        status, doc = await manager.call("GET", f"{base}/jobs/{job['id']}")
        assert status == 200, doc
        item = doc["items"][0]
        started = "backup orders" in agent.trace_lines()
        ok = doc["status"] == "RUNNING" and item.get("stage") == "backup" and started
        return doc if ok else None

    running = await until(in_backup_stage, "the backup to run on the agent")
    (item,) = running["items"]
    assert item["status"] == "RUNNING" and item["last_heard_at"]
    assert "out-pre-backup-lock" in item["logs"]["pre_backup_lock_log"]
    assert running["agent"]["kind"] == "ours"
    return job["id"]


async def ended(manager: Manager, iid: str, job_id: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        status, doc = await manager.call("GET", f"/v1/service_instances/{iid}/jobs/{job_id}")
        assert status == 200, doc
        return doc if doc["status"] not in ("QUEUED", "RUNNING") else None

    return await until(check, f"job {job_id} to end")


async def assert_one_backup(
    manager: Manager, agent: AgentProcess, iid: str, job_id: str, runs_before: int
) -> None:
    done = await ended(manager, iid, job_id)
    assert done["status"] == "SUCCEEDED", done["reason"]
    assert done["attempts"] == 2  # the dead manager's claim, then the restarted one's
    backups = [line for line in agent.trace_lines() if line.startswith("backup ")]
    assert len(backups) == runs_before + 1, backups  # re-attached, not run again
    status, points = await manager.call("GET", f"/v1/service_instances/{iid}/restore_points")
    assert status == 200, points
    assert [p["id"] for p in points["items"] if p.get("job_id", p["id"]) == job_id] == [job_id]
    (item,) = done["items"]
    assert item["status"] == "SUCCEEDED" and item["stage"] == "finished"
    assert "out-post-backup-unlock" in item["logs"]["post_backup_unlock_log"]


def stop_cleanly(manager: Manager, data: Path) -> None:
    assert manager.process.stop() == 0
    assert not databases_on(data), "a database still holds the data directory"
    holders = []
    root = str(data.resolve())
    for p in psutil.process_iter(["pid"]):
        try:
            if any(f.path.startswith(root) for f in p.open_files()):
                holders.append(p.pid)
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    assert not holders, f"processes {holders} hold files in {data}"


async def test_a_backup_running_when_the_manager_is_killed_ends_succeeded_once(
    tmp_path: Path,
    processes: list[BrokerProcess],
    make_agent: Callable[..., AgentProcess],
    s3_server: SeaweedS3,
    s3_settings: S3Settings,
) -> None:
    data = tmp_path / "data"
    agent = make_agent(backup_body=PAUSING_BACKUP)
    first = Manager(data, tmp_path / "manager-1.log")
    processes.append(first.process)
    first.start_until_ready()
    # Acknowledged writes are on disk: the database syncs its log on every commit.
    assert "sync_on_commit = true" in (data / "database.toml").read_text()
    iid, plan = await setup(first, agent, s3_settings)

    # 1. kill -9 of the manager alone, mid-backup.
    job_id = await backup_mid_run(first, agent, iid, plan)
    assert first.process.proc is not None
    first.process.proc.kill()
    first.process.proc.wait()
    second = Manager(data, tmp_path / "manager-2.log")
    processes.append(second.process)
    assert second.start_until_ready() < 10
    await assert_one_backup(second, agent, iid, job_id, runs_before=0)
    assert len(s3_server.keys(s3_settings.bucket)) == 2  # its file and its manifest
    stop_cleanly(second, data)

    # 2. kill -9 of the manager and its database together, mid-backup.
    third = Manager(data, tmp_path / "manager-3.log")
    processes.append(third.process)
    assert third.start_until_ready() < 10
    job_id = await backup_mid_run(third, agent, iid, plan)
    db = database_pid(third.process)
    assert third.process.proc is not None
    os.kill(db, signal.SIGKILL)
    third.process.proc.kill()
    third.process.proc.wait()
    assert gone_within(db, 10)
    fourth = Manager(data, tmp_path / "manager-4.log")
    processes.append(fourth.process)
    assert fourth.start_until_ready() < 10
    await assert_one_backup(fourth, agent, iid, job_id, runs_before=1)
    status, points = await fourth.call("GET", f"/v1/service_instances/{iid}/restore_points")
    assert status == 200 and len(points["items"]) == 2, points
    assert len(s3_server.keys(s3_settings.bucket)) == 4  # two files, two manifests

    # 3. Deleting the instance while a backup runs: fetching it answers 422 ConcurrencyError
    # meanwhile, and the backup ends without a new restore point or file.
    await backup_mid_run(fourth, agent, iid, plan)
    async with aiohttp.ClientSession(headers=osb_headers()) as http:
        url = (
            f"{fourth.url}/v2/service_instances/{iid}?accepts_incomplete=true"
            f"&service_id={SERVICE_ID}&plan_id={STANDARD}"
        )
        async with http.delete(url) as r:
            assert r.status == 202, await r.text()
        async with http.get(f"{fourth.url}/v2/service_instances/{iid}") as r:
            assert r.status == 422, await r.text()
            assert (await r.json())["error"] == "ConcurrencyError"
        await wait_succeeded(http, fourth.url, iid)
        async with http.get(f"{fourth.url}/v2/service_instances/{iid}/last_operation") as r:
            description = (await r.json())["description"]
        assert "abandoned" not in description, description
    backups = [line for line in agent.trace_lines() if line.startswith("backup ")]
    assert len(backups) == 3  # it ran on the agent, to its end
    assert agent.trace_lines()[-1].startswith("post-backup-unlock")
    assert len(s3_server.keys(s3_settings.bucket)) == 4  # its upload was deleted
    cancelled = [x for x in fourth.process.log_lines() if x["event"] == "job_finished"]
    assert cancelled[-1]["status"] == "CANCELLED", cancelled[-1]
    stop_cleanly(fourth, data)
